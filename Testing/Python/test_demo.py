"""`python -m SlicerSAM demo` on a fresh clone: the bundled CT, or the phantom on request."""

from __future__ import annotations

import json

import pytest

from SlicerSAM.cli import main


@pytest.mark.slow
def test_demo_segments_the_bundled_ct_against_its_reference_labels(
    litemedsam_checkpoint, tmp_path, capsys
):
    """What the README's first command runs: the real CT that ships with the package, no
    ../shared needed; Dice against TotalSegmentator's reference labels."""
    assert main(["demo", "--output", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "abdominal CT" in out and "SYNTHETIC" not in out
    (run,) = list(tmp_path.iterdir())
    result = json.loads((run / "results.json").read_text())
    assert result["protocol"] == "box-propagate" and len(result["structures"]) == 29
    for name in ("spleen", "liver", "kidney_left", "kidney_right", "aorta"):
        assert result["structures"][name]["dice"] > 0.85, name
    assert result["mean_dice"] > 0.5
    assert (run / "segmentation.seg.nrrd").stat().st_size > 0


@pytest.mark.slow
def test_demo_segments_the_phantom_and_writes_every_output(litemedsam_checkpoint, tmp_path, capsys):
    argv = ["demo", "--phantom", "--protocol", "keyslice-box", "--output", str(tmp_path)]
    assert main(argv + ["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # the output says which data, model and device it used, and how long things took
    assert "SYNTHETIC" in out
    assert "litemedsam" in out and "cpu" in out
    assert "ms/slice" in out
    (run,) = list(tmp_path.iterdir())
    for name in (
        "segmentation.seg.nrrd",
        "segmentation.nii.gz",
        "overlay.png",
        "results.json",
        "results.csv",
    ):
        assert (run / name).stat().st_size > 0, name
    result = json.loads((run / "results.json").read_text())
    assert result["model"] == "litemedsam"
    assert result["protocol"] == "keyslice-box"
    assert set(result["structures"]) == {
        "liver",
        "spleen",
        "right kidney",
        "left kidney",
        "aorta",
        "vertebra",
    }
    # one box per structure on its largest slice, then propagation: the phantom's organs are
    # clean, so anything under 0.8 means the pipeline broke (measured 0.93)
    assert result["mean_dice"] > 0.8


def test_each_demo_run_gets_a_new_folder(tmp_path):
    from SlicerSAM.demo import _run_folder

    first = _run_folder(str(tmp_path))
    (first / "results.json").write_text("{}")
    second = _run_folder(str(tmp_path))
    assert second != first and second.is_dir()
    assert (first / "results.json").read_text() == "{}"
