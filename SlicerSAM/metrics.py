"""Segmentation metrics on boolean masks: Dice, IoU, HD95 and normalised surface Dice (NSD).

All functions take masks of any dimensionality (2D slices or 3D volumes) in array order, and
`spacing` in millimetres in the same array order (for a `Volume`, `volume.spacing` = (sk, sj, si)).
Distances (HD95) and tolerances (NSD) are in millimetres.

Surfaces follow MONAI (`monai.metrics`, which computes HD95 and NSD here): the surface of a mask is
its foreground voxels with at least one face neighbour in the background (binary erosion XOR the
mask; the image border counts as background), and a surface distance is the Euclidean distance in mm
between voxel centres.

Empty-mask conventions (MONAI's ``ignore_empty=False`` reading for Dice; inf for a distance to a
set that does not exist), chosen so that every metric is defined for every case:

=============================  ======  ======  ======  =======
case                            dice    iou     nsd     hd95
=============================  ======  ======  ======  =======
both masks empty                1.0     1.0     1.0     0.0
exactly one mask empty          0.0     0.0     0.0     inf
=============================  ======  ======  ======  =======

"Both empty" is a correct "nothing there" prediction and scores perfectly; "one empty" is a
complete miss (or a pure false positive). ``inf`` is not valid JSON: `SlicerSAM.reports.write_json`
writes it (and NaN) as ``null``, and `write_csv` as an empty cell.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np

from SlicerSAM.errors import VolumeError

logger = logging.getLogger(__name__)

__all__ = [
    "dice",
    "iou",
    "hd95",
    "surface_dice",
    "per_slice_dice",
    "evaluate_labels",
]


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of the same shape (non-zero is foreground)."""
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(
            f"masks have different shapes: prediction {pred.shape}, reference {ref.shape}"
        )
    return pred, ref


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    """Spacing as a tuple of ndim positive floats (a scalar means isotropic)."""
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing {values} has {len(values)} values for {ndim}-D masks")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive and finite, got {values}")
    return values


def dice(pred, ref) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|) of two masks.

    Args:
        pred: predicted mask (any shape; non-zero is foreground).
        ref: reference mask, same shape.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is empty.
    """
    pred, ref = _pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred, ref) -> float:
    """Intersection over union (Jaccard index) |P∩R| / |P∪R| of two masks.

    Args:
        pred: predicted mask (any shape; non-zero is foreground).
        ref: reference mask, same shape.

    Returns:
        IoU in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is empty.
    """
    pred, ref = _pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def _empty_case(pred: np.ndarray, ref: np.ndarray, both: float, one: float) -> float | None:
    """The documented value when a mask is empty, or None when both have foreground."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    return both if not (has_pred or has_ref) else one


def _crop_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union plus one background voxel.

    Surfaces and distances are unchanged (MONAI crops the same way); cropping first spares it
    whole-volume passes, which dominate on a large volume with a small structure.
    """
    coords = np.argwhere(pred | ref)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def _float32_value(tensor) -> float:
    """MONAI's float32 result as the shortest decimal that round-trips (0.9, not 0.8999999762)."""
    return float(str(np.float32(tensor.reshape(-1)[0].item())))


def _batched(mask: np.ndarray):
    """(1, 1, *shape) float tensor: MONAI's batch-first one-hot layout, foreground channel only."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


@contextmanager
def _quiet_monai():
    """Silence the FutureWarning MONAI 1.5-1.6 raises from its own internal call of
    ``get_mask_edges(always_return_as_numpy=...)``; it is not about our arguments."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy.*", category=FutureWarning
        )
        yield


