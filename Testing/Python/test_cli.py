"""The command line as a user runs it: `python -m SlicerSAM ...`.

Most tests call `cli.main(argv)` in-process (fast); one runs the real `python -m SlicerSAM`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from SlicerSAM.cli import main

CT = "ct-abdomen-3mm/ct.nii.gz"
LABELS = "ct-abdomen-3mm/labels.nii.gz"


def _liver_label(shared_data) -> int:
    names = json.loads((shared_data / "ct-abdomen-3mm/labels.json").read_text())
    return next(int(k) for k, v in names.items() if v == "liver")


def _roi_markups(path, center, size):
    """A Slicer ROI markups file (RAS) with the given centre and size in mm."""
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
        "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "ROI",
                "coordinateSystem": "RAS",
                "coordinateUnits": "mm",
                "roiType": "Box",
                "center": [float(c) for c in center],
                "size": [float(s) for s in size],
                "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                "controlPoints": [],
            }
        ],
    }
    path.write_text(json.dumps(doc))
    return path


def _liver_roi(shared_data, tmp_path, slab_slices: int):
    """ROI around the liver on its largest axial slice, `slab_slices` slices thick."""
    img = nib.load(str(shared_data / LABELS))
    labels = np.asarray(img.dataobj)
    liver = labels == _liver_label(shared_data)
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    ii, jj = np.nonzero(liver[:, :, k])
    lo = img.affine @ [ii.min() - 0.5, jj.min() - 0.5, k, 1]
    hi = img.affine @ [ii.max() + 0.5, jj.max() + 0.5, k, 1]
    spacing_k = float(np.linalg.norm(img.affine[:3, 2]))
    center = (lo[:3] + hi[:3]) / 2
    size = np.abs(hi[:3] - lo[:3])
    size[2] = spacing_k * slab_slices
    return _roi_markups(tmp_path / "liver.mrk.json", center, size), liver, k


def test_python_dash_m_shows_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "SlicerSAM", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in (
        "segment",
        "propagate",
        "everything",
        "evaluate",
        "benchmark",
        "models",
        "demo",
    ):
        assert command in out


def test_models_lists_the_default_first_class(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "* litemedsam" in out
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"):
        assert name in out


def test_missing_image_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "segment",
            str(tmp_path / "nope.nii.gz"),
            "--prompts",
            str(tmp_path / "p.json"),
            "--output",
            str(tmp_path / "out.nii.gz"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz" in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    code = main(
        ["segment", str(tmp_path / "x.nii.gz"), "--prompts", "p.json", "--output", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "exists" in err and "overwrite" in err
    assert out.read_bytes() == b"keep me"


def test_evaluate_reference_against_itself(shared_data, tmp_path, capsys):
    ref = shared_data / LABELS
    out_json = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            str(ref),
            str(ref),
            "--labels",
            str(shared_data / "ct-abdomen-3mm/labels.json"),
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    result = json.loads(out_json.read_text())["structures"]
    assert result["liver"]["dice"] == 1.0
    assert result["liver"]["hd95_mm"] == 0.0
    assert "liver" in capsys.readouterr().out


@pytest.mark.slow
def test_segment_from_slicer_roi_writes_a_seg_nrrd(shared_data, litemedsam_checkpoint, tmp_path):
    import slicerio

    roi, liver, k = _liver_roi(shared_data, tmp_path, slab_slices=1)
    out = tmp_path / "liver.seg.nrrd"
    info = tmp_path / "info.json"
    code = main(
        [
            "segment",
            str(shared_data / CT),
            "--prompts",
            str(roi),
            "--output",
            str(out),
            "--json",
            str(info),
            "--name",
            "liver",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["liver"]
    # slicerio gives the voxels as (i, j, k) like nibabel's array for this file
    mask = np.asarray(seg["voxels"]) > 0
    assert mask.shape == liver.shape
    assert np.nonzero(mask.any(axis=(0, 1)))[0].tolist() == [k]
    inter = np.logical_and(mask[:, :, k], liver[:, :, k]).sum()
    dice = 2 * inter / (mask[:, :, k].sum() + liver[:, :, k].sum())
    assert dice > 0.85
    timing = json.loads(info.read_text())["timing"]
    assert timing["slices_encoded"] == 1
    assert {"encode_ms_per_slice", "decode_ms_per_prompt", "wall_s", "peak_rss_mb"} <= set(timing)


def test_cache_dir_serves_a_second_run_without_encoding(
    shared_data, litemedsam_checkpoint, tmp_path
):
    roi, liver, k = _liver_roi(shared_data, tmp_path, slab_slices=1)
    cache = tmp_path / "embeddings"
    encoded, masks = [], []
    for run in ("first", "second"):
        out, info = tmp_path / f"{run}.nii.gz", tmp_path / f"{run}.json"
        argv = ["segment", str(shared_data / CT), "--prompts", str(roi), "--output", str(out)]
        argv += ["--json", str(info), "--device", "cpu", "--cache-dir", str(cache)]
        assert main(argv) == 0
        encoded.append(json.loads(info.read_text())["timing"]["slices_encoded"])
        masks.append(np.asarray(nib.load(str(out)).dataobj) > 0)
    assert encoded == [1, 0]  # the second run read the slice's embedding from --cache-dir
    assert any(cache.iterdir())
    assert masks[0][:, :, k].sum() > 0
    np.testing.assert_array_equal(masks[0], masks[1])


@pytest.mark.slow
def test_segment_propagates_within_a_3d_roi(shared_data, litemedsam_checkpoint, tmp_path, capsys):
    roi, liver, k = _liver_roi(shared_data, tmp_path, slab_slices=7)
    out = tmp_path / "liver.nii.gz"
    code = main(
        [
            "segment",
            str(shared_data / CT),
            "--prompts",
            str(roi),
            "--propagate",
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    mask = np.asarray(nib.load(str(out)).dataobj) > 0
    slices = np.nonzero(mask.any(axis=(0, 1)))[0]
    # the console says where the walks ended: the liver fills the slab, so at its ends
    printed = capsys.readouterr().out
    assert f"propagation: slices {k - 3}-{k + 3} (7); down: end of the range; up: end" in printed
    # the ROI is 7 slices thick around k: propagation stays inside it
    assert slices.min() >= k - 3 and slices.max() <= k + 3
    assert len(slices) >= 5
    inter = np.logical_and(mask, liver)[:, :, slices].sum()
    dice = 2 * inter / (mask[:, :, slices].sum() + liver[:, :, slices].sum())
    assert dice > 0.8


@pytest.mark.slow
def test_one_click_segments_the_spleen_and_point_prompts_model_gives_lite_medsams_own_answer(
    shared_data, litemedsam_checkpoint, tmp_path
):
    """A click in the spleen (a prompt file in voxel coordinates): LiteMedSAM was trained with
    boxes only, so by default the click becomes the box the model is surest of; with
    ``--point-prompts model`` the model gets the point and returns next to nothing."""
    from scipy import ndimage

    names = json.loads((shared_data / "ct-abdomen-3mm/labels.json").read_text())
    spleen = np.asarray(nib.load(str(shared_data / LABELS)).dataobj) == next(
        int(v) for v, n in names.items() if n == "spleen"
    )
    k = int(np.argmax(spleen.sum(axis=(0, 1))))
    depth = ndimage.distance_transform_edt(spleen[:, :, k])
    i, j = np.unravel_index(int(np.argmax(depth)), depth.shape)
    prompts = tmp_path / "click.json"
    point = {"position": [k, int(j), int(i)], "positive": True}
    prompts.write_text(json.dumps({"frame": "kji", "points": [point]}))
    dices, infos = {}, {}
    for mode in ("auto", "model"):
        out, info = tmp_path / f"{mode}.nii.gz", tmp_path / f"{mode}.json"
        argv = ["segment", str(shared_data / CT), "--prompts", str(prompts), "--output", str(out)]
        argv += ["--json", str(info), "--device", "cpu", "--point-prompts", mode]
        assert main(argv) == 0
        mask = np.asarray(nib.load(str(out)).dataobj) > 0
        assert np.nonzero(mask.any(axis=(0, 1)))[0].tolist() in ([k], [])
        ref = spleen[:, :, k]
        dices[mode] = 2 * (mask[:, :, k] & ref).sum() / (mask[:, :, k].sum() + ref.sum())
        infos[mode] = json.loads(info.read_text())
    assert infos["auto"]["point_prompts"] == "box" and infos["model"]["point_prompts"] == "model"
    searched = infos["auto"]["prompted"][str(k)]
    x0, y0, x1, y1 = searched["box_xyxy"]
    assert x0 < x1 and y0 < y1 and searched["searched_box"]
    assert infos["model"]["prompted"][str(k)]["box_xyxy"] is None
    assert dices["auto"] > 0.75 and dices["model"] < 0.2, dices


def test_prompt_outside_the_volume_fails_without_output(shared_data, tmp_path, capsys):
    prompts = tmp_path / "far.json"
    prompts.write_text(
        json.dumps({"frame": "ras", "points": [{"position": [5000, 0, 0], "positive": True}]})
    )
    out = tmp_path / "out.nii.gz"
    code = main(["segment", str(shared_data / CT), "--prompts", str(prompts), "--output", str(out)])
    assert code == 2
    assert "outside" in capsys.readouterr().err.lower()
    assert not out.exists()
