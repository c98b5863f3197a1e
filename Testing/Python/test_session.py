"""The interactive session and how prompts combine: ROI + clicks, clicks correcting a mask,
corrections followed by propagation, accept and undo.

Most tests use a stand-in for a box-trained model (:class:`ShapesPredictor`: a box gives the
bright pixels inside it) under the real :class:`~SlicerSAM.segmenter.Segmenter`, so that the
segmenter's rules for clicks are what is tested; the session's own tests also use the box-
following fake of test_propagation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_propagation import FakeSegmenter, organ_labels

from sam_core.predictor import ImageEmbedding
from SlicerSAM.errors import Cancelled, PromptError
from SlicerSAM.intensity import IntensityMapping
from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.segmenter import Segmenter
from SlicerSAM.session import InteractiveSession, Roi
from SlicerSAM.slicing import plane_for
from SlicerSAM.volume import Volume

SHAPE = (20, 48, 56)  # (K, J, I), 3 mm voxels: the model image is the slice grid


class ShapesSam(torch.nn.Module):
    """What the Segmenter needs of a model: parameters, an identity, trained with boxes only."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.checkpoint_sha256 = "shapes"
        self.spec = type("Spec", (), {"name": "shapes", "point_prompts": False})()


class ShapesPredictor:
    """A box-trained model in miniature: a box gives the bright pixels whose centres lie inside
    it; its predicted IoU is how much of the box they fill (a tight box scores best)."""

    def __init__(self, sam):
        self.model = sam
        self.device = torch.device("cpu")
        self.decodes = 0

    def encode(self, image):
        features = torch.from_numpy(image[None, None, :, :, 0].astype(np.float32))
        return ImageEmbedding(features, image.shape[:2], image.shape[:2])

    def encode_batch(self, images):
        return [self.encode(image) for image in images]

    def set_embedding(self, embedding):
        self.image = embedding.features[0, 0].float().numpy()

    def mask_to_low_res(self, mask):
        return np.zeros((1, 256, 256), np.float32)

    def mask_features(self, mask, embedding=None):
        return None

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, **kwargs):
        self.decodes += 1
        rows, cols = self.image.shape
        yy, xx = np.mgrid[:rows, :cols]
        x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
        inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        mask = (self.image > 128) & inside
        iou = float(mask.sum()) / max(float(inside.sum()), 1.0)
        if getattr(self, "prefer_large", False):
            iou = float(mask.sum()) / mask.size
        logits = np.where(mask, 4.0, -4.0).astype(np.float32)
        return mask[None], np.array([iou], np.float32), logits[None]


def scene():
    """Label 1: an organ on slices 5..14 (a disc, radius 4..9 px); label 2: a column beside it on
    every slice; CT-like values (organ and column bright at window 40/400)."""
    labels = organ_labels(first=5, last=14)[: SHAPE[0]]
    array = np.where(labels > 0, 120, -100).astype(np.int16)
    return Volume(array, np.diag([3.0, 3.0, 3.0, 1.0])), labels


@pytest.fixture
def shapes(monkeypatch):
    monkeypatch.setattr("sam_core.predictor.SamPredictor", ShapesPredictor)
    volume, labels = scene()
    segmenter = Segmenter(volume, ShapesSam(), intensity=IntensityMapping(level=40, width=400))
    return segmenter, labels


def grid(segmenter, labels, k, value=1):
    return np.asarray(segmenter.plane.grid(labels == value, k), dtype=bool)


def box_of(mask, pad=0.5):
    rows, cols = np.nonzero(mask)
    return np.array([cols.min() - pad, rows.min() - pad, cols.max() + pad, rows.max() + pad])


def centre_of(mask):
    from SlicerSAM.propagation import interior_point

    return interior_point(mask)


# ----------------------------------------------------------------------------------------------
# How clicks combine for a box-trained model (Segmenter)
# ----------------------------------------------------------------------------------------------
def test_a_click_the_boxs_mask_holds_changes_nothing(shapes):
    segmenter, labels = shapes
    organ = grid(segmenter, labels, 10)
    box = box_of(organ)
    alone = segmenter.segment(10, SlicePrompts(10, box_xyxy=box)).mask
    before = segmenter.predictor.decodes
    x, y = centre_of(organ)
    both = segmenter.segment(10, SlicePrompts(10, [[x, y]], [1], box_xyxy=box + [0, 0, 0.01, 0]))
    assert np.array_equal(both.mask, alone) and not both.searched
    assert segmenter.predictor.decodes == before + 1  # the box alone was decoded


