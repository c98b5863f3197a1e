"""Clicks for box-trained models (SlicerSAM.box_search) and the segmenter's point_prompts mode.

The unit tests drive search_box with a decoder made of nested rectangles: a box returns the
largest rectangle it holds almost whole, and is most confident when it fits that rectangle. The
real-CT tests show what the search is for: LiteMedSAM, given one click, returns next to nothing;
given the box the search finds, the structure.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from SlicerSAM.box_search import (
    HALF_SIZES_MM,
    RERANK,
    candidate_boxes,
    clicks_honoured,
    distinct,
    search_box,
    stability_score,
    tight_box,
)


def test_candidates_grow_the_positive_clicks_box_by_each_half_size_in_mm():
    # two positive clicks and a negative one, 2 mm pixels: 6 mm = 3 px, 9 mm = 4.5 px
    boxes = candidate_boxes(
        [[40, 30], [50, 34], [90, 90]], [1, 1, 0], (100, 120), 2.0, half_sizes_mm=(9, 6)
    )
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[0], [37, 27, 53, 37])  # smallest first
    np.testing.assert_allclose(boxes[1], [35.5, 25.5, 54.5, 38.5])


def test_candidates_are_clipped_to_the_image_and_duplicates_dropped():
    boxes = candidate_boxes([[2, 3]], [1], (20, 30), 1.0, half_sizes_mm=(50, 60, 1))
    np.testing.assert_allclose(boxes, [[1, 2, 3, 4], [-0.5, -0.5, 29.5, 19.5]])
    assert len(candidate_boxes([[2, 3]], [1], (20, 30), 1.0)) <= len(HALF_SIZES_MM)


def test_candidates_need_a_positive_click():
    with pytest.raises(ValueError, match="positive click"):
        candidate_boxes([[5, 5]], [0], (20, 20), 1.0)


def test_clicks_honoured_counts_positives_inside_and_negatives_outside():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True  # rows 2-4, cols 3-6
    xy = np.array([[3.2, 2.4], [8, 8], [5, 3]])  # (x, y): in, far out, deep in (row 3)
    assert clicks_honoured(mask, xy, [1, 0, 1]) == (2, 1)
    assert clicks_honoured(mask, xy, [1, 1, 0]) == (1, 0)  # a far positive; a negative deep inside
    assert clicks_honoured(mask, [[100, -3]], [0]) == (0, 1)  # off the image: the nearest pixel
    # clicks of one label on one pixel count once; a positive and a negative there count apart
    again = [[5, 3], [5.2, 2.9], [5, 3], [8, 8], [8, 8]]
    assert clicks_honoured(mask, again, [1, 1, 0, 0, 0]) == (1, 1)


def test_a_click_on_or_beside_the_mask_edge_counts_when_the_mask_covers_a_positive():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True  # rows 2-4, cols 3-6
    inside, edge_pixel, beside, diagonal, two_off = [4, 3], [6, 4], [7, 3], [7, 5], [8, 3]
    # the mask covers the first click: the others count within the 8 neighbours of their pixel
    # (a negative on the edge pixel has outside pixels next to it)
    assert clicks_honoured(mask, [inside, edge_pixel], [1, 0]) == (1, 1)
    assert clicks_honoured(mask, [inside, beside, diagonal], [1, 1, 1]) == (3, 0)
    assert clicks_honoured(mask, [inside, two_off], [1, 1]) == (1, 0)
    # radius 1: the 4 neighbours only; radius 0: the click's own pixel
    assert clicks_honoured(mask, [inside, beside, diagonal], [1, 1, 1], tolerance=1.0) == (2, 0)
    assert clicks_honoured(mask, [inside, edge_pixel], [1, 0], tolerance=0) == (1, 0)
    assert clicks_honoured(mask, [inside, two_off], [1, 1], tolerance=2.0) == (2, 0)
    # a mask that covers no positive click is another object: near misses do not count
    assert clicks_honoured(mask, [beside, diagonal], [1, 1]) == (0, 0)
    assert clicks_honoured(mask, [beside, edge_pixel], [1, 0]) == (0, 0)
    assert clicks_honoured(mask, [beside, [9, 9]], [1, 0]) == (0, 1)


def test_stability_score_is_the_share_of_the_soft_mask_that_is_sure():
    logits = np.full((8, 8), -5.0)
    logits[:4, :4] = 3.0  # 16 sure pixels
    logits[:4, 4:6] = 0.0  # 8 unsure ones
    assert stability_score(logits) == pytest.approx(16 / 24)
    assert stability_score(np.full((4, 4), -5.0)) == 1.0


def test_tight_box_runs_through_the_outer_pixel_edges():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:6] = True
    np.testing.assert_allclose(tight_box(mask), [1.5, 0.5, 5.5, 2.5])
    assert tight_box(np.zeros((3, 3), bool)) is None


# ----------------------------------------------------------------------------------------------
# A decoder of nested rectangles
# ----------------------------------------------------------------------------------------------
class RectangleModel:
    """Objects are rectangles (x0, y0, x1, y1 inclusive pixel indices). A box answers with the
    largest object it holds at least 90 % of (clipped to the box), its predicted IoU is the
    object's area over the box's area (a box that fits is confident), and its logits are sure
    inside the object and unsure over the rest of the box (so a loose box is unstable too)."""

    def __init__(self, shape, objects):
        self.shape = shape
        self.objects = objects
        self.calls = []

    def mask_of(self, rect):
        mask = np.zeros(self.shape, bool)
        mask[rect[1] : rect[3] + 1, rect[0] : rect[2] + 1] = True
        return mask

    def __call__(self, box):
        self.calls.append(np.asarray(box, dtype=float))
        inside = np.zeros(self.shape, bool)
        x0, y0, x1, y1 = box
        cols, rows = np.arange(self.shape[1]), np.arange(self.shape[0])
        inside[np.ix_((rows >= y0) & (rows <= y1), (cols >= x0) & (cols <= x1))] = True
        held = [
            o
            for o in self.objects
            if (self.mask_of(o) & inside).sum() >= 0.9 * self.mask_of(o).sum()
        ]
        mask = np.zeros(self.shape, bool)
        if held:
            mask = self.mask_of(max(held, key=lambda o: self.mask_of(o).sum())) & inside
        logits = np.where(inside, 0.0, -5.0)
        logits[mask] = 5.0
        iou = mask.sum() / max(1.0, float(inside.sum()))
        return mask, iou, logits, ("payload", len(self.calls))


def test_search_finds_the_object_under_the_click_and_reranks_the_best_three():
    small, large = (20, 20, 27, 27), (10, 10, 45, 45)  # a lesion inside an organ
    model = RectangleModel((80, 80), [small, large])
    found = search_box(model, [[23, 24]], [1], (80, 80), 1.0, half_sizes_mm=(2, 4, 12, 20, 30))
    assert len(model.calls) == 5 + RERANK  # one decode per box, one more for the best three
    best = found[0]
    assert np.array_equal(best.mask, model.mask_of(small))  # the tightest fit wins
    assert best.consistency == pytest.approx(1.0)
    assert [c.consistency is not None for c in found] == [True] * RERANK + [False] * 2
    assert best.payload[0] == "payload"
    scores = [c.score for c in found[:RERANK]]
    assert scores == sorted(scores, reverse=True)


def test_a_negative_click_steers_the_search_to_a_mask_that_leaves_it_out():
    small, large = (20, 20, 27, 27), (10, 10, 45, 45)
    model = RectangleModel((80, 80), [small, large])
    sizes = (2, 4, 12, 20, 30)
    # a positive click on the organ beside the lesion: the organ's box is the tight fit
    alone = search_box(model, [[15, 15]], [1], (80, 80), 1.0, half_sizes_mm=sizes)
    assert np.array_equal(alone[0].mask, model.mask_of(large))
    # a negative click on the organ far away: only the lesion-sized boxes leave it out
    steered = search_box(model, [[24, 24], [40, 40]], [1, 0], (80, 80), 1.0, half_sizes_mm=sizes)
    assert steered[0].honoured == (1, 1)
    assert np.array_equal(steered[0].mask, model.mask_of(small))


def test_a_click_on_the_edge_of_the_right_mask_keeps_it(monkeypatch):
    """Correction clicks land on one-pixel rims: a negative click on the organ's last pixel
    column must not hand the answer to a small part of the organ that happens to leave the
    click out. Counting the click's own pixel only (radius 0), it does."""
    import functools

    import SlicerSAM.box_search as box_search

    part, organ = (13, 13, 17, 17), (10, 10, 45, 45)
    clicks, labels = [[15, 15], [45, 30]], [1, 0]  # a positive in the organ, a negative on its edge

    def search():
        model = RectangleModel((80, 80), [part, organ])
        found = search_box(model, clicks, labels, (80, 80), 1.0, half_sizes_mm=(4, 12, 20, 31))
        return model, found[0]

    model, best = search()
    assert best.honoured == (1, 1)
    assert np.array_equal(best.mask, model.mask_of(organ))

    exact = functools.partial(box_search.clicks_honoured, tolerance=0)
    monkeypatch.setattr(box_search, "clicks_honoured", exact)
    model, best = search()
    assert np.array_equal(best.mask, model.mask_of(part))


