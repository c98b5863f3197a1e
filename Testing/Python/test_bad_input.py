"""Every bad input a clear error before any work: one table of command lines, each with the
message it must print, exit status 2, no traceback and nothing written.

The model is never needed to refuse these: the tests replace the model loader by one that fails
the test, so an input refused only after loading the model (or encoding a slice) fails here.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from markups_files import roi, write

from SlicerSAM.cli import main

SHAPE = (24, 20, 12)  # (i, j, k) of the small NIfTI volumes below


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Small inputs: a CT-like volume, a label map, prompt files, a dataset folder."""
    import SlicerSAM.cli as cli

    def no_model(args):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(cli, "_load_model", no_model)
    monkeypatch.setenv("SLICERSAM_CACHE", str(tmp_path / "model-cache"))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 50, SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "ct.nii.gz")
    labels = np.zeros(SHAPE, np.uint8)
    labels[8:14, 6:12, 3:8] = 3
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labels.nii.gz")
    one_organ = (labels == 3).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(one_organ, affine), tmp_path / "pred.nii.gz")
    (tmp_path / "names.json").write_text(json.dumps({"3": "kidney_left", "5": "liver"}))
    nan = ct.astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(ct[:, :, 0], affine), tmp_path / "flat.nii.gz")
    raw = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])

    def prompt(name, data):
        (tmp_path / name).write_text(json.dumps(data))

    prompt("click.json", {"frame": "kji", "points": [{"position": [4, 9, 10]}]})
    prompt(
        "zero_box.json",
        {"frame": "kji", "orientation": "axial", "box": {"corners": [[5, 9, 10], [5, 9, 10]]}},
    )
    prompt("far.json", {"frame": "kji", "points": [{"position": [40, 9, 10]}]})
    (tmp_path / "broken.json").write_text('{"points": [')
    write(tmp_path, roi("ROI", (30.0, 27.0, 12.0), (0.0, 0.0, 0.0)), name="zero_roi.mrk.json")

    class Code:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"weights": Code()}, tmp_path / "code.pth")
    (tmp_path / "exists.nii.gz").write_bytes(b"do not overwrite")
    return tmp_path


CT, LAB = "{d}/ct.nii.gz", "{d}/labels.nii.gz"

