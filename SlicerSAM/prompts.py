"""User prompts (points, boxes, masks) and their conversion to one slice's model-image pixels.

A user places prompts in patient space (RAS millimetres, as Slicer shows them) or in voxel
coordinates ``(k, j, i)`` (array order, see docs/architecture.md). SAM wants ``(x, y)`` pixels of
the square-pixel "model image" of one slice. :func:`prompts_on_slice` is the only place that
converts between the two: ``Volume.ras_to_kji`` then ``SlicePlane.voxel_to_xy`` (which holds the
(row, col) -> (x, y) flip).

Rules (docs/prompts.md has the long form):

- All points of one prompt lie on one slice: within half a voxel of its centre along the slicing
  axis. Without an explicit index, the slice is the one of the points (or the box's middle slice).
- A point outside the volume (beyond the outer voxel edges) is a :class:`PromptError` naming the
  point, its voxel coordinates and the volume extent.
- A box is given by two opposite corners. When its extent along the slicing axis is under one
  slice it is a 2D box on that slice; otherwise it is a 3D box whose slice range
  (:func:`box_slice_range`) bounds propagation and whose in-plane rectangle prompts every slice of
  that range. A box that partly leaves the volume is clipped to it; one wholly outside is an error.
- A mask prompt is bool, either 3D on the volume grid or 2D on one slice grid ``(rows, cols)``.

SlicerSAM prompt file (JSON), read by :func:`load_prompt_file`, written by
:func:`save_prompt_file`::

    {
      "frame": "ras",                 # "ras" (mm) or "kji" (voxel, array order); default "ras"
      "orientation": "axial",         # slicing orientation "slice" refers to; default "axial"
      "points": [{"position": [x, y, z], "positive": true}, ...],   # optional
      "box": {"corners": [[x, y, z], [x, y, z]]},                    # optional
      "slice": 12                     # optional slice index; default: inferred from the prompts
    }

At least one point or a box is required; unknown fields are rejected so that typos do not pass
silently. Slicer markups files (.mrk.json) are read by :mod:`SlicerSAM.markups`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np

from SlicerSAM.errors import PromptError

if TYPE_CHECKING:  # imported for annotations only: keeps this module importable on its own
    from SlicerSAM.slicing import SlicePlane
    from SlicerSAM.volume import Volume

logger = logging.getLogger(__name__)

FRAMES = ("ras", "kji")
ORIENTATIONS = ("axial", "coronal", "sagittal")
# Slack on "within half a voxel": positions saved as text (markups, JSON) lose a few digits, and a
# point Slicer put exactly on a slice centre must not fail by 1e-9 of a voxel.
_TOLERANCE_VOXELS = 1e-3
# A box narrower or lower than this (model-image pixels, between its corners' pixel centres) has
# no area: a point or a line, not a region the model can segment.
_MIN_BOX_PIXELS = 1e-3

Vec3 = Tuple[float, float, float]


def _vec3(value, what: str) -> Vec3:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what} must be 3 numbers, got {value!r}") from exc
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise PromptError(f"{what} must be 3 finite numbers, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _check_frame(frame) -> str:
    if frame not in FRAMES:
        raise PromptError(f"frame must be one of {FRAMES}, got {frame!r}")
    return frame


@dataclass(frozen=True)
class Point:
    """One click: ``position`` (3,) in the frame of the enclosing :class:`Prompts`."""

    position: Vec3
    positive: bool = True

    def __post_init__(self):
        object.__setattr__(self, "position", _vec3(self.position, "point position"))
        object.__setattr__(self, "positive", bool(self.positive))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box given by two opposite corners (3,) in ``frame``.

    Flat along the slicing axis (under one slice): a 2D box on that slice. Thicker: a 3D box.
    ``frame`` None takes the frame of the :class:`Prompts` holding it (set there), so a box taken
    out of its Prompts still knows how to read its corners (:func:`box_slice_range`).
    """

    corner_a: Vec3
    corner_b: Vec3
    frame: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "corner_a", _vec3(self.corner_a, "box corner_a"))
        object.__setattr__(self, "corner_b", _vec3(self.corner_b, "box corner_b"))
        if self.frame is not None:
            _check_frame(self.frame)

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) of the box (duplicates when it is flat)."""
        a, b = np.asarray(self.corner_a), np.asarray(self.corner_b)
        sel = np.array([[(n >> d) & 1 for d in range(3)] for n in range(8)], dtype=bool)
        return np.where(sel, b[None, :], a[None, :])


@dataclass(frozen=True, eq=False)
class Prompts:
    """User-level prompts in patient (``frame="ras"``, mm) or voxel (``"kji"``) coordinates.

    ``mask``: bool, 3D (K, J, I) on the volume grid or 2D (rows, cols) on the slice grid.
    ``orientation`` and ``index`` are optional hints from a prompt file: the slice the prompts were
    placed on (``index`` counts along ``orientation``'s slicing axis).
    """

    points: Tuple[Point, ...] = ()
    box: Optional[Box] = None
    mask: Optional[np.ndarray] = field(default=None, repr=False)
    frame: str = "ras"
    orientation: Optional[str] = None
    index: Optional[int] = None

    def __post_init__(self):
        _check_frame(self.frame)
        points = tuple(self.points)
        for n, p in enumerate(points):
            if not isinstance(p, Point):
                raise PromptError(f"points[{n}] must be a Point, got {type(p).__name__}")
        object.__setattr__(self, "points", points)
        if self.box is not None:
            if not isinstance(self.box, Box):
                raise PromptError(f"box must be a Box, got {type(self.box).__name__}")
            if self.box.frame is None:
                object.__setattr__(self, "box", dataclasses.replace(self.box, frame=self.frame))
            elif self.box.frame != self.frame:
                raise PromptError(
                    f"box is in frame {self.box.frame!r} but the prompts are in {self.frame!r}"
                )
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim not in (2, 3):
                raise PromptError(f"mask must be 2D (slice) or 3D (volume), got shape {mask.shape}")
            object.__setattr__(self, "mask", mask.astype(bool, copy=False))
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise PromptError(
                f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}"
            )
        if self.index is not None:
            object.__setattr__(self, "index", _as_int(self.index, "slice index"))

    @property
    def is_empty(self) -> bool:
        return not self.points and self.box is None and self.mask is None

    def __eq__(self, other):
        if not isinstance(other, Prompts):
            return NotImplemented
        same_mask = (self.mask is None and other.mask is None) or (
            self.mask is not None
            and other.mask is not None
            and np.array_equal(self.mask, other.mask)
        )
        return (
            self.points == other.points
            and self.box == other.box
            and self.frame == other.frame
            and self.orientation == other.orientation
            and self.index == other.index
            and same_mask
        )

    __hash__ = None  # holds an array


@dataclass(frozen=True, eq=False)
class SlicePrompts:
    """Prompts of one slice in model-image pixels (docs/architecture.md).

    points_xy (N, 2) float32 ``(x, y)``; point_labels (N,) int32 1 fg / 0 bg; box_xyxy (4,) float32;
    mask_logits (1, 256, 256) float32 low-res logits of an earlier result; mask (rows, cols) bool on
    the slice grid (an existing segment: a mask prompt for models trained with one, the result
    that clicks correct for box-trained models); bounds_xyxy (4,) float32: in-plane limits (a 3D
    ROI's rectangle) that the boxes a box-trained model is given stay inside.
    """

    index: int
    points_xy: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    box_xyxy: Optional[np.ndarray] = None
    mask_logits: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    bounds_xyxy: Optional[np.ndarray] = None

    def __post_init__(self):
        object.__setattr__(self, "index", _as_int(self.index, "slice index"))
        if (self.points_xy is None) != (self.point_labels is None):
            raise PromptError("points_xy and point_labels must be given together")
        if self.points_xy is not None:
            xy = np.asarray(self.points_xy, dtype=np.float32).reshape(-1, 2)
            labels = np.asarray(self.point_labels, dtype=np.int32).reshape(-1)
            if len(xy) != len(labels):
                raise PromptError(f"{len(xy)} points but {len(labels)} point labels")
            if len(xy) == 0:
                xy = labels = None
            object.__setattr__(self, "points_xy", xy)
            object.__setattr__(self, "point_labels", labels)
        if self.box_xyxy is not None:
            box = np.asarray(self.box_xyxy, dtype=np.float32).reshape(-1)
            if box.shape != (4,):
                raise PromptError(f"box_xyxy must be 4 numbers (x0, y0, x1, y1), got {box.shape}")
            object.__setattr__(self, "box_xyxy", box)
        if self.mask_logits is not None:
            object.__setattr__(self, "mask_logits", np.asarray(self.mask_logits, dtype=np.float32))
        if self.mask is not None:
            mask = np.asarray(self.mask).astype(bool, copy=False)
            if mask.ndim != 2:
                raise PromptError(f"a slice mask must be 2D (rows, cols), got shape {mask.shape}")
            object.__setattr__(self, "mask", mask)
        if self.bounds_xyxy is not None:
            bounds = np.asarray(self.bounds_xyxy, dtype=np.float32).reshape(-1)
            if bounds.shape != (4,):
                raise PromptError(f"bounds_xyxy must be 4 numbers (x0, y0, x1, y1), got {bounds}")
            object.__setattr__(self, "bounds_xyxy", bounds)

    @property
    def num_points(self) -> int:
        return 0 if self.points_xy is None else len(self.points_xy)

    @property
    def is_empty(self) -> bool:
        return (
            self.points_xy is None
            and self.box_xyxy is None
            and self.mask_logits is None
            and self.mask is None
        )


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise PromptError(f"{what} must be an integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# Conversion to one slice
# ----------------------------------------------------------------------------------------------
def _to_kji(positions: np.ndarray, frame: str, volume: Volume) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(positions) == 0 or frame == "kji":
        return positions
    return np.asarray(volume.ras_to_kji(positions), dtype=np.float64).reshape(-1, 3)


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.1f}" for x in v) + ")"


def _extent_text(volume: Volume) -> str:
    k, j, i = volume.shape[:3]
    return (
        f"the volume spans k 0..{k - 1}, j 0..{j - 1}, i 0..{i - 1} "
        f"(shape (K, J, I) = ({k}, {j}, {i}))"
    )


def _slice_of(position: float) -> int:
    # round half up, not numpy's half-to-even: a point on a slice border goes to the upper slice
    return int(math.floor(position + 0.5))


def _check_points_inside(points: Sequence[Point], kji: np.ndarray, frame: str, volume: Volume):
    shape = np.asarray(volume.shape[:3], dtype=np.float64)
    lo, hi = -0.5 - _TOLERANCE_VOXELS, shape - 0.5 + _TOLERANCE_VOXELS
    for n, (p, v) in enumerate(zip(points, kji)):
        if np.any(v < lo) or np.any(v > hi):
            where = (
                f"at {_fmt(p.position)} mm RAS (voxel (k, j, i) {_fmt(v)})"
                if frame == "ras"
                else f"at voxel (k, j, i) {_fmt(v)}"
            )
            raise PromptError(f"point {n} {where} is outside the volume: {_extent_text(volume)}")


def _box_kji_corners(box: Box, volume: Volume, frame: Optional[str] = None) -> np.ndarray:
    frame = frame or box.frame or "ras"
    kji = _to_kji(box.corners(), frame, volume)
    shape = np.asarray(volume.shape[:3], dtype=np.float64)
    lo, hi = kji.min(axis=0), kji.max(axis=0)
    if np.any(hi < -0.5 - _TOLERANCE_VOXELS) or np.any(lo > shape - 0.5 + _TOLERANCE_VOXELS):
        unit = "mm RAS" if frame == "ras" else "voxel (k, j, i)"
        raise PromptError(
            f"box {_fmt(box.corner_a)} - {_fmt(box.corner_b)} {unit} lies outside the volume: "
            f"voxel (k, j, i) {_fmt(lo)} - {_fmt(hi)}, while {_extent_text(volume)}"
        )
    return kji


def _slice_range(slice_coords: np.ndarray, num_slices: int) -> Tuple[int, int]:
    """Slices whose centres the span covers; a span under one slice is the slice of its centre."""
    lo, hi = float(np.min(slice_coords)), float(np.max(slice_coords))
    if hi - lo < 1.0:
        first = last = _slice_of((lo + hi) / 2.0)
    else:
        first = int(math.ceil(lo - _TOLERANCE_VOXELS))
        last = int(math.floor(hi + _TOLERANCE_VOXELS))
    first, last = max(first, 0), min(last, num_slices - 1)
    if first > last:  # cannot happen after the inside check, kept as a guard
        raise PromptError(f"box covers no slice (slice coordinates {lo:.2f}..{hi:.2f})")
    return first, last


def box_slice_range(
    box: Box, volume: Volume, plane: SlicePlane, frame: Optional[str] = None
) -> Tuple[int, int]:
    """First and last slice (inclusive, along ``plane``) that a box covers, clipped to the volume.

    A box thinner than one slice gives ``(index, index)``. ``frame`` defaults to the box's own
    (set by :class:`Prompts`), else "ras".
    """
    kji = _box_kji_corners(box, volume, frame)
    slice_coords, _ = plane.voxel_to_xy(kji)
    return _slice_range(np.asarray(slice_coords, dtype=np.float64), plane.num_slices)


def roi_on_plane(
    box: Box, volume: Volume, plane: SlicePlane, frame: Optional[str] = None
) -> Tuple[Tuple[int, int], np.ndarray]:
    """A 3D box as a region of interest of ``plane``'s slices: ((first, last) slices it covers,
    inclusive; (4,) float32 XYXY in-plane rectangle in model-image pixels, clipped to the image).

    The rectangle is the one :func:`prompts_on_slice` gives as the box of every slice in range.
    """
    kji = _box_kji_corners(box, volume, frame)
    slice_coords, xy = plane.voxel_to_xy(kji)
    first_last = _slice_range(np.asarray(slice_coords, dtype=np.float64), plane.num_slices)
    return first_last, _rectangle(np.asarray(xy, dtype=np.float64).reshape(-1, 2), plane)


def _rectangle(xy: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """The XYXY rectangle (4,) float32 around points (N, 2) (a box's corners), clipped to the
    model image; PromptError when it has no area (a box of zero size, or one left with no width
    or height inside the image)."""
    h, w = plane.image_shape
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    width = min(x1, w - 1) - max(x0, 0)
    height = min(y1, h - 1) - max(y0, 0)
    if width < _MIN_BOX_PIXELS or height < _MIN_BOX_PIXELS:
        raise PromptError(
            f"the box has zero size: it spans {max(width, 0):.1f} x {max(height, 0):.1f} pixels "
            f"of the {plane.orientation} slices; draw it around the structure"
        )
    return np.array(
        [
            np.clip(x0, 0, w - 1),
            np.clip(y0, 0, h - 1),
            np.clip(x1, 0, w - 1),
            np.clip(y1, 0, h - 1),
        ],
        dtype=np.float32,
    )


def points_by_slice(prompts: Prompts, volume: Volume, plane: SlicePlane) -> dict:
    """{slice index: the points of ``prompts`` on that slice} along ``plane`` (each point on the
    slice whose centre is within half a voxel; index order). Points outside the volume raise
    :class:`PromptError` naming them."""
    if not prompts.points:
        return {}
    kji = _to_kji([p.position for p in prompts.points], prompts.frame, volume)
    _check_points_inside(prompts.points, kji, prompts.frame, volume)
    slices, _ = plane.voxel_to_xy(kji)
    groups: dict = {}
    for point, coord in zip(prompts.points, np.asarray(slices, dtype=np.float64).reshape(-1)):
        index = min(max(_slice_of(coord), 0), plane.num_slices - 1)
        groups.setdefault(index, []).append(point)
    return {k: tuple(groups[k]) for k in sorted(groups)}


def _check_index(index, num_slices: int, orientation: str) -> int:
    index = _as_int(index, "slice index")
    if not 0 <= index < num_slices:
        raise PromptError(
            f"slice index {index} is outside the volume: {orientation} slices run "
            f"0..{num_slices - 1}"
        )
    return index


def prompts_on_slice(
    prompts: Prompts, volume: Volume, plane: SlicePlane, index: Optional[int] = None
) -> SlicePrompts:
    """Convert user prompts to model-image pixels of one slice.

    Args:
        prompts: points, box and/or mask in RAS mm or voxel (k, j, i) coordinates.
        volume: the volume the prompts refer to (its geometry converts RAS to voxels).
        plane: the slicing of ``volume`` (``plane_for(volume, orientation)``).
        index: slice index along ``plane``; None takes ``prompts.index``, else the points' slice,
            else the box's middle slice, else the 3D mask's largest slice.

    Returns:
        SlicePrompts with points (x, y), labels, box XYXY in model-image pixels and the mask on
        the slice grid.

    Raises:
        PromptError: no prompt; a point outside the volume or off the slice; points on several
            slices; the slice outside the box's slice range; a mask on another grid.
    """
    if not isinstance(prompts, Prompts):
        raise PromptError(f"expected Prompts, got {type(prompts).__name__}")
    if prompts.is_empty:
        raise PromptError("no prompt given: place at least one point, a box or a mask")
    n = plane.num_slices
    if index is None and prompts.index is not None:
        if prompts.orientation is not None and prompts.orientation != plane.orientation:
            raise PromptError(
                f"the prompts name {prompts.orientation} slice {prompts.index}, but the volume is "
                f"sliced {plane.orientation}; give the slice index for that orientation"
            )
        index = prompts.index
    if index is not None:
        index = _check_index(index, n, plane.orientation)

    # --- points: voxel -> (slice coordinate, x, y)
    point_slices = point_xy = None
    if prompts.points:
        kji = _to_kji([p.position for p in prompts.points], prompts.frame, volume)
        _check_points_inside(prompts.points, kji, prompts.frame, volume)
        point_slices, point_xy = plane.voxel_to_xy(kji)
        point_slices = np.asarray(point_slices, dtype=np.float64).reshape(-1)
        point_xy = np.asarray(point_xy, dtype=np.float64).reshape(-1, 2)

    # --- box: 8 corners -> slice range and in-plane rectangle
    box_range = box_xy = None
    if prompts.box is not None:
        kji = _box_kji_corners(prompts.box, volume, prompts.frame)
        box_slices, box_xy = plane.voxel_to_xy(kji)
        box_range = _slice_range(np.asarray(box_slices, dtype=np.float64), n)
        box_xy = np.asarray(box_xy, dtype=np.float64).reshape(-1, 2)

    mask3d = prompts.mask if prompts.mask is not None and prompts.mask.ndim == 3 else None
    if mask3d is not None and tuple(mask3d.shape) != tuple(volume.shape[:3]):
        raise PromptError(
            f"3D mask shape {mask3d.shape} differs from the volume's {tuple(volume.shape[:3])}"
        )

    # --- which slice
    if index is None:
        if point_slices is not None:
            index = _slice_of(point_slices[0])
        elif box_range is not None:
            # a 3D box prompts its middle slice first (the LiteMedSAM 3D protocol)
            index = (box_range[0] + box_range[1]) // 2
        elif mask3d is not None:
            areas = [int(np.count_nonzero(plane.grid(mask3d, s))) for s in range(n)]
            if max(areas) == 0:
                raise PromptError("the mask prompt is empty and no slice index was given")
            index = int(np.argmax(areas))
        else:
            raise PromptError("a 2D mask prompt needs a slice index (index=...)")
        index = _check_index(index, n, plane.orientation)

    # --- every point on that slice
    if point_slices is not None:
        off = np.abs(point_slices - index) > 0.5 + _TOLERANCE_VOXELS
        if np.any(off):
            listed = "; ".join(
                f"point {m} {_fmt(prompts.points[m].position)} on slice {point_slices[m]:.2f}"
                for m in range(len(point_slices))
            )
            raise PromptError(
                f"all points must lie on one {plane.orientation} slice (within half a voxel of "
                f"slice {index}), but: {listed}"
            )

    # --- the box on that slice
    box_xyxy = None
    if box_range is not None:
        if not box_range[0] <= index <= box_range[1]:
            raise PromptError(
                f"{plane.orientation} slice {index} is outside the box's slice range "
                f"{box_range[0]}..{box_range[1]}"
            )
        box_xyxy = _rectangle(box_xy, plane)

    # --- the mask on that slice's grid
    mask2d = None
    if prompts.mask is not None:
        if mask3d is not None:
            mask2d = np.array(plane.grid(mask3d, index), dtype=bool)
        else:
            mask2d = prompts.mask
            if tuple(mask2d.shape) != tuple(plane.grid_shape):
                raise PromptError(
                    f"2D mask shape {mask2d.shape} differs from the {plane.orientation} slice "
                    f"grid {tuple(plane.grid_shape)} (rows, cols)"
                )

    labels = None
    if point_xy is not None:
        labels = np.array([1 if p.positive else 0 for p in prompts.points], dtype=np.int32)
    return SlicePrompts(
        index=index,
        points_xy=None if point_xy is None else point_xy.astype(np.float32),
        point_labels=labels,
        box_xyxy=box_xyxy,
        mask=mask2d,
    )


def _grid_kji(volume_shape, plane: SlicePlane, index: int, rows, cols) -> np.ndarray:
    """Voxel (k, j, i) of grid pixels (rows, cols) of slice ``index``.

    Reads the answer off ``plane.grid`` applied to broadcast index arrays, so it cannot disagree
    with the plane's own orientation and flips (and costs no memory).
    """
    shape = tuple(volume_shape[:3])
    out = []
    for axis in range(3):
        ramp_shape = [1, 1, 1]
        ramp_shape[axis] = shape[axis]
        ramp = np.broadcast_to(np.arange(shape[axis]).reshape(ramp_shape), shape)
        out.append(np.asarray(plane.grid(ramp, index))[rows, cols])
    return np.stack(out, axis=-1).astype(np.float64)


def mask_box_xyxy(
    mask: np.ndarray, volume: Volume, plane: SlicePlane, index: int, margin: float = 0.0
) -> Optional[np.ndarray]:
    """Bounding box XYXY (4,) in model-image pixels of a slice-grid mask; None when empty.

    ``margin`` grows the box by that many model-image pixels on each side (clipped to the image).
    Used to prompt a slice from a neighbouring slice's result.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(plane.grid_shape):
        raise PromptError(
            f"mask shape {mask.shape} differs from the slice grid {tuple(plane.grid_shape)}"
        )
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    r = np.array([rows[0], rows[0], rows[-1], rows[-1]])
    c = np.array([cols[0], cols[-1], cols[0], cols[-1]])
    _, xy = plane.voxel_to_xy(_grid_kji(volume.shape, plane, index, r, c))
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    h, w = plane.image_shape
    x0, y0 = xy.min(axis=0) - margin
    x1, y1 = xy.max(axis=0) + margin
    return np.array(
        [max(x0, 0.0), max(y0, 0.0), min(x1, w - 1.0), min(y1, h - 1.0)], dtype=np.float32
    )


# ----------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------
_FILE_FIELDS = ("frame", "orientation", "points", "box", "slice")


def _field_error(path, name: str, message: str) -> PromptError:
    return PromptError(f"{path}: field '{name}': {message}")


def _file_vec3(path, name: str, value) -> Vec3:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    ):
        raise _field_error(path, name, f"expected 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def parse_prompt_dict(data, source="<prompts>") -> Prompts:
    """Prompts from the decoded JSON of a prompt file (see the module docstring)."""
    if not isinstance(data, dict):
        raise PromptError(f"{source}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FILE_FIELDS))
    if unknown:
        raise _field_error(
            source, unknown[0], f"unknown field (allowed: {', '.join(_FILE_FIELDS)})"
        )
    frame = data.get("frame", "ras")
    if frame not in FRAMES:
        raise _field_error(source, "frame", f"must be one of {FRAMES}, got {frame!r}")
    orientation = data.get("orientation", "axial")
    if orientation not in ORIENTATIONS:
        raise _field_error(
            source, "orientation", f"must be one of {ORIENTATIONS}, got {orientation!r}"
        )
    points = []
    raw_points = data.get("points", [])
    if not isinstance(raw_points, list):
        raise _field_error(source, "points", "expected a list of {position, positive}")
    for n, p in enumerate(raw_points):
        name = f"points[{n}]"
        if not isinstance(p, dict):
            raise _field_error(source, name, f"expected an object, got {p!r}")
        extra = sorted(set(p) - {"position", "positive"})
        if extra:
            raise _field_error(source, f"{name}.{extra[0]}", "unknown field")
        if "position" not in p:
            raise _field_error(source, f"{name}.position", "missing")
        positive = p.get("positive", True)
        if not isinstance(positive, bool):
            raise _field_error(source, f"{name}.positive", f"expected true/false, got {positive!r}")
        points.append(Point(_file_vec3(source, f"{name}.position", p["position"]), positive))
    box = None
    if data.get("box") is not None:
        raw = data["box"]
        if not isinstance(raw, dict) or set(raw) != {"corners"}:
            raise _field_error(source, "box", 'expected {"corners": [[x, y, z], [x, y, z]]}')
        corners = raw["corners"]
        if not isinstance(corners, list) or len(corners) != 2:
            raise _field_error(source, "box.corners", "expected two corners [[x, y, z], [x, y, z]]")
        box = Box(
            _file_vec3(source, "box.corners[0]", corners[0]),
            _file_vec3(source, "box.corners[1]", corners[1]),
        )
    index = data.get("slice")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise _field_error(source, "slice", f"expected a slice index >= 0, got {index!r}")
    if not points and box is None:
        raise _field_error(source, "points", "no prompt: give at least one point or a box")
    return Prompts(points=tuple(points), box=box, frame=frame, orientation=orientation, index=index)


def load_prompt_file(path) -> Prompts:
    """Read a SlicerSAM prompt JSON file (format in the module docstring and docs/prompts.md).

    The file's "orientation" and "slice" come back as ``Prompts.orientation`` / ``Prompts.index``.
    """
    path = Path(path)
    return parse_prompt_dict(read_json_file(path, "prompt file"), source=str(path))


def read_json_file(path: Union[str, Path], what: str):
    """The parsed JSON of ``path``; PromptError naming ``what`` and the file when unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PromptError(
            f"{path} is not a JSON file (not valid JSON: {exc}); expected a {what}"
        ) from exc


def prompts_to_dict(prompts: Prompts, orientation: Optional[str] = None, index=None) -> dict:
    """The prompt-file JSON object for ``prompts`` (masks are not stored in prompt files)."""
    if prompts.mask is not None:
        raise PromptError("a mask prompt cannot be stored in a prompt file; save it as a label map")
    data = {"frame": prompts.frame, "orientation": orientation or prompts.orientation or "axial"}
    if prompts.points:
        data["points"] = [
            {"position": list(p.position), "positive": p.positive} for p in prompts.points
        ]
    if prompts.box is not None:
        data["box"] = {"corners": [list(prompts.box.corner_a), list(prompts.box.corner_b)]}
    index = prompts.index if index is None else index
    if index is not None:
        data["slice"] = int(index)
    return data


def save_prompt_file(path, prompts: Prompts, orientation: Optional[str] = None, index=None) -> None:
    """Write ``prompts`` as a prompt JSON file, atomically (a temporary file, then rename)."""
    path = Path(path)
    text = json.dumps(prompts_to_dict(prompts, orientation, index), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
