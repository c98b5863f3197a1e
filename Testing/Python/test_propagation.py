"""Propagation from key slices: stop rules, gap filling, re-runs, laziness, cancellation.

The segmenter here is a fake with the Segmenter interface (``plane``, ``volume``,
``segment(index, SlicePrompts, multimask) -> SliceResult``): it "segments" whatever reference
structure lies inside the prompt box, which behaves like a box-prompted SAM that happily follows a
box onto a neighbouring structure: exactly the leak that the stop rules must catch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from SlicerSAM.errors import Cancelled, PromptError
from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.propagation import (
    NO_STOP,
    STOP_TEXT,
    STRATEGIES,
    PropagationResult,
    PropagationStrategy,
    StopRules,
    box_of_mask,
    feature_similarity,
    interior_point,
    key_roi,
    propagate,
)
from SlicerSAM.segmenter import SliceResult
from SlicerSAM.slicing import plane_for
from SlicerSAM.volume import Volume

SHAPE = (30, 48, 56)  # (K, J, I)


def _volume(labels: np.ndarray, hu=None) -> Volume:
    """A CT-like volume: 3 mm voxels, RAS-aligned, intensities from the labels."""
    hu = hu or {0: -80.0, 1: 60.0, 2: 300.0}
    array = np.zeros(labels.shape, dtype=np.int16)
    for value, level in hu.items():
        array[labels == value] = level
    rng = np.random.default_rng(0)
    array = array + rng.normal(0, 5, labels.shape).astype(np.int16)
    return Volume(array, np.diag([3.0, 3.0, 3.0, 1.0]))


def organ_labels(first=8, last=19, neighbour=True) -> np.ndarray:
    """Label 1: an ellipsoid-ish organ on slices first..last whose cross-section grows then shrinks
    (radius 4..9 px); label 2: a long cylinder right next to it on every slice (a vertebral
    column beside a kidney)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    jj, ii = np.mgrid[: SHAPE[1], : SHAPE[2]]
    middle = (first + last) / 2.0
    half = (last - first) / 2.0 + 0.5
    for k in range(first, last + 1):
        radius = 4.0 + 5.0 * np.sqrt(max(0.0, 1.0 - ((k - middle) / half) ** 2))
        labels[k][(jj - 24) ** 2 + (ii - 22) ** 2 <= radius**2] = 1
    if neighbour:
        for k in range(SHAPE[0]):
            labels[k][((jj - 24) ** 2 + (ii - 38) ** 2 <= 5.5**2) & (labels[k] == 0)] = 2
    return labels