def test_when_no_candidate_honours_every_click_the_most_honoured_come_first():
    model = RectangleModel((40, 40), [(5, 5, 30, 30)])
    found = search_box(model, [[10, 10], [12, 12]], [1, 0], (40, 40), 1.0, half_sizes_mm=(2, 25))
    # the negative click lies inside the only object: its masks honour the positive click only
    assert all(c.honoured in ((1, 0), (0, 1)) for c in found)
    assert [c.honoured for c in found] == sorted((c.honoured for c in found), reverse=True)
    assert found[0].honoured == (1, 0)


def test_negative_clicks_never_outvote_the_object_the_positive_clicks_are_on():
    """A leak the model cannot leave out gets clicked again and again (clicks-N puts the next
    click on the largest error, the same pixel): three negative clicks on the organ's inside
    must not hand the answer to an empty mask or a neighbour that leaves them out."""
    organ, neighbour = (10, 10, 30, 30), (34, 10, 50, 30)
    model = RectangleModel((60, 60), [organ, neighbour])
    clicks = [[20, 20], [25, 25], [25, 25], [25, 25]]
    found = search_box(model, clicks, [1, 0, 0, 0], (60, 60), 1.0, half_sizes_mm=(2, 12, 40))
    assert found[0].honoured == (1, 0)
    assert np.array_equal(found[0].mask, model.mask_of(organ))
    assert any(c.honoured == (0, 1) for c in found)  # masks that leave the organ out lose