def test_a_negative_click_inside_a_box_chooses_within_the_box(shapes):
    segmenter, labels = shapes
    organ, column = grid(segmenter, labels, 10), grid(segmenter, labels, 10, 2)
    box = box_of(organ | column)  # a loose box holding the organ and the column beside it
    x, y = centre_of(column)
    result = segmenter.segment(10, SlicePrompts(10, [[x, y]], [0], box_xyxy=box))
    assert not result.mask[int(y), int(x)]
    assert np.array_equal(result.mask, organ) and result.searched


def test_a_positive_correction_keeps_the_mask_it_corrects(shapes):
    segmenter, labels = shapes
    organ = grid(segmenter, labels, 10)
    cols = np.flatnonzero(organ.any(axis=0))
    half = organ.copy()
    half[:, cols[len(cols) // 2] :] = False  # the earlier result missed the right half
    x, y = centre_of(organ & ~half)
    result = segmenter.segment(10, SlicePrompts(10, [[x, y]], [1], mask=half))
    assert result.mask[int(y), int(x)]
    assert (result.mask & half).sum() == half.sum()
    assert not (result.mask & grid(segmenter, labels, 10, 2)).any()


class CentrePredictor(ShapesPredictor):
    """A model that latches on what a box is centred on: the bright region under the box's
    centre, nothing when the centre is dark."""

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, **kwargs):
        from scipy import ndimage

        masks, iou, logits = super().predict(box=box)
        regions, _ = ndimage.label(masks[0])
        x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
        centre = regions[int(round((y0 + y1) / 2)), int(round((x0 + x1) / 2))]
        mask = (regions == centre) & (centre > 0)
        logits = np.where(mask, 4.0, -4.0).astype(np.float32)
        return mask[None], iou, logits[None]


def test_a_positive_click_beyond_the_masks_edge_adds_to_it_and_never_shrinks_it(monkeypatch):
    """No candidate both holds the click and keeps the mask (the boxes around the click find
    only what is under it): the mask grows by what the model found at the click."""
    monkeypatch.setattr("sam_core.predictor.SamPredictor", CentrePredictor)
    volume, labels = scene()
    segmenter = Segmenter(volume, ShapesSam(), intensity=IntensityMapping(level=40, width=400))
    organ, column = grid(segmenter, labels, 10), grid(segmenter, labels, 10, 2)
    session = InteractiveSession(segmenter=segmenter)
    session.add_mask(10, organ)
    x, y = centre_of(column)
    session.add_click(10, (x, y), positive=True)
    mask = session.keys[10].mask
    assert (mask & organ).sum() == organ.sum() and mask[int(y), int(x)]
    assert not (mask & ~organ & ~column).any()  # what it adds is what was clicked


def test_a_positive_click_on_one_part_of_a_mask_keeps_the_other_parts(monkeypatch):
    """The mask holds half of the organ and the column beside it (two parts, like the portal and
    the splenic vein on one slice); the best box for a click on the organ's missing half gives
    the organ only. It keeps more than half of the mask, so it used to replace it and drop the
    column; the clicks only add, so the mask grows by it instead."""
    monkeypatch.setattr("sam_core.predictor.SamPredictor", CentrePredictor)
    volume, labels = scene()
    segmenter = Segmenter(volume, ShapesSam(), intensity=IntensityMapping(level=40, width=400))
    organ, column = grid(segmenter, labels, 10), grid(segmenter, labels, 10, 2)
    cols = np.flatnonzero(organ.any(axis=0))
    half = organ.copy()
    half[:, cols[len(cols) // 2] :] = False
    before = half | column
    assert (organ & before).sum() >= 0.5 * before.sum()  # the organ's mask "keeps" the mask
    session = InteractiveSession(segmenter=segmenter)
    session.add_mask(10, before)
    x, y = centre_of(organ & ~half)
    session.add_click(10, (x, y), positive=True)
    mask = session.keys[10].mask
    assert mask[int(y), int(x)] and np.array_equal(mask & before, before)
    assert (mask & organ & ~half).sum() > 0.5 * (organ & ~half).sum()
    assert not (mask & ~organ & ~column).any()  # what it adds is the organ


def test_a_negative_click_removes_the_part_it_lands_in(shapes):
    segmenter, labels = shapes
    organ, column = grid(segmenter, labels, 10), grid(segmenter, labels, 10, 2)
    before = segmenter.predictor.decodes
    x, y = centre_of(column)
    result = segmenter.segment(10, SlicePrompts(10, [[x, y]], [0], mask=organ | column))
    assert np.array_equal(result.mask, organ)
    assert segmenter.predictor.decodes == before  # a part removed: nothing to decode


def test_a_negative_click_at_the_middle_of_a_one_piece_mask_empties_the_slice(shapes):
    segmenter, labels = shapes
    column = grid(segmenter, labels, 18, 2)  # slice 18 holds no organ: the mask is all wrong
    x, y = centre_of(column)
    result = segmenter.segment(18, SlicePrompts(18, [[x, y]], [0], mask=column))
    assert not result.mask.any()


def test_a_negative_click_alone_is_refused(shapes):
    segmenter, _ = shapes
    with pytest.raises(PromptError, match="negative clicks alone"):
        segmenter.segment(10, SlicePrompts(10, [[20, 20]], [0]))


def test_max_area_ranks_implausibly_large_candidates_last(shapes):
    segmenter, labels = shapes
    segmenter.predictor.prefer_large = True  # a model surest of its largest masks
    organ = grid(segmenter, labels, 10)
    x, y = centre_of(organ)
    free = segmenter.segment(10, SlicePrompts(10, [[x, y]], [1]))
    assert free.mask.sum() > 1.3 * organ.sum()  # the organ and some of the column beside it
    limited = segmenter.segment(10, SlicePrompts(10, [[x, y]], [1]), max_area=1.1 * organ.sum())
    assert organ.sum() * 0.5 <= limited.mask.sum() <= 1.1 * organ.sum()
    assert limited.mask[int(y), int(x)]


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------
def _roi_around(segmenter, labels, value=1, pad=2):
    """The ROI of a structure: its slice range and in-plane box (+ pad pixels)."""
    plane = segmenter.plane
    present = [k for k in range(plane.num_slices) if grid(segmenter, labels, k, value).any()]
    union = np.zeros(plane.grid_shape, bool)
    for k in present:
        union |= grid(segmenter, labels, k, value)
    return Roi((present[0], present[-1]), box_of(union, pad=0.5 + pad))


def test_an_roi_and_a_click_on_another_slice_make_two_keys_and_nothing_leaves_the_roi(shapes):
    segmenter, labels = shapes
    from SlicerSAM.propagation import StopRules

    # the stand-in's "predicted IoU" is how much of the box its mask fills: not a confidence
    session = InteractiveSession(segmenter=segmenter, stop=StopRules(min_iou=None))
    roi = _roi_around(segmenter, labels)
    session.set_roi(roi)
    middle = (roi.slice_range[0] + roi.slice_range[1]) // 2
    session.segment(SlicePrompts(middle, box_xyxy=roi.bounds_xyxy))
    x, y = centre_of(grid(segmenter, labels, 7))
    session.segment(SlicePrompts(7, [[x, y]], [1]))  # the ROI's rectangle is its box
    assert sorted(session.keys) == [7, middle]
    session.propagate()
    result = session.result()
    assert min(result) >= roi.slice_range[0] and max(result) <= roi.slice_range[1]
    outside = ~roi.grid_mask(segmenter.plane)
    assert not any((m & outside).any() for m in result.values())
    truth = labels == 1
    pred = session.result_volume().astype(bool)
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.8


def test_an_roi_and_a_click_given_together_equal_the_roi_then_the_click_as_a_correction(shapes):
    """The Slicer module and a prompt file give the ROI and the click at once; a user may also
    place the click after seeing the ROI's result. Both mean "the ROI's result, corrected here"."""
    segmenter, labels = shapes
    from SlicerSAM.propagation import StopRules

    stop = StopRules(min_iou=None)
    # a loose ROI: its rectangle reaches the edge of the column beside the organ
    roi = _roi_around(segmenter, labels, pad=4)
    middle_box = box_of(grid(segmenter, labels, roi.middle))  # a tight box on the middle slice
    x, y = centre_of(grid(segmenter, labels, 7))

    together = InteractiveSession(segmenter=segmenter, stop=stop)
    together.set_roi(roi)
    together.segment(SlicePrompts(roi.middle, box_xyxy=middle_box))
    together.segment(SlicePrompts(7, [[x, y]], [1]))
    shown = together.keys[7].mask.copy()  # before propagation: the ROI's rectangle and the click
    assert together.keys[7].stand_in
    together.propagate()
    assert not together.keys[7].stand_in

    after = InteractiveSession(segmenter=segmenter, stop=stop)
    after.set_roi(roi)
    after.segment(SlicePrompts(roi.middle, box_xyxy=middle_box))
    after.propagate()
    after.add_click(7, (x, y), positive=True)
    after.propagate()

    assert np.array_equal(together.result_volume(), after.result_volume())
    # the rectangle alone also caught the edge of the column beside the organ; the ROI's result,
    # which the click only confirms, does not
    column = grid(segmenter, labels, 7, 2)
    assert (shown & column).any() and not (together.result()[7] & column).any()


def test_a_click_inside_an_roi_where_the_walks_found_nothing_chooses_its_own_box(monkeypatch):
    """The walks from the ROI's middle slice stop at a slice without the structure; a click on
    the part beyond it chooses a box around itself inside the ROI, not the ROI's rectangle
    (which there holds the column beside the organ too)."""
    from SlicerSAM.propagation import StopRules

    monkeypatch.setattr("sam_core.predictor.SamPredictor", ShapesPredictor)
    labels = organ_labels(first=4, last=14)[: SHAPE[0]]
    labels[7][labels[7] == 1] = 0  # the organ skips slice 7: the walks down stop there
    array = np.where(labels > 0, 120, -100).astype(np.int16)
    volume = Volume(array, np.diag([3.0, 3.0, 3.0, 1.0]))
    segmenter = Segmenter(volume, ShapesSam(), intensity=IntensityMapping(level=40, width=400))
    roi = _roi_around(segmenter, labels, pad=4)  # loose: it reaches the column's edge
    x, y = centre_of(grid(segmenter, labels, 5))
    rectangle = segmenter.segment(5, SlicePrompts(5, box_xyxy=roi.bounds_xyxy)).mask
    column = grid(segmenter, labels, 5, 2)
    assert (rectangle & column).any()  # what the ROI's rectangle would have given

    session = InteractiveSession(segmenter=segmenter, stop=StopRules(min_iou=None))
    session.set_roi(roi)
    session.segment(SlicePrompts(roi.middle, box_xyxy=box_of(grid(segmenter, labels, 10))))
    session.segment(SlicePrompts(5, [[x, y]], [1]))
    session.propagate()
    result = session.result()
    assert 7 not in result and result[5][int(round(y)), int(round(x))]
    assert not any((result[k] & grid(segmenter, labels, k, 2)).any() for k in (4, 5, 6))
    outside = ~roi.grid_mask(segmenter.plane)
    assert not any((m & outside).any() for m in result.values())


def test_a_cancelled_propagation_keeps_clicks_waiting_for_the_rois_result(shapes):
    segmenter, labels = shapes
    roi = _roi_around(segmenter, labels)
    session = InteractiveSession(segmenter=segmenter)
    session.set_roi(roi)
    session.segment(SlicePrompts(roi.middle, box_xyxy=roi.bounds_xyxy))
    x, y = centre_of(grid(segmenter, labels, 7))
    session.segment(SlicePrompts(7, [[x, y]], [1]))
    keys = dict(session.keys)
    with pytest.raises(Cancelled):
        session.propagate(cancel=lambda: segmenter.predictor.decodes > 6)
    assert session.keys == keys and session.keys[7].stand_in and session.propagation is None


def test_a_click_outside_the_roi_is_refused_before_any_model_work(shapes):
    segmenter, labels = shapes
    session = InteractiveSession(segmenter=segmenter)
    session.set_roi(_roi_around(segmenter, labels))
    with pytest.raises(PromptError, match="outside the ROI"):
        session.segment(SlicePrompts(10, [[1, 1]], [1]))
    with pytest.raises(PromptError, match="outside the ROI's slice range"):
        session.segment(SlicePrompts(19, [[30, 30]], [1]))
    assert segmenter.predictor.decodes == 0 and not session.keys


def test_a_negative_correction_marks_the_slice_absent_and_walks_stop_before_it(shapes):
    segmenter, labels = shapes
    from SlicerSAM.propagation import NO_STOP

    session = InteractiveSession(segmenter=segmenter, strategy="box", stop=NO_STOP)
    # a loose box on the organ's slice: its walk runs on along the column beside it
    box = box_of(grid(segmenter, labels, 10) | grid(segmenter, labels, 10, 2))
    session.segment(SlicePrompts(10, box_xyxy=box))
    first = session.propagate()
    assert max(first.masks) == SHAPE[0] - 1  # the column goes on to the last slice
    column = grid(segmenter, labels, 17, 2)
    cx, cy = centre_of(column)
    session.add_click(17, (cx, cy), positive=False)
    assert not session.keys[17].mask.any()
    second = session.propagate()
    assert max(second.masks) == 16  # up to the slice marked absent, never past it
    # the walk from the key redid one slice: it matched the first run's, which then stand
    assert second.stop_reasons == {"10-17 up": "rejoined"} and second.visited == [11]


def test_a_click_the_mask_already_holds_changes_nothing(shapes):
    segmenter, labels = shapes
    from SlicerSAM.propagation import StopRules

    session = InteractiveSession(segmenter=segmenter, stop=StopRules(min_iou=None))
    organ = grid(segmenter, labels, 10)
    session.segment(SlicePrompts(10, box_xyxy=box_of(organ)))
    session.propagate()
    decodes = segmenter.predictor.decodes
    x, y = centre_of(grid(segmenter, labels, 12))
    before = session.result()[12].copy()
    session.add_click(12, (x, y), positive=True)
    assert segmenter.predictor.decodes == decodes
    assert np.array_equal(session.keys[12].mask, before)


def test_the_same_prompts_again_segment_nothing_and_a_moved_box_keeps_its_mask():
    labels = organ_labels()
    fake = FakeSegmenter(labels)
    session = InteractiveSession(segmenter=fake)
    plane = fake.plane
    from SlicerSAM.prompts import Box, Prompts

    def box_prompt(k):
        kji = np.argwhere(np.asarray(labels == 1)[k : k + 1]) + [k, 0, 0]
        return Prompts(box=Box(tuple(kji.min(0)), tuple(kji.max(0))), frame="kji")

    session.set_prompts(box_prompt(12))
    calls = len(fake.calls)
    assert session.set_prompts(box_prompt(12)) == {} and len(fake.calls) == calls
    session.set_prompts(box_prompt(15))  # the box dragged to slice 15
    assert sorted(session.keys) == [12, 15]
    assert session.keys[12].prompts is None and session.keys[12].mask.any()
    assert plane.num_slices == labels.shape[0]


def test_accept_writes_the_result_and_undo_restores_it():
    labels = organ_labels()
    fake = FakeSegmenter(labels)
    session = InteractiveSession(segmenter=fake)
    organ = np.asarray(fake.plane.grid(labels == 1, 12), bool)
    from SlicerSAM.propagation import box_of_mask

    session.segment(SlicePrompts(12, box_xyxy=box_of_mask(fake.plane, organ)))
    session.propagate()
    expected = session.result_volume()
    target = np.zeros(labels.shape, np.uint8)
    target[0, 0, 0] = 1  # a voxel of the segment far from the result
    edit = session.accept(target, key="segment")
    assert edit is not None and session.result() == {} and not session.keys
    assert np.array_equal(target[1:], expected[1:]) and target[0, 0, 0] == 1
    step = session.undo()
    assert [e.key for e in step] == ["segment"]
    target[step[0].region.slices] = step[0].before
    assert target.sum() == 1
    with pytest.raises(PromptError, match="nothing to accept"):
        session.accept()


def test_a_cancelled_propagation_changes_nothing():
    labels = organ_labels()
    fake = FakeSegmenter(labels)
    session = InteractiveSession(segmenter=fake)
    organ = np.asarray(fake.plane.grid(labels == 1, 12), bool)
    from SlicerSAM.propagation import box_of_mask

    session.segment(SlicePrompts(12, box_xyxy=box_of_mask(fake.plane, organ)))
    before = session.result()
    with pytest.raises(Cancelled):
        session.propagate(cancel=lambda: len(fake.calls) > 3)
    after = session.result()
    assert sorted(after) == sorted(before) and session.propagation is None
    with pytest.raises(PromptError, match="nothing to propagate"):
        InteractiveSession(segmenter=fake).propagate()


def test_changing_orientation_clears_the_keys_and_keeps_the_roi(shapes):
    segmenter, labels = shapes
    volume = segmenter.volume
    from SlicerSAM.prompts import Box

    session = InteractiveSession(volume, ShapesSam(), intensity=IntensityMapping(level=40))
    session.set_roi(Box((5.0, 10.0, 12.0), (14.0, 30.0, 40.0), frame="kji"))
    assert session.roi.slice_range == (5, 14)
    session.set_orientation("coronal")
    assert session.orientation == "coronal" and not session.keys
    coronal = plane_for(volume, "coronal")
    assert session.plane.num_slices == coronal.num_slices
    assert session.roi.slice_range == (10, 30)
