"""Metrics on hand-computed tables, empty-case conventions and a scipy cross-check of HD95/NSD."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from SlicerSAM.errors import VolumeError
from SlicerSAM.metrics import dice, evaluate_labels, hd95, iou, per_slice_dice, surface_dice

approx = pytest.approx


def _square(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


# ----------------------------------------------------------------------------------------------
# 2 x 2: pred = [[1, 1], [1, 0]], ref = [[1, 1], [0, 0]]
#   |P| = 3, |R| = 2, |P∩R| = 2, |P∪R| = 3  -> Dice = 4 / 5 = 0.8, IoU = 2 / 3
#   every voxel is a surface voxel. Distances P->R: (0,0) 0, (0,1) 0, (1,0) 1 row; R->P: 0, 0.
#   95th percentile of [0, 0, 1] (linear): position 0.95 * 2 = 1.9 -> 0 + 0.9 * (1 - 0) = 0.9
#   HD95 = max(0.9, 0) = 0.9 voxel; with spacing (2, 1) the row step is 2 mm -> 1.8 mm.
#   NSD: 5 surface voxels; tolerance 1 mm: all 5 within -> 1.0; tolerance 0.5 mm: 4 / 5 = 0.8.
P22 = np.array([[1, 1], [1, 0]], bool)
R22 = np.array([[1, 1], [0, 0]], bool)


def test_two_by_two_table():
    assert dice(P22, R22) == approx(0.8)
    assert iou(P22, R22) == approx(2 / 3)
    assert hd95(P22, R22, (1.0, 1.0)) == approx(0.9, rel=1e-6)
    assert hd95(P22, R22, (2.0, 1.0)) == approx(1.8, rel=1e-6)
    assert surface_dice(P22, R22, 1.0, tolerance_mm=1.0) == approx(1.0)
    assert surface_dice(P22, R22, 1.0, tolerance_mm=0.5) == approx(0.8, rel=1e-6)


def test_metrics_accept_integer_masks_and_are_symmetric():
    assert dice(P22.astype(np.uint8), R22.astype(np.int32)) == approx(0.8)
    assert dice(R22, P22) == dice(P22, R22)
    assert iou(R22, P22) == iou(P22, R22)
    assert hd95(R22, P22, 1.0) == approx(hd95(P22, R22, 1.0))


# ----------------------------------------------------------------------------------------------
# Two 4 x 4 squares in a 10 x 10 image, the prediction shifted by one column.
#   |P| = |R| = 16, |P∩R| = 4 x 3 = 12, |P∪R| = 20  -> Dice = 24 / 32 = 0.75, IoU = 12 / 20 = 0.6
#   each square's surface is its 12-voxel ring. P->R: the 6 ring voxels on R's rows 2/5 (cols
#   3..5) are on R's ring (0); the other 6 (col 6 and the inner-column voxels (3,3), (4,3),
#   (2,6)...) are one column step from R's ring. Same R->P by symmetry.
#   Sorted [0]*6 + [1]*6, 95th percentile at position 10.45 -> 1 column step.
#   spacing (1, 1): 1.0 mm; spacing (3.0, 0.5): 0.5 mm (the row neighbour is 3 mm away).
#   NSD at 0.4 mm with spacing (3, 0.5): 12 of 24 surface voxels -> 0.5; at 0.5 mm: 1.0.
def test_one_voxel_shifted_squares():
    ref = _square((10, 10), (2, 6), (2, 6))
    pred = _square((10, 10), (2, 6), (3, 7))
    assert dice(pred, ref) == approx(0.75)
    assert iou(pred, ref) == approx(0.6)
    assert hd95(pred, ref, (1.0, 1.0)) == approx(1.0)
    assert hd95(pred, ref, (3.0, 0.5)) == approx(0.5)
    assert surface_dice(pred, ref, (3.0, 0.5), tolerance_mm=0.4) == approx(0.5)
    assert surface_dice(pred, ref, (3.0, 0.5), tolerance_mm=0.5) == approx(1.0)


# ----------------------------------------------------------------------------------------------
# Two single voxels one row apart: Dice = IoU = 0, each surface is the voxel itself, so every
# surface distance is exactly one row step: HD95 = spacing[0]. Shift along the columns instead
# and HD95 = spacing[1]. This is the "hd95 uses spacing (in array order)" check.
def test_hd95_uses_spacing_in_array_order():
    ref = np.zeros((5, 5), bool)
    ref[2, 2] = True
    down = np.roll(ref, 1, axis=0)
    right = np.roll(ref, 1, axis=1)
    spacing = (2.5, 0.8)
    assert dice(down, ref) == 0.0 and iou(down, ref) == 0.0
    assert hd95(down, ref, spacing) == approx(2.5)
    assert hd95(right, ref, spacing) == approx(0.8)
    assert hd95(down, ref, 1.0) == approx(1.0)  # a scalar means isotropic
    # NSD at 2 mm: the 0.8 mm miss is tolerated, the 2.5 mm one is not
    assert surface_dice(right, ref, spacing, tolerance_mm=2.0) == approx(1.0)
    assert surface_dice(down, ref, spacing, tolerance_mm=2.0) == approx(0.0)


# ----------------------------------------------------------------------------------------------
# 3D: a 4 x 4 x 4 cube in 8^3, the prediction shifted one slice along axis 0 (K).
#   |P∩R| = 3 x 16 = 48 -> Dice = 96 / 128 = 0.75, IoU = 48 / 80 = 0.6.
#   Surface = 64 - 8 interior = 56 voxels. P->R with spacing (2.5, 0.8, 0.8): P's new face
#   (k = 6, 16 voxels) is 2.5 mm from R's face k = 5; the 4 inner voxels of P's face k = 3 are
#   0.8 mm from R's side walls; the other 36 are on R's surface (0). R->P the same by symmetry.
#   Sorted: 36 x 0, 4 x 0.8, 16 x 2.5; the 95th percentile (position 52.25) is 2.5 mm.
#   With slices 0.8 mm and 2.5 mm in plane: the face is 0.8 mm away, the inner face voxels too
#   (their k neighbour is on the other face) -> 0.8 mm. Isotropic 1 mm: 1.0.
#   NSD at 2 mm with (2.5, 0.8, 0.8): (36 + 4) x 2 / 112 = 5 / 7; at 2.5 mm: 1.0.
def test_cube_shifted_one_slice_anisotropic():
    ref = np.zeros((8, 8, 8), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.roll(ref, 1, axis=0)
    assert dice(pred, ref) == approx(0.75)
    assert iou(pred, ref) == approx(0.6)
    assert hd95(pred, ref, (2.5, 0.8, 0.8)) == approx(2.5)
    assert hd95(pred, ref, (0.8, 2.5, 2.5)) == approx(0.8)
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == approx(1.0)
    assert surface_dice(pred, ref, (2.5, 0.8, 0.8), 2.0) == approx(5 / 7, rel=1e-6)
    assert surface_dice(pred, ref, (2.5, 0.8, 0.8), 2.5) == approx(1.0)


def test_identical_masks_are_perfect():
    ref = np.zeros((6, 7, 8), bool)
    ref[1:4, 2:6, 3:7] = True
    assert dice(ref, ref) == 1.0 and iou(ref, ref) == 1.0
    assert hd95(ref, ref, (2.5, 0.8, 0.8)) == 0.0
    assert surface_dice(ref, ref, (2.5, 0.8, 0.8), 0.0) == 1.0


def test_structure_touching_the_image_border_has_a_surface():
    # the image border counts as background: a full mask's surface is its outer shell
    full = np.ones((4, 4), bool)
    inner = _square((4, 4), (1, 3), (1, 3))
    assert hd95(full, full, 1.0) == 0.0
    # inner 2 x 2 -> shell: all 4 at 1 voxel; shell (12-voxel ring) -> inner: 8 edge voxels at 1,
    # 4 corners at sqrt(2); 95th percentile of those 12 (position 10.45) -> sqrt(2)
    assert hd95(inner, full, 1.0) == approx(math.sqrt(2), rel=1e-6)
    assert hd95(full, inner, 1.0) == approx(math.sqrt(2), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Empty cases (module docstring table)
@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5)])
def test_both_empty_is_a_correct_nothing_there(shape):
    empty = np.zeros(shape, bool)
    spacing = (1.0,) * len(shape)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert surface_dice(empty, empty, spacing, 2.0) == 1.0
    assert hd95(empty, empty, spacing) == 0.0


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_one_empty_is_a_complete_miss(which):
    some = _square((6, 6), (1, 4), (1, 4))
    empty = np.zeros((6, 6), bool)
    pred, ref = (empty, some) if which == "pred" else (some, empty)
    assert dice(pred, ref) == 0.0
    assert iou(pred, ref) == 0.0
    assert surface_dice(pred, ref, (1.0, 1.0), 2.0) == 0.0
    assert hd95(pred, ref, (1.0, 1.0)) == math.inf


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="shapes"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(P22, R22, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(P22, R22, (1.0, 0.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(P22, R22, 1.0, -1.0)


# ----------------------------------------------------------------------------------------------
# Cross-check against a direct scipy distance-transform computation on random smooth blobs


def _scipy_surface_metrics(pred, ref, spacing, tol):
    """HD95 (max of directed 95th percentiles) and NSD from Euclidean distance transforms."""
    pred, ref = np.pad(pred, 1), np.pad(ref, 1)  # the image border counts as background

    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    sp, sr = surface(pred), surface(ref)
    d_pr = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    hd = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    nsd = ((d_pr <= tol).sum() + (d_rp <= tol).sum()) / (d_pr.size + d_rp.size)
    return hd, nsd


@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_and_nsd_match_a_scipy_distance_transform(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.8, 0.6)

    def blob():
        field = ndimage.gaussian_filter(rng.normal(size=(12, 24, 26)), 2.5)
        return field > np.percentile(field, 70)

    pred, ref = blob(), blob()
    hd_ref, nsd_ref = _scipy_surface_metrics(pred, ref, spacing, 2.0)
    assert hd95(pred, ref, spacing) == approx(hd_ref, rel=1e-5)
    assert surface_dice(pred, ref, spacing, 2.0) == approx(nsd_ref, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# per_slice_dice and evaluate_labels


def test_per_slice_dice_lists_slices_where_either_is_present():
    ref = np.zeros((5, 4, 4), bool)
    pred = np.zeros((5, 4, 4), bool)
    ref[1, :2, :2] = True  # slice 1: identical -> 1.0
    pred[1, :2, :2] = True
    ref[2, :2, :2] = True  # slice 2: 4 ref voxels, 2 of them predicted -> 4 / 6
    pred[2, :1, :2] = True
    pred[3, 0, 0] = True  # slice 3: prediction only -> 0.0; slices 0 and 4: empty, left out
    assert per_slice_dice(pred, ref, axis=0) == {1: 1.0, 2: approx(2 / 3), 3: 0.0}
    # along axis 2 (columns i): column 0 has ref 2 + 2 = 4, pred 2 + 1 + 1 = 4, overlap 2 + 1 = 3
    # -> 6 / 8; column 1 has ref 4, pred 2 + 1 = 3, overlap 3 -> 6 / 7
    assert per_slice_dice(pred, ref, axis=2) == {0: approx(0.75), 1: approx(6 / 7)}
    assert per_slice_dice(pred, ref, axis=-1) == per_slice_dice(pred, ref, axis=2)


def test_evaluate_labels_table():
    ref = np.zeros((4, 10, 10), np.uint8)
    ref[1:3, 2:6, 2:6] = 1  # label 1 over slices 1, 2
    pred = np.zeros_like(ref)
    pred[1:3, 2:6, 3:7] = 1  # shifted one column
    ref[0, 0, 0] = 2  # label 2 missed entirely
    pred[3, 9, 9] = 5  # label 5 only predicted (not asked for)
    names = {0: "background", 1: "liver", 2: "spleen", 3: "aorta"}
    spacing = (2.5, 0.8, 0.8)
    res = evaluate_labels(pred, ref, spacing, names, tolerance_mm=1.0)
    assert list(res) == ["liver", "spleen", "aorta"]
    liver = res["liver"]
    assert liver["label"] == 1
    assert liver["dice"] == approx(0.75) and liver["iou"] == approx(0.6)
    assert liver["hd95_mm"] == approx(0.8)
    assert liver["nsd"] == approx(1.0)
    assert liver["voxels_reference"] == liver["voxels_predicted"] == 32
    assert liver["slices_reference"] == liver["slices_predicted"] == 2
    assert set(liver) == {
        "label",
        "dice",
        "iou",
        "hd95_mm",
        "nsd",
        "voxels_reference",
        "voxels_predicted",
        "slices_reference",
        "slices_predicted",
    }
    spleen = res["spleen"]
    assert (spleen["dice"], spleen["iou"], spleen["nsd"]) == (0.0, 0.0, 0.0)
    assert spleen["hd95_mm"] == math.inf
    assert (spleen["voxels_reference"], spleen["voxels_predicted"]) == (1, 0)
    assert (spleen["slices_reference"], spleen["slices_predicted"]) == (1, 0)
    aorta = res["aorta"]  # absent from both: a correct "nothing there"
    assert (aorta["dice"], aorta["iou"], aorta["nsd"], aorta["hd95_mm"]) == (1.0, 1.0, 1.0, 0.0)

    only = evaluate_labels(pred, ref, spacing, names, labels=[5, 1], axis=2)
    assert list(only) == ["label_5", "liver"]
    assert only["label_5"]["dice"] == 0.0
    assert only["liver"]["slices_reference"] == 4  # columns 2..5


def test_evaluate_labels_rejects_different_grids():
    with pytest.raises(VolumeError, match="same grid"):
        evaluate_labels(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1, 1, 1), {1: "a"})
