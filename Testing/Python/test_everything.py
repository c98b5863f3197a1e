"""Segment everything: sam_core's automatic mask generator, the engine's candidates, the CLI.

The generator's building blocks are checked against the official ``segment_anything.utils.amg``
(loaded by path: the package's ``__init__`` would import torchvision); the whole path on real CT
slices with LiteMedSAM.
"""

from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_core.automatic_mask_generator import (
    SamAutomaticMaskGenerator,
    box_nms,
    build_point_grid,
    generate_crop_boxes,
    mask_boxes,
    remove_small_regions,
    stability_scores,
)
from SlicerSAM.cli import main

CT = "ct-abdomen-3mm/ct.nii.gz"
LABELS = "ct-abdomen-3mm/labels.nii.gz"
RECORD_KEYS = {
    "segmentation",
    "area",
    "bbox",
    "predicted_iou",
    "point_coords",
    "stability_score",
    "crop_box",
}


@pytest.fixture(scope="module")
def amg():
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        pytest.skip("segment-anything (the official package, a test oracle) is not installed")
    path = f"{list(spec.submodule_search_locations)[0]}/utils/amg.py"
    module_spec = importlib.util.spec_from_file_location("sa_amg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [1, 4, 32])
def test_the_point_grid_is_the_official_one(amg, n):
    np.testing.assert_allclose(build_point_grid(n), amg.build_point_grid(n))


@pytest.mark.parametrize("size, layers", [((512, 512), 1), ((300, 451), 2), ((101, 122), 0)])
def test_crop_boxes_are_the_official_ones(amg, size, layers):
    assert generate_crop_boxes(size, layers, 512 / 1500) == amg.generate_crop_boxes(
        size, layers, 512 / 1500
    )


def test_stability_boxes_and_rle_are_the_official_ones(amg):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((6, 37, 41), generator=gen) * 3
    logits[5] = -10  # an empty mask
    np.testing.assert_allclose(
        stability_scores(logits, 0.0, 1.0)[:5],
        amg.calculate_stability_score(logits, 0.0, 1.0)[:5],
    )
    masks = logits > 0
    assert torch.equal(mask_boxes(masks), amg.batched_mask_to_box(masks).float())
    from sam_core.automatic_mask_generator import _rle

    official = amg.mask_to_rle_pytorch(masks[:2])
    assert [_rle(m.numpy()) for m in masks[:2]] == official


def test_box_nms_keeps_what_brute_force_keeps():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand((60, 2), generator=gen) * 50
    wh = torch.rand((60, 2), generator=gen) * 30 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=gen)
    kept = box_nms(boxes, scores, 0.5).tolist()
    expected = []
    for i in sorted(range(60), key=lambda i: -float(scores[i])):
        a = boxes[i]
        ok = True
        for j in expected:
            b = boxes[j]
            iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
            ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
            inter = iw * ih
            union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
            ok &= inter / union <= 0.5
        if ok:
            expected.append(i)
    assert kept == expected


def test_small_holes_are_filled_and_small_islands_dropped():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False  # a 1-pixel hole
    mask[17, 17] = True  # a 1-pixel island
    filled, changed = remove_small_regions(mask, 3, "holes")
    assert changed and filled[5, 5] and filled[17, 17]
    cleaned, changed = remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[17, 17] and cleaned[2:12, 2:12].all()
    assert remove_small_regions(cleaned, 3, "islands") == (pytest.approx(cleaned), False)