def test_distinct_skips_candidates_that_repeat_a_kept_mask():
    model = RectangleModel((60, 60), [(20, 20, 27, 27), (10, 10, 45, 45)])
    found = search_box(model, [[23, 24]], [1], (60, 60), 1.0, half_sizes_mm=(5, 6, 7, 20, 30))
    kept = distinct(found, 3)
    masks = [c.mask for c in kept]
    assert len(kept) == 2  # two objects: the lesion (several boxes give it) and the organ
    assert not np.array_equal(masks[0], masks[1])
    assert len(distinct(found, 1)) == 1 and distinct(found, 1)[0] is found[0]


# ----------------------------------------------------------------------------------------------
# The segmenter's point_prompts mode
# ----------------------------------------------------------------------------------------------
def test_point_prompts_follow_the_model_spec(monkeypatch):
    import torch
    from synthetic import nifti_like_volume

    from sam_core.zoo import MODEL_SPECS
    from SlicerSAM.segmenter import Segmenter

    assert not MODEL_SPECS["litemedsam"].point_prompts
    assert not MODEL_SPECS["medsam_vit_b"].point_prompts
    assert all(MODEL_SPECS[n].point_prompts for n in ("sam_vit_b", "sam_vit_l", "sam_vit_h"))

    class Model(torch.nn.Module):
        def __init__(self, spec=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.checkpoint_sha256 = "x"
            if spec is not None:
                self.spec = spec

    monkeypatch.setattr(
        "sam_core.predictor.SamPredictor",
        lambda sam: type("P", (), {"device": torch.device("cpu")})(),
    )
    volume = nifti_like_volume(shape=(4, 8, 8))
    assert Segmenter(volume, Model(MODEL_SPECS["litemedsam"])).point_prompts == "box"
    assert Segmenter(volume, Model(MODEL_SPECS["sam_vit_b"])).point_prompts == "model"
    assert Segmenter(volume, Model()).point_prompts == "model"  # built in code: its own points
    seg = Segmenter(volume, Model(MODEL_SPECS["sam_vit_b"]), point_prompts="box")
    assert seg.point_prompts == "box"
    with pytest.raises(ValueError, match="point_prompts"):
        Segmenter(volume, Model(), point_prompts="points")


@pytest.fixture(scope="module")
def ct_segmenters(shared_data, litemedsam_checkpoint):
    from sam_core.zoo import load_model
    from SlicerSAM.cache import EmbeddingCache
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.segmenter import Segmenter
    from SlicerSAM.volume import load_volume

    folder = shared_data / "ct-abdomen-3mm"
    volume = load_volume(folder / "ct.nii.gz")
    labels = np.asarray(load_volume(folder / "labels.nii.gz").array)
    values = {name: int(v) for v, name in json.loads((folder / "labels.json").read_text()).items()}
    sam = load_model("litemedsam", litemedsam_checkpoint, device="cpu")
    cache = EmbeddingCache()
    make = dict(intensity=parse_intensity("40,400"), cache=cache)
    return (
        Segmenter(volume, sam, **make),
        Segmenter(volume, sam, point_prompts="model", **make),
        labels,
        values,
    )


@pytest.mark.slow
@pytest.mark.shared_data
def test_one_click_on_the_ct_gives_the_structure_with_the_searched_box(ct_segmenters):
    """One click at the most interior point of each structure's largest axial slice: the model's
    own point prompt returns next to nothing (measured: mean Dice 0.013 over these six), the
    searched box the structure (measured 0.845: spleen 0.81, right kidney 0.84, aorta 0.78,
    gallbladder 0.98, L2 0.77, stomach 0.89)."""
    from SlicerSAM.prompts import SlicePrompts
    from SlicerSAM.propagation import interior_point

    boxed, raw, labels, values = ct_segmenters
    assert boxed.point_prompts == "box" and raw.point_prompts == "model"
    plane = boxed.plane
    scores = {"box": [], "model": []}
    for name in ("spleen", "kidney_right", "aorta", "gallbladder", "vertebrae_L2", "stomach"):
        mask3d = labels == values[name]
        index = int(np.argmax([plane.grid(mask3d, k).sum() for k in range(plane.num_slices)]))
        ref = np.asarray(plane.grid(mask3d, index), bool)
        x, y = interior_point(ref)  # 3 mm isotropic: the model image is the grid
        prompts = SlicePrompts(index, points_xy=[[x, y]], point_labels=[1])
        for mode, seg in (("box", boxed), ("model", raw)):
            result = seg.segment(index, prompts)
            mask = result.mask
            scores[mode].append(2 * (mask & ref).sum() / (mask.sum() + ref.sum()))
            assert mask[int(y), int(x)] or mode == "model", name  # the click is in its mask
            if mode == "box":
                assert result.best == 0 and result.boxes_xyxy.shape == (len(result.masks), 4)
                box = result.boxes_xyxy[0]
                assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
    assert np.mean(scores["model"]) < 0.2, scores
    assert np.mean(scores["box"]) > 0.75, scores
    assert min(scores["box"]) > 0.5, scores


def test_a_negative_click_reuses_the_decodes_of_the_positive_ones(monkeypatch):
    """The candidates depend on the positive clicks only: adding a negative click re-ranks the
    same decodes instead of running the decoder again; moving the positive click decodes anew."""
    from synthetic import nifti_like_volume
    from test_segmenter import FakePredictor, StubSam

    from SlicerSAM.prompts import SlicePrompts
    from SlicerSAM.segmenter import Segmenter

    monkeypatch.setattr("sam_core.predictor.SamPredictor", FakePredictor)
    seg = Segmenter(nifti_like_volume(shape=(6, 60, 64)), StubSam(), point_prompts="box")
    calls = seg.predictor.calls
    one = SlicePrompts(2, points_xy=[[30, 30]], point_labels=[1])
    result = seg.segment(2, one)
    first = len(calls)
    assert first >= 3 and all(not c["multimask"] for c in calls)  # boxes, one mask each
    assert result.best == 0 and result.boxes_xyxy.shape == (len(result.masks), 4)
    assert seg.stats.decodes == first
    seg.segment(2, SlicePrompts(2, points_xy=[[30, 30], [5, 5]], point_labels=[1, 0]))
    assert len(calls) == first  # the same boxes: nothing decoded again
    seg.segment(2, SlicePrompts(2, points_xy=[[10, 40]], point_labels=[1]))
    assert len(calls) > first
    moved = len(calls)
    seg.segment(3, SlicePrompts(3, points_xy=[[30, 30]], point_labels=[1]))
    assert len(calls) == moved + first  # another slice: its own decodes
    # a box whose mask honours the clicks is decoded once: the clicks change nothing
    before = len(calls)
    seg.segment(2, SlicePrompts(2, points_xy=[[1, 1]], point_labels=[1], box_xyxy=[0, 0, 9, 9]))
    assert len(calls) == before + 1
