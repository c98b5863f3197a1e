"""Benchmark protocols generate the documented prompts on hand-made label volumes."""

from __future__ import annotations

import numpy as np
import pytest
from test_propagation import FakeSegmenter, organ_labels

from SlicerSAM import protocols as P
from SlicerSAM.slicing import plane_for
from SlicerSAM.volume import Volume

SHAPE = (12, 20, 24)  # (K, J, I)


def _plane(shape=SHAPE):
    return plane_for(Volume(np.zeros(shape, dtype=np.int16), np.diag([2.0, 2.0, 2.0, 1.0])))


def _recorder(seg):
    seen = []
    original = seg.segment

    def spy(index, prompts, multimask=None, **kwargs):
        seen.append((index, prompts, multimask))
        return original(index, prompts, multimask)

    seg.segment = spy
    return seen


def test_parse_protocol_names():
    assert P.parse_protocol("box-per-slice").kind == "box-per-slice"
    clicks = P.parse_protocol("clicks-5")
    assert (clicks.kind, clicks.clicks, clicks.name) == ("clicks-N", 5, "clicks-5")
    for bad in ("clicks-0", "clicks-N", "boxes", "clicks-x"):
        with pytest.raises(ValueError):
            P.parse_protocol(bad)


def test_select_structures_applies_min_voxels_and_names():
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[:5] = 3  # 5 * 20 * 24 = 2400 voxels
    ref[6, :2, :2] = 7  # 4 voxels
    assert P.select_structures(ref, {3: "liver", 7: "tiny"}, 200) == [(3, "liver", 2400)]
    assert P.select_structures(ref, None, 1) == [(3, "label_3", 2400), (7, "label_7", 4)]
    assert P.select_structures(ref, {7: "tiny"}, 1) == [(7, "tiny", 4)]


def test_box_on_the_largest_slice_and_interior_point():
    plane = _plane()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3, 5:8, 4:9] = True  # 15 voxels
    mask[6, 2:12, 3:15] = True  # 120 voxels: the largest slice
    mask[6, 2:5, 15:20] = True  # an appendix: the interior point stays in the thick part
    mask[8, 4:9, 4:9] = True
    assert P.largest_slice(plane, mask) == 6
    grid = np.asarray(plane.grid(mask, 6))
    rows, cols = np.nonzero(grid)
    box = P.reference_box(plane, grid)
    np.testing.assert_allclose(
        box, [cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5, rows.max() + 0.5]
    )
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(grid, 1))[1:-1, 1:-1]
    x, y = P.interior_point(grid)
    assert dist[int(y), int(x)] == dist.max()
    assert grid[int(y), int(x)]


def test_box3d_gives_the_slice_range_the_middle_slice_box_and_the_roi():
    plane = _plane()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2, 4:6, 4:6] = True
    mask[3:9, 5:10, 6:12] = True
    mask[9, 10:15, 15:20] = True
    b3 = P.box3d_prompt(plane, mask)
    assert b3.slice_range == (2, 9)
    assert b3.middle == 5  # (2 + 9) // 2
    np.testing.assert_allclose(b3.box_xyxy, P.reference_box(plane, plane.grid(mask, 5)))
    union = np.broadcast_to(mask.any(axis=0), SHAPE)
    np.testing.assert_allclose(b3.roi_xyxy, P.reference_box(plane, plane.grid(union, 0)))
    # a middle slice without reference: the nearest slice that has it
    gap = mask.copy()
    gap[4:7] = False
    assert P.box3d_prompt(plane, gap).middle in (3, 7)


def test_error_click_goes_to_the_largest_error_region():
    ref = np.zeros((20, 24), dtype=bool)
    ref[2:12, 2:12] = True
    pred = np.zeros_like(ref)
    pred[2:12, 2:6] = True  # missed: columns 6..11 (60 pixels)
    pred[15:18, 15:18] = True  # false positive: 9 pixels
    x, y, label = P.error_click(pred, ref)
    assert label == 1 and ref[int(y), int(x)] and not pred[int(y), int(x)]
    assert 6 <= x <= 11 and 5 <= y <= 8  # the middle of the missed block
    pred2 = ref.copy()
    pred2[14:20, 0:24] = True  # false positive larger than any miss
    x, y, label = P.error_click(pred2, ref)
    assert label == 0 and not ref[int(y), int(x)] and pred2[int(y), int(x)]
    assert P.error_click(ref, ref) is None