def test_the_generator_refuses_bad_parameters():
    class Sam:  # never used: construction fails first
        pass

    for kwargs, message in [
        (dict(output_mode="coco_rle"), "pycocotools"),
        (dict(prompt="scribbles"), "prompt"),
        (dict(points_per_side=None), "exactly one"),
        (dict(prompt="boxes", box_sizes=(0.0,)), "box_sizes"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamAutomaticMaskGenerator(Sam(), **kwargs)


@pytest.fixture(scope="module")
def ct_segmenter(shared_data, litemedsam_checkpoint):
    from sam_core.zoo import load_model
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.segmenter import Segmenter
    from SlicerSAM.volume import load_volume

    folder = shared_data / "ct-abdomen-3mm"
    volume = load_volume(folder / "ct.nii.gz")
    labels = np.asarray(load_volume(folder / "labels.nii.gz").array)
    sam = load_model("litemedsam", litemedsam_checkpoint, device="cpu")
    return Segmenter(volume, sam, intensity=parse_intensity("40,400")), labels


@pytest.mark.slow
@pytest.mark.shared_data
def test_records_on_a_ct_slice_follow_the_official_format_and_filters(ct_segmenter):
    segmenter, _ = ct_segmenter
    generator = SamAutomaticMaskGenerator(
        segmenter.predictor,
        points_per_side=4,
        prompt="boxes",
        box_sizes=(0.1, 0.3),
        pred_iou_thresh=0.3,
        stability_score_thresh=0.6,
        output_mode="uncompressed_rle",
    )
    records = generator.generate_from_embedding(segmenter.embedding(15))
    assert records
    h, w = segmenter.embedding(15).original_size
    for r in records:
        assert set(r) == RECORD_KEYS | {"prompt_box"}
        assert r["predicted_iou"] > 0.3 and r["stability_score"] >= 0.6
        assert r["segmentation"]["size"] == [h, w] and sum(r["segmentation"]["counts"]) == h * w
        assert r["area"] == sum(r["segmentation"]["counts"][1::2])
        assert r["crop_box"] == [0.0, 0.0, float(w), float(h)]
    with pytest.raises(ValueError, match="crops need the image"):
        SamAutomaticMaskGenerator(segmenter.predictor, crop_n_layers=1).generate_from_embedding(
            segmenter.embedding(15)
        )


@pytest.mark.slow
@pytest.mark.shared_data
def test_crops_are_encoded_and_their_masks_put_back_in_place(ct_segmenter):
    segmenter, _ = ct_segmenter
    image = segmenter.model_image(15)
    h, w = image.shape[:2]
    generator = SamAutomaticMaskGenerator(
        segmenter.predictor,
        points_per_side=2,
        prompt="boxes",
        box_sizes=(0.3,),
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        crop_n_layers=1,
        crop_nms_thresh=1.0,  # keep the duplicates across crops: every crop is seen
    )
    records = generator.generate(image)
    crops = {tuple(r["crop_box"]) for r in records}
    assert (0.0, 0.0, float(w), float(h)) in crops and len(crops) >= 3
    for r in records:
        x0, y0, cw, ch = (int(v) for v in r["crop_box"])
        mask = r["segmentation"]
        assert mask.shape == (h, w) and mask.any()
        outside = mask.copy()
        outside[y0 : y0 + ch, x0 : x0 + cw] = False
        assert not outside.any()  # a crop's mask lies inside the crop
        px, py = r["point_coords"][0]
        assert x0 <= px <= x0 + cw and y0 <= py <= y0 + ch


@pytest.mark.slow
@pytest.mark.shared_data
def test_the_candidates_of_an_axial_slice_hold_its_large_organs(ct_segmenter):
    """Measured (docs/benchmarks.md, "Segment everything"): on the slice where the liver is
    largest, the best candidates for liver, spleen, stomach and aorta."""
    from SlicerSAM.everything import segment_everything

    segmenter, labels = ct_segmenter
    plane = segmenter.plane
    liver = labels == 5
    k = int(np.argmax([plane.grid(liver, i).sum() for i in range(plane.num_slices)]))
    candidates = segment_everything(segmenter, k)
    areas = [c.area for c in candidates]
    assert areas == sorted(areas, reverse=True)
    ref = np.asarray(plane.grid(labels, k))
    best = {}
    for value, name in [(5, "liver"), (1, "spleen"), (6, "stomach"), (52, "aorta")]:
        r = ref == value
        best[name] = max(2 * (c.mask & r).sum() / (c.mask.sum() + r.sum()) for c in candidates)
    assert min(best.values()) >= 0.7, best


def _write_constant_volume(path, value=-1000):
    nib.save(nib.Nifti1Image(np.full((20, 20, 6), value, np.int16), np.eye(4)), str(path))


@pytest.mark.parametrize(
    "case, message",
    [
        ("outside", "slice 40 is outside the volume"),
        ("empty", "is empty: every voxel is -1000"),
        ("exists", "already exists"),
        ("suffix", "unsupported output extension"),
    ],
)
def test_bad_everything_input_is_refused_before_any_work(tmp_path, capsys, case, message):
    image = tmp_path / "ct.nii.gz"
    _write_constant_volume(image)
    out = tmp_path / ("c.nii.gz" if case == "suffix" else "c.seg.nrrd")
    if case == "exists":
        out.write_text("keep me")
    argv = ["everything", str(image), "--slice", "40" if case == "outside" else "2"]
    # a model with no weights: the refusal must come before the model is looked at
    argv += ["--output", str(out), "--checkpoint", str(tmp_path / "no-such.pth")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ct.nii.gz"] + (["c.seg.nrrd"] if case == "exists" else [])
    )
    if case == "exists":
        assert out.read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.shared_data
def test_everything_writes_one_segment_per_candidate_with_records(
    shared_data, litemedsam_checkpoint, tmp_path, capsys
):
    import slicerio

    out = tmp_path / "candidates.seg.nrrd"
    argv = ["everything", str(shared_data / CT), "--slice", "15", "--window", "40,400"]
    assert main(argv + ["--output", str(out), "--checkpoint", str(litemedsam_checkpoint)]) == 0
    info = json.loads((tmp_path / "candidates.json").read_text())
    records = info["candidates"]
    seg = slicerio.read_segmentation(str(out))
    names = [s["name"] for s in seg["segments"]]
    assert names == [r["name"] for r in records] and len(names) >= 5
    areas = [r["area_voxels"] for r in records]
    assert areas == sorted(areas, reverse=True)
    voxels = np.asarray(seg["voxels"])
    for s, r in zip(seg["segments"], records):
        layer = voxels[..., s["layer"]] if voxels.ndim == 4 else voxels
        mask = (layer == s["labelValue"]).transpose(2, 1, 0)  # (K, J, I)
        assert mask.sum() == r["area_voxels"] and set(np.flatnonzero(mask.any((1, 2)))) == {15}
    assert f"{len(records)} candidates on axial slice 15" in capsys.readouterr().out