# (case, argv, text the message must hold, paths that must not exist afterwards)
ROWS = [
    (
        "zero-size box",
        ["segment", CT, "--prompts", "{d}/zero_box.json", "--output", "{d}/o.nii.gz"],
        "the box has zero size",
        ["{d}/o.nii.gz"],
    ),
    (
        "zero-size Slicer ROI",
        ["segment", CT, "--prompts", "{d}/zero_roi.mrk.json", "--output", "{d}/o.seg.nrrd"],
        "the box has zero size",
        ["{d}/o.seg.nrrd"],
    ),
    (
        "propagate with neither --prompts nor --mask",
        ["propagate", CT, "--output", "{d}/o.nii.gz"],
        "propagate needs --prompts FILE, --mask LABELMAP, or both",
        ["{d}/o.nii.gz"],
    ),
    (
        "an output format that cannot hold a segmentation",
        ["segment", CT, "--prompts", "{d}/click.json", "--propagate", "--output", "{d}/seg.png"],
        "unsupported output extension",
        ["{d}/seg.png"],
    ),
    (
        "a JSON report with another extension",
        [
            "segment",
            CT,
            "--prompts",
            "{d}/click.json",
            "--output",
            "{d}/o.nii.gz",
            "--json",
            "{d}/r.txt",
        ],
        "unsupported output extension; use one of .json",
        ["{d}/o.nii.gz", "{d}/r.txt"],
    ),
    (
        "a dataset folder that does not exist",
        [
            "benchmark",
            "--dataset",
            "{d}/missing",
            "--output",
            "{d}/res",
            "--protocol",
            "roi-propagate",
        ],
        "expected imagesTr/ and labelsTr/",
        ["{d}/res"],
    ),
    (
        "a checkpoint that would run code",
        ["segment", CT, "--prompts", "{d}/click.json", "--output", "{d}/o.nii.gz"],
        "holds Python code or objects besides weights",
        ["{d}/o.nii.gz"],
    ),
    (
        "evaluate: a structure the label names do not know",
        [
            "evaluate",
            "{d}/pred.nii.gz",
            LAB,
            "--labels",
            "{d}/names.json",
            "--structures",
            "spleen",
        ],
        "unknown structure(s) spleen; {d}/names.json names: kidney_left, liver",
        [],
    ),
    (
        "evaluate: a label value in neither map",
        ["evaluate", "{d}/pred.nii.gz", LAB, "--label", "9", "--json", "{d}/e.json"],
        "label value(s) [9] are in neither",
        ["{d}/e.json"],
    ),
    (
        "evaluate: --structures without names",
        ["evaluate", "{d}/pred.nii.gz", LAB, "--structures", "liver"],
        "--structures needs --labels",
        [],
    ),
    (
        "a point outside the volume",
        ["segment", CT, "--prompts", "{d}/far.json", "--output", "{d}/o.nii.gz"],
        "point 0 at voxel (k, j, i) (40.0, 9.0, 10.0) is outside the volume",
        ["{d}/o.nii.gz"],
    ),
    (
        "a model whose weights need a download",
        [
            "segment",
            CT,
            "--prompts",
            "{d}/click.json",
            "--output",
            "{d}/o.nii.gz",
            "--model",
            "sam_vit_b",
        ],
        "--download on the command line",
        ["{d}/o.nii.gz"],
    ),
    (
        "an unknown window",
        [
            "segment",
            CT,
            "--prompts",
            "{d}/click.json",
            "--output",
            "{d}/o.nii.gz",
            "--window",
            "soft",
        ],
        "percentile:LOW,HIGH",
        ["{d}/o.nii.gz"],
    ),
    (
        "malformed prompt JSON",
        ["segment", CT, "--prompts", "{d}/broken.json", "--output", "{d}/o.nii.gz"],
        "is not a JSON file",
        ["{d}/o.nii.gz"],
    ),
    (
        "an existing output",
        ["segment", CT, "--prompts", "{d}/click.json", "--output", "{d}/exists.nii.gz"],
        "already exists",
        [],
    ),
    (
        "a 2D image",
        ["segment", "{d}/flat.nii.gz", "--prompts", "{d}/click.json", "--output", "{d}/o.nii.gz"],
        "2D",
        ["{d}/o.nii.gz"],
    ),
    (
        "NaN voxels",
        ["segment", "{d}/nan.nii.gz", "--prompts", "{d}/click.json", "--output", "{d}/o.nii.gz"],
        "NaN",
        ["{d}/o.nii.gz"],
    ),
    (
        "a truncated image",
        [
            "segment",
            "{d}/truncated.nii.gz",
            "--prompts",
            "{d}/click.json",
            "--output",
            "{d}/o.nii.gz",
        ],
        "truncated.nii.gz",
        ["{d}/o.nii.gz"],
    ),
    (
        "an unknown protocol",
        ["benchmark", CT, LAB, "--protocol", "boxes", "--json", "{d}/b.json"],
        "unknown protocol 'boxes'",
        ["{d}/b.json"],
    ),
]


@pytest.mark.parametrize("case, argv, message, absent", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(
    files, capsys, monkeypatch, case, argv, message, absent
):
    argv = [a.format(d=files) for a in argv]
    if case == "a checkpoint that would run code":
        import SlicerSAM.cli as cli
        from sam_core.zoo import load_model

        # the real loader this time: the checkpoint is what is refused
        monkeypatch.setattr(
            cli, "_load_model", lambda args: load_model("litemedsam", files / "code.pth")
        )
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    assert message.format(d=files) in err, (case, err)
    assert "Traceback" not in err and "weights_only" not in err
    assert err.strip().startswith("error:") and err.count("\n") <= 2, err
    for path in absent:
        assert not os.path.exists(path.format(d=files)), (case, path)


def test_a_missing_output_folder_is_created_and_said(files, capsys):
    out = files / "new" / "folder" / "metrics.json"
    argv = ["evaluate", f"{files}/pred.nii.gz", f"{files}/labels.nii.gz", "--json", str(out)]
    assert main(argv + ["--labels", f"{files}/names.json", "--structures", "kidney_left"]) == 0
    printed = capsys.readouterr().out
    assert f"{out.parent} does not exist; it is created for {out}" in printed
    rows = json.loads(out.read_text())["structures"]
    assert list(rows) == ["kidney_left"] and rows["kidney_left"]["dice"] == 1.0


def test_help_describes_what_each_command_accepts(capsys):
    for command, words in (
        ("segment", ["--window", "percentile:LOW,HIGH", ".mrk.json", "--propagate"]),
        ("propagate", ["--mask", "both are key slices"]),
        ("evaluate", ["--structures", "--label", "reference label map"]),
        ("benchmark", ["--protocol", "click-correct", "reference label map on the image grid"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in text, (command, word)