def test_box_per_slice_prompts_every_reference_slice_with_its_tight_box():
    labels = organ_labels(first=8, last=19)
    seg = FakeSegmenter(labels)
    seen = _recorder(seg)
    out = P.run_protocol(seg, labels == 1, "box-per-slice")
    assert [k for k, _, _ in seen] == list(range(8, 20))
    for k, prompts, multimask in seen:
        assert multimask is False and prompts.points_xy is None
        np.testing.assert_allclose(
            prompts.box_xyxy, P.reference_box(seg.plane, seg.plane.grid(labels == 1, k))
        )
    assert sorted(out) == list(range(8, 20))


def test_box_jitter_is_seeded_and_bounded():
    labels = organ_labels(first=8, last=19)
    boxes = []
    for _ in range(2):
        seg = FakeSegmenter(labels)
        seen = _recorder(seg)
        P.run_protocol(seg, labels == 1, "box-per-slice", jitter=2.0, rng=np.random.default_rng(5))
        boxes.append(np.array([p.box_xyxy for _, p, _ in seen]))
    np.testing.assert_array_equal(boxes[0], boxes[1])
    seg = FakeSegmenter(labels)
    seen = _recorder(seg)
    P.run_protocol(seg, labels == 1, "box-per-slice")
    exact = np.array([p.box_xyxy for _, p, _ in seen])
    delta = np.abs(boxes[0] - exact)
    assert delta.max() <= 2.0 + 1e-5 and delta.max() > 0


def test_box3d_propagate_stays_in_the_range_from_the_middle_slice():
    labels = organ_labels(first=8, last=19)
    seg = FakeSegmenter(labels)
    seen = _recorder(seg)
    out = P.run_protocol(seg, labels == 1, "box3d-propagate")
    assert seen[0][0] == 13  # (8 + 19) // 2
    assert all(8 <= k <= 19 for k, _, _ in seen)
    assert sorted(out) == list(range(8, 20))
    roi = P.box3d_prompt(seg.plane, labels == 1).roi_xyxy
    for _, prompts, _ in seen[1:]:
        b = prompts.box_xyxy
        assert b[0] >= roi[0] - 1e-5 and b[2] <= roi[2] + 1e-5


def test_keyslice_box_and_point_start_on_the_largest_slice_and_propagate():
    labels = organ_labels(first=8, last=19)
    key = P.largest_slice(_plane(labels.shape), labels == 1)
    for name in ("keyslice-box", "keyslice-point"):
        seg = FakeSegmenter(labels)
        seen = _recorder(seg)
        out = P.run_protocol(seg, labels == 1, name)
        first = seen[0]
        assert first[0] == key
        if name == "keyslice-point":
            assert first[1].box_xyxy is None and first[1].num_points == 1
            assert list(first[1].point_labels) == [1]
        else:
            assert first[1].box_xyxy is not None and first[1].points_xy is None
        assert min(out) == 8 and max(out) == 19


def test_clicks_n_corrects_at_the_largest_error_and_skips_empty_slices():
    labels = organ_labels(first=8, last=19, neighbour=False)

    class HalfSegmenter(FakeSegmenter):
        """The first click gets the left half of the structure; later clicks the whole."""

        def segment(self, index, prompts, multimask=None):
            result = super().segment(index, prompts, multimask)
            if prompts.num_points == 1:
                mask = result.masks[0].copy()
                cols = np.flatnonzero(mask.any(axis=0))
                mask[:, cols[len(cols) // 2] :] = False
                return type(result)(index, mask[None], result.iou, 0, result.low_res_logits)
            return result

    seg = HalfSegmenter(labels)
    seen = _recorder(seg)
    out = P.run_protocol(seg, labels == 1, "clicks-3")
    assert {k for k, _, _ in seen} == set(range(8, 20))  # only slices with reference
    per_slice = {}
    for k, prompts, multimask in seen:
        per_slice.setdefault(k, []).append((prompts, multimask))
    for k, calls in per_slice.items():
        assert len(calls) == 2  # the 2nd click fixes everything: no 3rd
        (first, mm1), (second, mm2) = calls
        assert mm1 is None and mm2 is None  # the segmenter's default: multimask for one click
        assert first.num_points == 1 and second.num_points == 2
        assert list(second.point_labels) == [1, 1]  # the missed half: a positive click
        x = second.points_xy[1, 0]
        grid = np.asarray(seg.plane.grid(labels == 1, k))
        cols = np.flatnonzero(grid.any(axis=0))
        assert x >= cols[len(cols) // 2]  # in the missed (right) half
        # the 2nd click corrects the mask the first gave (the left half)
        np.testing.assert_array_equal(second.mask[:, : cols[0]], False)
        assert second.mask.sum() == grid[:, : cols[len(cols) // 2]].sum()
        np.testing.assert_array_equal(out[k], grid)