def hd95(pred, ref, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed
    95th percentiles (surface of `pred` to surface of `ref`, and back), each percentile linearly
    interpolated over the surface voxels' nearest-neighbour distances.

    Args:
        pred: predicted mask (2D or 3D; non-zero is foreground).
        ref: reference mask, same shape.
        spacing: voxel size in mm in array order (a scalar for isotropic voxels).

    Returns:
        HD95 in mm; 0.0 when both masks are empty, ``inf`` when exactly one is empty.
    """
    pred, ref = _pair(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    special = _empty_case(pred, ref, both=0.0, one=math.inf)
    if special is not None:
        return special
    from monai.metrics import compute_hausdorff_distance

    pred, ref = _crop_union(pred, ref)
    with _quiet_monai():
        value = compute_hausdorff_distance(
            _batched(pred), _batched(ref), include_background=True, percentile=95, spacing=list(sp)
        )
    return _float32_value(value)


def surface_dice(pred, ref, spacing, tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice (NSD, Nikolov et al. 2021) of two masks at a tolerance in mm.

    The fraction of surface voxels of both masks that lie within `tolerance_mm` of the other
    mask's surface (MONAI's ``compute_surface_dice`` counting surface voxels, no sub-voxel areas).

    Args:
        pred: predicted mask (2D or 3D; non-zero is foreground).
        ref: reference mask, same shape.
        spacing: voxel size in mm in array order (a scalar for isotropic voxels).
        tolerance_mm: accepted surface deviation in mm (>= 0).

    Returns:
        NSD in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is empty.
    """
    pred, ref = _pair(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    tolerance_mm = float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    special = _empty_case(pred, ref, both=1.0, one=0.0)
    if special is not None:
        return special
    from monai.metrics import compute_surface_dice

    pred, ref = _crop_union(pred, ref)
    with _quiet_monai():
        value = compute_surface_dice(
            _batched(pred),
            _batched(ref),
            class_thresholds=[tolerance_mm],
            include_background=True,
            spacing=list(sp),
        )
    return _float32_value(value)


def _slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Foreground voxel count of every slice along `axis`."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return mask.sum(axis=other)


def per_slice_dice(pred3d, ref3d, axis: int = 0) -> dict[int, float]:
    """Dice of every slice along `axis` where the prediction or the reference is non-empty.

    Args:
        pred3d: predicted mask (K, J, I) (any dimensionality >= 2 works).
        ref3d: reference mask, same shape.
        axis: array axis the slices are taken across (0 = K, axial for a RAS-aligned volume).

    Returns:
        {slice index: Dice}, in increasing index order. Slices empty in both are left out (their
        Dice would be the conventional 1.0 and would flatter the mean); a slice empty in exactly
        one mask scores 0.0.
    """
    pred, ref = _pair(pred3d, ref3d)
    if pred.ndim < 2:
        raise ValueError(f"per_slice_dice needs masks of 2 or more dimensions, got {pred.ndim}")
    axis = int(axis) % pred.ndim
    n_pred = _slice_counts(pred, axis)
    n_ref = _slice_counts(ref, axis)
    n_both = _slice_counts(np.logical_and(pred, ref), axis)
    result: dict[int, float] = {}
    for index in np.flatnonzero((n_pred + n_ref) > 0):
        result[int(index)] = 2.0 * float(n_both[index]) / float(n_pred[index] + n_ref[index])
    return result


def evaluate_labels(
    pred_labels,
    ref_labels,
    spacing,
    label_names: Mapping[int, str],
    tolerance_mm: float = 2.0,
    labels: Sequence[int] | None = None,
    axis: int = 0,
) -> dict[str, dict]:
    """Per-structure metrics of a predicted label map against a reference label map.

    Args:
        pred_labels: predicted label map (K, J, I) of integer label values (0 = background).
        ref_labels: reference label map on the same grid.
        spacing: voxel size in mm in array order ((sk, sj, si), `Volume.spacing`).
        label_names: label value -> structure name.
        tolerance_mm: NSD tolerance in mm.
        labels: label values to evaluate; None means every non-zero key of `label_names`.
            A value missing from `label_names` is named ``"label_<value>"``.
        axis: array axis of the slices counted in ``slices_reference`` / ``slices_predicted``.

    Returns:
        {structure name: {"label", "dice", "iou", "hd95_mm", "nsd", "voxels_reference",
        "voxels_predicted", "slices_reference", "slices_predicted"}} in label order, where the
        ``slices_*`` entries count the slices along `axis` that contain the structure. Empty
        structures follow the module's conventions (both empty: 1, 1, 0 mm, 1; one empty:
        0, 0, inf, 0).

    Raises:
        VolumeError: the two label maps are not on the same grid.
    """
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise VolumeError(
            f"prediction {pred_labels.shape} and reference {ref_labels.shape} label maps are not "
            "on the same grid; resample the prediction onto the reference grid first"
        )
    sp = _spacing(spacing, ref_labels.ndim)
    axis = int(axis) % ref_labels.ndim
    if labels is None:
        values = sorted(int(v) for v in label_names if int(v) != 0)
    else:
        values = [int(v) for v in labels]

    results: dict[str, dict] = {}
    for value in values:
        name = str(label_names.get(value, f"label_{value}"))
        if name in results:  # two values sharing a name: keep both rows
            name = f"{name} ({value})"
        pred = pred_labels == value
        ref = ref_labels == value
        results[name] = {
            "label": value,
            "dice": dice(pred, ref),
            "iou": iou(pred, ref),
            "hd95_mm": hd95(pred, ref, sp),
            "nsd": surface_dice(pred, ref, sp, tolerance_mm),
            "voxels_reference": int(ref.sum()),
            "voxels_predicted": int(pred.sum()),
            "slices_reference": int(np.count_nonzero(_slice_counts(ref, axis))),
            "slices_predicted": int(np.count_nonzero(_slice_counts(pred, axis))),
        }
        logger.debug("label %d (%s): %s", value, name, results[name])
    return results