class FakeSegmenter:
    """Box -> every labelled voxel of the slice whose centre lies inside the box; a point -> the
    connected structure under it. Records encodes and calls."""

    def __init__(self, labels: np.ndarray, volume: Volume = None, iou=0.9):
        self.labels = labels
        self.volume = volume if volume is not None else _volume(labels)
        self.plane = plane_for(self.volume, "axial")
        self.encoded = []
        self.calls = []
        self.iou = iou
        self.model_name = "fake"
        self.device = "cpu"

    def embedding(self, index):
        if index not in self.encoded:
            self.encoded.append(index)
        return index

    def timing(self):
        return {
            "slices_encoded": len(self.encoded),
            "encode_ms_per_slice": 0.0,
            "decode_ms_per_prompt": 0.0,
        }

    def segment(self, index, prompts: SlicePrompts, multimask=None):
        assert isinstance(prompts, SlicePrompts) and prompts.index == index
        self.embedding(index)
        self.calls.append(index)
        grid = np.asarray(self.plane.grid(self.labels, index))
        rows, cols = grid.shape
        yy, xx = np.mgrid[:rows, :cols]  # square pixels: model image == grid
        mask = grid > 0
        if prompts.box_xyxy is not None:
            x0, y0, x1, y1 = prompts.box_xyxy
            mask = mask & (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        if prompts.points_xy is not None:
            from scipy import ndimage

            comp, _ = ndimage.label(grid > 0)
            x, y = np.round(prompts.points_xy[0]).astype(int)
            mask = mask & (comp == comp[y, x]) if comp[y, x] else np.zeros_like(mask)
        iou = self.iou(index) if callable(self.iou) else self.iou
        return SliceResult(
            index=index,
            masks=mask[None],
            iou=np.array([iou if mask.any() else 0.1], dtype=np.float32),
            best=0,
            low_res_logits=np.zeros((1, 256, 256), dtype=np.float32),
        )


class ScriptedSegmenter(FakeSegmenter):
    """Returns a given mask per slice, whatever the prompt."""

    def __init__(self, masks: dict, labels: np.ndarray):
        super().__init__(labels)
        self.masks = masks

    def segment(self, index, prompts, multimask=None):
        self.embedding(index)
        self.calls.append(index)
        mask = self.masks.get(index, np.zeros(self.plane.grid_shape, dtype=bool))
        return SliceResult(index, mask[None], np.array([0.9]), 0, np.zeros((1, 256, 256)))


class FeatureSegmenter(FakeSegmenter):
    """The fake, plus ``mask_features``: what the image encoder "sees" under a mask, scripted per
    slice. Neighbouring slices point almost the same way (cosine 0.98); a "disc" slice between
    two look-alike vertebrae points partly elsewhere (cosine about 0.84 to either side)."""

    def __init__(self, labels, disc=None, cells_per_pixel=1.0, **kwargs):
        super().__init__(labels, **kwargs)
        self.disc = disc
        self.cells_per_pixel = cells_per_pixel
        self.feature_calls = []

    def mask_features(self, index, mask):
        assert mask.shape == tuple(self.plane.grid_shape) and mask.dtype == bool
        self.feature_calls.append(index)
        if not mask.any():
            return None
        v = np.zeros(8, dtype=np.float32)
        v[0], v[1] = np.cos(0.2 * index), np.sin(0.2 * index)
        if index == self.disc:
            v[2] = 0.6
        return v, float(mask.sum()) * self.cells_per_pixel


def _column_labels() -> np.ndarray:
    """Label 2 only: a cylinder on every slice (a spine whose vertebrae look the same)."""
    labels = organ_labels()
    labels[labels == 1] = 0
    return labels


def _grid(labels, k, value=1):
    return np.asarray(plane_for(_volume(labels)).grid(labels == value, k)).copy()


def _key_prompt(seg, labels, k):
    return SlicePrompts(k, box_xyxy=box_of_mask(seg.plane, _grid(labels, k)))


# ----------------------------------------------------------------------------------------------
def test_propagation_stops_when_overlap_drops():
    labels = organ_labels(neighbour=False)
    plane = plane_for(_volume(labels))
    disc = _grid(labels, 14)
    moved = np.roll(disc, 12, axis=1)  # same size, no overlap with the previous slice
    masks = {k: disc for k in range(10, 17)}
    masks.update({k: moved for k in range(17, 30)})
    seg = ScriptedSegmenter(masks, labels)
    rules = StopRules(min_overlap=0.5, min_iou=None, min_area_fraction=None, patience=1)
    result = propagate(seg, {14: disc}, direction="up", stop=rules)
    assert result.stop_reasons == {"up": "overlap"}
    assert sorted(result.masks) == [14, 15, 16]  # slice 17 failed and was dropped
    # the key slice is decoded only to calibrate the margin; the walk visits 15, 16, 17
    assert seg.calls[-3:] == [15, 16, 17] and set(seg.calls[:-3]) == {14}
    assert plane.num_slices == SHAPE[0]


def test_hysteresis_keeps_a_single_bad_slice_and_drops_confirmed_failures():
    labels = organ_labels(neighbour=False)
    disc = _grid(labels, 14)
    moved = np.roll(disc, 12, axis=1)
    rules = StopRules(min_overlap=0.5, min_iou=None, min_area_fraction=None, patience=2)
    # a jump that lasts: 17 fails (no overlap with 16); 18 overlaps 17 perfectly but is judged
    # against the last accepted slice, 16, so it fails too: two in a row -> stop, drop both
    masks = {k: disc for k in range(10, 17)}
    masks.update({k: moved for k in range(17, 30)})
    seg = ScriptedSegmenter(masks, labels)
    result = propagate(seg, {14: disc}, direction="up", stop=rules)
    assert result.stop_reasons["up"] == "overlap"
    assert max(result.masks) == 16
    # one outlier slice, then back where it was: kept with patience 2
    masks2 = {k: disc for k in range(10, 30)}
    masks2[17] = moved
    seg2 = ScriptedSegmenter(masks2, labels)
    result2 = propagate(seg2, {14: disc}, direction="up", stop=rules, slice_range=(0, 20))
    assert 17 in result2.masks and 20 in result2.masks
    assert result2.stop_reasons["up"] == "end"
    # the same lasting jump with patience 1 stops at 17
    rules1 = replace(rules, patience=1)
    result3 = propagate(ScriptedSegmenter(masks, labels), {14: disc}, "up", stop=rules1)
    assert max(result3.masks) == 16 and result3.stop_reasons["up"] == "overlap"


def test_a_dip_in_feature_similarity_stops_the_walk_between_look_alike_neighbours():
    """The box follows the column from one vertebra into the next (same size, same place, the
    model confident throughout): only the encoder's view of the disc between them tells."""
    labels = _column_labels()
    seg = FeatureSegmenter(labels, disc=15)
    key = {8: SlicePrompts(8, box_xyxy=box_of_mask(seg.plane, _grid(labels, 8, 2)))}
    result = propagate(seg, key, direction="up")
    # slice 15 (the disc) and 16 fail the rule in a row: a confirmed stop, both dropped
    assert result.stop_reasons == {"up": "features"}
    assert sorted(result.masks) == list(range(8, 15))
    assert result.summary() == (
        "slices 8-14 (7); up: the tissue under the mask changed (a look-alike neighbour?)"
    )
    for k, mask in result.masks.items():
        assert np.array_equal(mask, _grid(labels, k, 2))
    # the rule is what stopped it: without it the walk goes on to the volume's end
    loose = propagate(seg, key, direction="up", stop=StopRules(max_feature_drop=None))
    assert loose.stop_reasons == {"up": "end"} and max(loose.masks) == SHAPE[0] - 1
    # no disc: the slow drift of the features (0.98 per slice) never fails it
    smooth = propagate(FeatureSegmenter(labels), key, direction="up")
    assert smooth.stop_reasons == {"up": "end"}
    # a cross-section covering fewer embedding cells than feature_min_cells is not compared
    # (the column is 97 pixels: 24 cells at a quarter of a cell per pixel, 23.3 below that)
    assert propagate(FeatureSegmenter(labels, 15, 0.25), key, direction="up").stop_reasons == {
        "up": "features"
    }
    tiny = propagate(FeatureSegmenter(labels, 15, 0.24), key, direction="up")
    assert tiny.stop_reasons == {"up": "end"}


def test_feature_rule_thresholds_and_segmenters_without_features():
    rules = StopRules(max_feature_drop=0.06)
    mask = np.ones((4, 4), dtype=bool)
    assert rules.failures(mask, mask, 0.9, 16, similarity=0.90, typical=0.97) == ["features"]
    v = np.array([1.0, 0.0], dtype=np.float32)
    w = np.array([1.0, 1.0], dtype=np.float32)
    assert feature_similarity((v, 30.0), (w, 24.0), rules) == pytest.approx(np.sqrt(0.5))
    assert feature_similarity((v, 30.0), (w, 23.9), rules) is None  # too few cells to judge
    assert rules.failures(mask, mask, 0.9, 16, similarity=0.92, typical=0.97) == []
    assert rules.failures(mask, mask, 0.9, 16, similarity=0.5, typical=None) == []  # first step
    assert rules.failures(mask, mask, 0.9, 16, similarity=None, typical=0.97) == []
    assert StopRules(max_feature_drop=None).failures(mask, mask, 0.9, 16, 0.1, 0.97) == []
    # a segmenter without mask_features (FakeSegmenter) walks as before; with the rule off the
    # features are not even asked for
    labels = _column_labels()
    seg = FeatureSegmenter(labels, disc=15)
    key = {8: SlicePrompts(8, box_xyxy=box_of_mask(seg.plane, _grid(labels, 8, 2)))}
    propagate(seg, key, direction="up", stop=StopRules(max_feature_drop=None))
    assert seg.feature_calls == []
    plain = FakeSegmenter(labels)
    assert propagate(plain, key, direction="up").stop_reasons == {"up": "end"}


def test_every_stop_reason_has_words_for_the_user():
    rules = StopRules(growth_limit=1.5, max_feature_drop=0.06)
    empty, small, big = (np.zeros((8, 8), bool), np.zeros((8, 8), bool), np.ones((8, 8), bool))
    small[0, :2] = True
    reasons = set(rules.failures(empty, big, 0.1, 64, similarity=0.5, typical=0.97))
    reasons |= set(rules.failures(big, small, 0.9, 4))  # grew 32-fold
    reasons |= set(StopRules(max_area_factor=2.0).failures(big, big, 0.9, 4))
    assert reasons == {"empty", "area", "iou", "overlap", "growth", "features"}
    assert reasons | {"end", "met", "max_slices"} <= set(STOP_TEXT) | {"met"}
    # walks that met the other key's walk are not worth a word; an empty result says so
    met = PropagationResult({3: big, 4: big}, {"3-4 up": "met", "down": "end"})
    assert met.summary() == "slices 3-4 (2); down: end of the range"
    assert (
        PropagationResult({}, {"up": "iou"}).summary() == "no slice; up: the model lost confidence"
    )


def test_propagation_does_not_leak_past_the_end_of_a_synthetic_organ():
    labels = organ_labels(first=8, last=19)
    seg = FakeSegmenter(labels)
    result = propagate(seg, {14: _key_prompt(seg, labels, 14)})
    assert min(result.masks) == 8 and max(result.masks) == 19, sorted(result.masks)
    for k, mask in result.masks.items():
        assert not (mask & (_grid(labels, k, 2))).any(), f"slice {k} leaked into the neighbour"
        truth = _grid(labels, k)
        # the intensity-guided box may miss a noisy border pixel: near-exact, not exact
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.97
    assert result.stop_reasons["up"] != "end" and result.stop_reasons["down"] != "end"
    # it looked at most patience (2) slices past each end
    assert max(seg.encoded) <= 21 and min(seg.encoded) >= 6


def test_without_stop_rules_the_fake_model_leaks():
    """The leak test above is not vacuous: with the rules off the fake does walk onto the
    neighbour (a box from a tiny organ tip that touches it)."""
    labels = organ_labels(first=8, last=19)
    labels[20][
        (labels[20] == 0)
        & (np.abs(np.mgrid[:48, :56][1] - 30) < 6)
        & (np.abs(np.mgrid[:48, :56][0] - 24) < 3)
    ] = 2
    seg = FakeSegmenter(labels)
    strategy = PropagationStrategy(margin=3.0, grow_radius=0.0)
    result = propagate(seg, {14: _key_prompt(seg, labels, 14)}, strategy=strategy, stop=NO_STOP)
    assert max(result.masks) > 19


def test_gaps_between_two_key_slices_are_filled_from_both_ends():
    labels = organ_labels(first=5, last=24)
    seg = FakeSegmenter(labels)
    keys = {8: _grid(labels, 8), 20: _grid(labels, 20)}
    result = propagate(seg, keys)
    for k in range(5, 25):
        assert k in result.masks
        np.testing.assert_array_equal(result.masks[k], _grid(labels, k))
    assert result.stop_reasons["8-20 up"] == "met"
    assert result.stop_reasons["8-20 down"] == "met"
    gap_visits = [k for k in result.visited if 8 < k < 20]
    # each side covers its half: 9..14 from below, 15..19 from above, nothing twice
    assert sorted(gap_visits) == list(range(9, 20))
    assert gap_visits.index(9) < gap_visits.index(14) and gap_visits.index(19) < gap_visits.index(
        15
    )


def test_gap_walk_continues_past_the_middle_when_the_other_side_stops():
    labels = organ_labels(first=5, last=24, neighbour=False)
    lower = labels.copy()
    lower[10:14] = 0  # the structure is absent on 10..13: the lower key's walk stops at once
    seg = FakeSegmenter(lower)
    keys = {8: _grid(lower, 8), 20: _grid(lower, 20)}
    result = propagate(seg, keys)
    assert result.stop_reasons["8-20 up"] in ("empty", "area", "iou")
    for k in range(14, 20):  # the walk from 20 goes past the middle (14) down to 14
        assert k in result.masks


def test_rerun_from_a_corrected_slice_recomputes_only_the_affected_part():
    labels = organ_labels(first=3, last=26)
    seg = FakeSegmenter(labels)
    keys = {8: _grid(labels, 8), 14: _grid(labels, 14), 20: _grid(labels, 20)}
    first = propagate(seg, keys)
    assert min(first.masks) == 3 and max(first.masks) == 26
    corrected = _grid(labels, 20).copy()
    cols = np.flatnonzero(corrected.any(axis=0))
    corrected[:, : cols[len(cols) // 2]] = False  # the user trimmed slice 20
    assert corrected.any() and not np.array_equal(corrected, first.masks[20])
    seg.calls.clear()
    seg.encoded.clear()
    again = propagate(seg, {**keys, 20: corrected}, existing=first.masks)
    # only the gap 14-20 and the extension above 20 were visited (key 14 itself is decoded to
    # calibrate the walk that starts there); nothing below 14
    assert min(again.visited) == 14, again.visited
    assert set(again.visited) >= {19, 21}
    for k in range(3, 15):
        np.testing.assert_array_equal(again.masks[k], first.masks[k])
    np.testing.assert_array_equal(again.masks[20], corrected)
    # nothing changed: nothing is recomputed
    seg.calls.clear()
    same = propagate(seg, {**keys, 20: corrected}, existing=again.masks)
    assert same.visited == [] and seg.calls == []
    assert sorted(same.masks) == sorted(again.masks)


def test_cancellation_raises_cancelled_and_returns_nothing():
    labels = organ_labels()
    seg = FakeSegmenter(labels)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled):
        propagate(seg, {14: _grid(labels, 14)}, cancel=cancel)
    # cancelled before anything: no slice touched
    seg2 = FakeSegmenter(labels)
    with pytest.raises(Cancelled):
        propagate(seg2, {14: _grid(labels, 14)}, cancel=lambda: True)
    assert seg2.calls == [] and seg2.encoded == []


def test_only_visited_slices_are_encoded():
    labels = organ_labels(first=8, last=19)
    seg = FakeSegmenter(labels)
    result = propagate(seg, {14: _key_prompt(seg, labels, 14)})
    assert sorted(seg.encoded) == sorted(set(result.visited))
    assert len(seg.encoded) < SHAPE[0] // 2 + 2  # far from all 30 slices
    assert 0 not in seg.encoded and SHAPE[0] - 1 not in seg.encoded


def test_progress_is_reported_and_ends_complete():
    labels = organ_labels()
    seg = FakeSegmenter(labels)
    seen = []
    propagate(seg, {14: _grid(labels, 14)}, progress=lambda d, t, m: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(0 <= d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_direction_slice_range_and_max_slices():
    labels = organ_labels(first=2, last=27, neighbour=False)
    seg = FakeSegmenter(labels)
    key = {14: _grid(labels, 14)}
    up = propagate(seg, key, direction="up", stop=NO_STOP)
    assert min(up.masks) == 14 and max(up.masks) == 27 and "down" not in up.stop_reasons
    down = propagate(seg, key, direction="down", stop=NO_STOP)
    assert max(down.masks) == 14 and min(down.masks) == 2
    ranged = propagate(seg, key, slice_range=(10, 17))
    assert sorted(ranged.masks) == list(range(10, 18))
    assert ranged.stop_reasons == {"down": "end", "up": "end"}
    assert all(10 <= k <= 17 for k in ranged.visited)
    limited = propagate(seg, key, stop=StopRules(max_slices=3))
    assert sorted(limited.masks) == list(range(11, 18))
    assert limited.stop_reasons == {"down": "max_slices", "up": "max_slices"}


def test_vanishing_area_and_low_iou_stop_the_walk():
    labels = organ_labels(first=2, last=27, neighbour=False)
    seg = FakeSegmenter(labels, iou=lambda k: 0.9 if k < 20 else 0.3)
    result = propagate(seg, {14: _grid(labels, 14)}, direction="up")
    assert max(result.masks) == 19 and result.stop_reasons["up"] == "iou"
    shrinking = organ_labels(first=2, last=27, neighbour=False)
    shrinking[22:] = 0
    shrinking[22][24, 22] = 1  # a one-pixel tip: below min_pixels
    seg2 = FakeSegmenter(shrinking)
    result2 = propagate(seg2, {14: _grid(shrinking, 14)}, direction="up")
    assert max(result2.masks) == 21


def test_box_calibration_reads_the_models_shrink_off_the_key_box():
    labels = organ_labels(first=2, last=27, neighbour=False)
    seg = FakeSegmenter(labels)
    truth = _grid(labels, 14)
    box = box_of_mask(seg.plane, truth)
    # a user box 2 px larger than the organ on every side: the fake returns the organ, which
    # "falls short" of the box by 2 px; the calibrated margin must then be +2 on every side
    big = SlicePrompts(14, box_xyxy=box + np.array([-2, -2, 2, 2], dtype=np.float32))
    prompts_seen = []
    original = seg.segment

    def spy(index, prompts, multimask=None):
        prompts_seen.append((index, prompts.box_xyxy.copy()))
        return original(index, prompts, multimask)

    seg.segment = spy
    propagate(seg, {14: big}, direction="up", slice_range=(14, 15))
    (_, key_box), (_, next_box) = prompts_seen
    tight_15 = box_of_mask(seg.plane, _grid(labels, 15))
    np.testing.assert_allclose(next_box, tight_15 + np.array([-2, -2, 2, 2]), atol=1e-4)


def test_propagation_is_deterministic():
    labels = organ_labels()
    a = propagate(FakeSegmenter(labels), {14: _grid(labels, 14)})
    b = propagate(FakeSegmenter(labels), {14: _grid(labels, 14)})
    assert a.visited == b.visited and a.stop_reasons == b.stop_reasons
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_named_strategy_runs(name):
    labels = organ_labels(neighbour=False)
    seg = FakeSegmenter(labels)
    key = _key_prompt(seg, labels, 14) if STRATEGIES[name].box else _grid(labels, 14)
    result = propagate(seg, {14: key}, strategy=name, slice_range=(11, 17))
    assert 14 in result.masks and len(result.masks) >= 3


def test_bad_inputs_are_clear_errors():
    labels = organ_labels()
    seg = FakeSegmenter(labels)
    with pytest.raises(PromptError, match="at least one key"):
        propagate(seg, {})
    with pytest.raises(PromptError, match="outside the volume"):
        propagate(seg, {40: _grid(labels, 14)})
    with pytest.raises(PromptError, match="empty"):
        propagate(seg, {3: np.zeros(seg.plane.grid_shape, dtype=bool)})
    with pytest.raises(PromptError, match="grid"):
        propagate(seg, {14: np.ones((3, 3), dtype=bool)})
    with pytest.raises(ValueError, match="direction"):
        propagate(seg, {14: _grid(labels, 14)}, direction="sideways")
    with pytest.raises(ValueError, match="strategy"):
        propagate(seg, {14: _grid(labels, 14)}, strategy="magic")
    with pytest.raises(PromptError, match="slice range"):
        propagate(seg, {14: _grid(labels, 14)}, slice_range=(0, 5))


def test_box_of_mask_uses_pixel_edges_and_interior_point_is_the_distance_maximum():
    labels = organ_labels(neighbour=False)
    plane = plane_for(_volume(labels))
    mask = np.zeros(plane.grid_shape, dtype=bool)
    mask[10:15, 20:31] = True  # rows 10..14, cols 20..30
    np.testing.assert_allclose(box_of_mask(plane, mask), [19.5, 9.5, 30.5, 14.5])
    np.testing.assert_allclose(box_of_mask(plane, mask, margin=1), [18.5, 8.5, 31.5, 15.5])
    assert box_of_mask(plane, np.zeros_like(mask)) is None
    x, y = interior_point(mask)
    assert (x, y) == (25.0, 12.0)


def _bench_stop_rules():
    """Testing/benchmarks/bench_stop_rules.py as a module (it is a script, not a package)."""
    import importlib.util

    from conftest import ROOT

    path = ROOT / "Testing" / "benchmarks" / "bench_stop_rules.py"
    spec = importlib.util.spec_from_file_location("bench_stop_rules", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _recorded_walk(bench, seg, prompts, key, refs):
    """(walk as bench_stop_rules.record_walks keeps it, the recorder): ``propagate`` from
    ``prompts`` without stop rules, recorded by the benchmark's _Recorder."""
    recorder = bench._Recorder(seg)
    propagate(recorder, prompts, stop=NO_STOP)
    calls = recorder.calls
    down = [c for c in calls[1:] if c[0] < key]
    up = [c for c in calls[1:] if c[0] > key]
    return (calls[0], down, up, refs), recorder


def test_stop_rule_replay_of_the_benchmark_matches_propagate():
    """Testing/benchmarks/bench_stop_rules.py replays stop rules on a walk recorded without them;
    docs/propagation.md relies on the replay giving exactly what propagate() gives."""
    bench = _bench_stop_rules()

    labels = organ_labels(first=6, last=22)
    dips = {9: 0.5, 10: 0.6, 12: 0.5, 18: 0.65, 20: 0.4, 21: 0.5}  # single and confirmed failures
    seg = FakeSegmenter(labels, iou=lambda k: dips.get(k, 0.9))
    key = 14
    prompts = {key: _key_prompt(seg, labels, key)}
    refs = {k: _grid(labels, k) for k in range(SHAPE[0])}
    walk, _ = _recorded_walk(bench, seg, prompts, key, refs)
    assert walk[1] and walk[2]
    rule_sets = (
        StopRules(),
        StopRules(min_iou=0.7, patience=1),
        StopRules(min_iou=0.55, patience=2, min_overlap=None),
        StopRules(min_iou=0.7, patience=3, min_area_fraction=0.5),
    )
    for rules in rule_sets:
        expected = propagate(seg, prompts, stop=rules).masks
        replayed = bench.replay(walk, rules)
        assert sorted(replayed) == sorted(expected), rules
        for k in expected:
            np.testing.assert_array_equal(replayed[k], expected[k])

    # the feature-similarity rule: a column with discs on both sides of the key, IoU dips too
    labels = _column_labels()
    seg = FeatureSegmenter(labels, disc=None, iou=lambda k: dips.get(k, 0.9))
    seg.mask_features = _disc_features(seg.mask_features, discs=(4, 19, 24))
    prompts = {key: SlicePrompts(key, box_xyxy=box_of_mask(seg.plane, _grid(labels, key, 2)))}
    refs = {k: _grid(labels, k, 2) for k in range(SHAPE[0])}
    walk, _ = _recorded_walk(bench, seg, prompts, key, refs)
    stops = set()
    for rules in rule_sets + (
        StopRules(max_feature_drop=0.2, patience=1),
        StopRules(max_feature_drop=0.1, min_iou=None, patience=1),
    ):
        result = propagate(seg, prompts, stop=rules)
        stops.update(result.stop_reasons.values())
        replayed = bench.replay(walk, rules)
        assert sorted(replayed) == sorted(result.masks), rules
        for k in result.masks:
            np.testing.assert_array_equal(replayed[k], result.masks[k])
    assert "features" in stops and "iou" in stops  # both kinds of stop were replayed


def test_best_cut_of_the_benchmark_keeps_the_prefixes_with_the_highest_dice():
    """bench_stop_rules.best_cut (the stop-rule oracle docs/propagation.md quotes) keeps, in each
    direction, the prefix of the walk that maximises the 3D Dice: checked against every pair of
    prefixes on a hand-made walk that leaks on both sides."""
    import itertools

    bench = _bench_stop_rules()

    def square(r, c, size=4):
        m = np.zeros((20, 20), dtype=bool)
        m[r : r + size, c : c + size] = True
        return m

    empty = np.zeros((20, 20), dtype=bool)
    refs = {k: (square(5, 5) if 3 <= k <= 7 else empty) for k in range(10)}

    def call(index, mask):  # as _Recorder keeps them: (index, mask, predicted IoU, features)
        return index, mask, 0.9, None

    key = call(5, square(5, 5))
    down = [call(4, square(5, 5)), call(3, square(5, 6)), call(2, square(5, 5))]
    down.append(call(1, square(9, 9)))  # slices 2 and 1 lie beyond the reference: leaks
    up = [call(6, square(5, 5)), call(7, square(7, 7)), call(8, square(12, 12))]
    walk = (key, down, up, refs)

    def naive(n_down, n_up):
        masks = {5: key[1]}
        masks.update({c[0]: c[1] for c in down[:n_down] + up[:n_up]})
        return bench.dice3d(masks, refs)

    scores = {(d, u): naive(d, u) for d, u in itertools.product(range(5), range(4))}
    best = max(scores.values())
    cut = bench.best_cut(walk)
    assert bench.dice3d(cut, refs) == pytest.approx(best)
    assert sorted(cut) == [3, 4, 5, 6]  # slice 7 overlaps its reference by a quarter: dropped
    assert best > naive(2, 2) > naive(4, 3)  # the leaks and the poor slice cost
    assert bench.dice3d(bench.cut_at_reference_extent(walk), refs) <= best


def test_candidate_logit_signals_of_the_benchmark():
    """bench_stop_rules measures two candidate stop signals docs/propagation.md reports: SAM's
    stability score and a boundary width. On cones of logits (falling ``slope`` per pixel from
    ``peak`` at the centre) the width is the distance from logit +1 to -1 (2 / slope pixels, up
    to the outline's digital length) whatever the mask's size, while the stability score falls
    for smaller masks. A rule given to ``replay`` as ``extra`` acts like the same StopRules rule."""
    bench = _bench_stop_rules()

    yy, xx = np.mgrid[0:256, 0:256]
    radius = np.hypot(yy - 128.0, xx - 128.0)

    def cone(peak, slope):
        return (peak - slope * radius).astype(np.float32)

    stab_big, width_big = bench.logit_signals(cone(40.0, 1.0))  # mask radius 40 px
    stab_small, width_small = bench.logit_signals(cone(10.0, 1.0))  # 10 px
    _, width_steep = bench.logit_signals(cone(40.0, 2.0))
    assert stab_big == pytest.approx((39.0 / 41.0) ** 2, abs=0.01)
    assert stab_small == pytest.approx((9.0 / 11.0) ** 2, abs=0.03)
    assert 1.8 < width_big < 2.6 and width_small == pytest.approx(width_big, rel=0.1)
    assert width_steep == pytest.approx(width_big / 2.0, rel=0.1)
    assert bench.logit_signals(np.full((256, 256), -5.0, dtype=np.float32)) == (1.0, 0.0)

    # replay's extra rule: "predicted IoU below 0.7" given as a predicate equals min_iou=0.7
    labels = organ_labels(first=6, last=22)
    dips = {9: 0.5, 10: 0.6, 12: 0.5, 18: 0.65, 20: 0.4, 21: 0.5}
    seg = FakeSegmenter(labels, iou=lambda k: dips.get(k, 0.9))
    key = 14
    prompts = {key: _key_prompt(seg, labels, key)}
    refs = {k: _grid(labels, k) for k in range(SHAPE[0])}
    walk, recorder = _recorded_walk(bench, seg, prompts, key, refs)
    as_rule = bench.replay(walk, StopRules(min_iou=0.7))
    as_extra = bench.replay(walk, StopRules(min_iou=None), extra=lambda i, m, iou: iou < 0.7)
    assert sorted(as_extra) == sorted(as_rule) != sorted(bench.replay(walk, NO_STOP))
    assert set(recorder.signals) == {c[0] for c in recorder.calls}  # one (stability, width) each


def _disc_features(features, discs):
    """Wrap a FeatureSegmenter's mask_features: the slices in ``discs`` look different."""

    def wrapped(index, mask):
        result = features(index, mask)
        if result is not None and index in discs:
            v = result[0].copy()
            v[2] = 0.6
            result = (v, result[1])
        return result

    return wrapped


def _drifting_tube(first=6, last=22, key=14, shift=0.6, radius=2.2):
    """Label 1: a thin tube (about 5 px = 15 mm across) crossing slices first..last whose centre
    moves ``shift`` px per slice along x (an aorta or spinal cord drifting in-plane)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    jj, ii = np.mgrid[: SHAPE[1], : SHAPE[2]]
    for k in range(first, last + 1):
        cx = 24.0 + shift * (k - key)
        labels[k][(jj - 24) ** 2 + (ii - cx) ** 2 <= radius**2] = 1
    return labels


def test_key_roi_grows_by_a_quarter_of_the_key_box_and_at_least_the_floor_in_mm():
    plane = plane_for(_volume(organ_labels()))  # 3 mm pixels
    key = np.zeros(plane.image_shape, dtype=bool)
    key[20:24, 10:50] = True  # 40 px wide, 4 px high: box x 9.5..49.5, y 19.5..23.5 (pixel edges)
    default = STRATEGIES["adaptive"]
    # x: 25 % of 40 px = 10 px; y: 25 % of 4 px = 1 px, raised to 15 mm / 3 mm = 5 px; + 1 px
    assert np.allclose(key_roi(plane, key, default), [9.5 - 11, 19.5 - 6, 49.5 + 11, 23.5 + 6])
    no_floor = PropagationStrategy(key_roi_min_mm=None)
    assert np.allclose(key_roi(plane, key, no_floor), [9.5 - 11, 19.5 - 2, 49.5 + 11, 23.5 + 2])
    assert key_roi(plane, key, PropagationStrategy(key_roi=None)) is None
    assert key_roi(plane, np.zeros_like(key), default) is None
    # the floor is in mm: with 1.5 mm pixels, 15 mm is 10 px
    fine = Volume(np.zeros((4, 40, 40), dtype=np.int16), np.diag([1.5, 1.5, 3.0, 1.0]))
    fine_plane = plane_for(fine)
    small = np.zeros(fine_plane.image_shape, dtype=bool)
    small[10:12, 10:12] = True
    assert np.allclose(
        key_roi(fine_plane, small, default), [9.5 - 11, 9.5 - 11, 11.5 + 11, 11.5 + 11]
    )


def test_a_small_drifting_tube_is_followed_within_the_key_roi_floor():
    labels = _drifting_tube()

    def dice_per_slice(strategy):
        seg = FakeSegmenter(labels)
        result = propagate(seg, {14: _key_prompt(seg, labels, 14)}, strategy=strategy)
        return {
            k: 2 * (m & _grid(labels, k)).sum() / (m.sum() + _grid(labels, k).sum())
            for k, m in result.masks.items()
        }

    followed = dice_per_slice(STRATEGIES["adaptive"])
    assert sorted(followed) == list(range(6, 23))
    assert min(followed.values()) > 0.9
    # with a quarter of its size (about a pixel) as room, the box cuts the tube off further out
    clipped = dice_per_slice(replace(STRATEGIES["adaptive"], key_roi_min_mm=None))
    assert sum(1 for k in range(6, 23) if clipped.get(k, 0.0) < 0.8) >= 4
