"""Region-limited edits of label arrays, undo snapshots, and Slicer array/geometry hand-over.

The Slicer module (``SlicerSAM.py``) writes model results into a user's segment. Rewriting the
whole segment for a one-slice change would be slow on large volumes and would make undo keep a
copy of the whole volume per step, so every write here is planned first:

1. :func:`plan_edit` computes the new content of the part of the label array the mask covers
   (its ``scope``: one slice, a slab of propagated slices, or the whole volume), then shrinks it
   to the bounding box of the voxels that actually change (a :class:`Region`). The returned
   :class:`Edit` holds the previous (``before``) and new (``after``) content of that box only.
2. :func:`apply_edit` writes ``after`` (or ``before``, to undo) into that box and nothing else.
   Inside Slicer the Logic sends the same box to the segment with an extent instead
   (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``), so voxels outside it are
   never touched.
3. :class:`UndoStack` keeps the last steps (each a list of edits), bounded in steps and bytes;
   undoing restores the ``before`` blocks exactly (byte for byte).

Arrays are (K, J, I) as ``slicer.util.arrayFromVolume`` / ``arrayFromSegmentBinaryLabelmap`` give
them; :class:`Region` converts to a VTK extent ``(i0, i1, j0, j1, k0, k1)`` (inclusive, I first)
at the one place Slicer needs it. The 4x4 ``IJKToRAS`` handling (:func:`as_ijk_to_ras`,
:func:`volume_from_arrays`, :func:`same_grid`) lives here too; reading a ``vtkMatrix4x4`` into
numbers is Slicer code (``slicer.util.arrayFromVTKMatrix``).

This module never imports slicer, qt, ctk or vtk.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np

from SlicerSAM.errors import SlicerSAMError, VolumeError

if TYPE_CHECKING:  # annotations only: editing must import without the rest of the engine
    from SlicerSAM.volume import Volume

logger = logging.getLogger(__name__)

MODES = ("replace", "add", "remove")
"""How a mask combines with a segment inside its scope.

``replace``: inside the scope the segment becomes exactly the mask (voxels of the segment that the
mask leaves out are cleared). ``add``: union. ``remove``: the mask's voxels are cleared.
"""

DEFAULT_UNDO_STEPS = 10
DEFAULT_UNDO_BYTES = 512 * 1024 * 1024  # a CT slab of ~500 slices of 512x512 uint8 at worst

Index3 = Tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A box of voxels: ``start`` inclusive, ``stop`` exclusive, both (k, j, i) array order."""

    start: Index3
    stop: Index3

    def __post_init__(self):
        start = tuple(int(v) for v in self.start)
        stop = tuple(int(v) for v in self.stop)
        if len(start) != 3 or len(stop) != 3:
            raise ValueError(f"a Region needs 3 start and 3 stop indices, got {start}, {stop}")
        if any(a < 0 or b < a for a, b in zip(start, stop)):
            raise ValueError(f"invalid Region start {start} stop {stop}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)

    @classmethod
    def full(cls, shape: Sequence[int]) -> Region:
        """The whole (K, J, I) array."""
        return cls((0, 0, 0), tuple(int(n) for n in shape[:3]))

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        """Index tuple for numpy: ``array[region.slices]``."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> Index3:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        k, j, i = self.shape
        return k * j * i

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    @property
    def extent(self) -> Tuple[int, int, int, int, int, int]:
        """VTK extent ``(i0, i1, j0, j1, k0, k1)``, inclusive, I first (``vtkImageData`` order)."""
        (k0, j0, i0), (k1, j1, i1) = self.start, self.stop
        return (i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)

    def offset(self, by: Sequence[int]) -> Region:
        """This region moved by ``by`` voxels (k, j, i)."""
        by = tuple(int(v) for v in by)
        return Region(
            tuple(a + d for a, d in zip(self.start, by)),
            tuple(b + d for b, d in zip(self.stop, by)),
        )

    def union(self, other: Optional[Region]) -> Region:
        """Smallest region holding both."""
        if other is None or other.is_empty:
            return self
        if self.is_empty:
            return other
        return Region(
            tuple(min(a, b) for a, b in zip(self.start, other.start)),
            tuple(max(a, b) for a, b in zip(self.stop, other.stop)),
        )

    def check_inside(self, shape: Sequence[int]) -> None:
        if any(b > n for b, n in zip(self.stop, shape[:3])):
            raise ValueError(f"region {self.start}..{self.stop} exceeds array shape {tuple(shape)}")


def bounding_region(mask: np.ndarray) -> Optional[Region]:
    """Bounding box of the True voxels of a 3D mask, or None when it has none."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"bounding_region needs a 3D mask, got shape {mask.shape}")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return Region(tuple(start), tuple(stop))


def changed_region(before: np.ndarray, after: np.ndarray) -> Optional[Region]:
    """Bounding box of the voxels where two equally shaped 3D arrays differ, or None."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} vs {after.shape}")
    return bounding_region(before != after)


def slice_scope(axis: int, index: int, shape: Sequence[int]) -> Region:
    """The region of one slice ``index`` across array ``axis`` (0 = K, 1 = J, 2 = I)."""
    axis, index = int(axis), int(index)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if not 0 <= index < int(shape[axis]):
        raise ValueError(f"slice {index} outside 0..{int(shape[axis]) - 1} along axis {axis}")
    start = [0, 0, 0]
    stop = [int(n) for n in shape[:3]]
    start[axis], stop[axis] = index, index + 1
    return Region(tuple(start), tuple(stop))


def masks_to_block(
    plane, masks: Dict[int, np.ndarray], shape: Sequence[int]
) -> Tuple[Region, np.ndarray]:
    """Place per-slice masks (slice grids of ``plane``) into one bool block in array order.

    ``plane`` is a ``SlicerSAM.slicing.SlicePlane`` (only ``axis`` and ``set_grid`` are used, so
    the grid orientation and flips stay in slicing.py). The block spans the slab from the lowest
    to the highest slice given; slices in between without a mask stay False (they are in the
    scope, so ``replace`` clears them: propagation results say "empty" there).

    Returns:
        (scope region, bool block of ``scope.shape``).
    """
    if not masks:
        raise ValueError("no slice masks given")
    shape = tuple(int(n) for n in shape[:3])
    indices = sorted(int(i) for i in masks)
    scope = slice_scope(plane.axis, indices[0], shape).union(
        slice_scope(plane.axis, indices[-1], shape)
    )
    # set_grid works on whole (K, J, I) arrays. np.zeros maps zero pages lazily (calloc), so only
    # the pages of the slices written here are ever touched: a one-slice preview stays cheap.
    full = np.zeros(shape, dtype=bool)
    for index in indices:
        plane.set_grid(full, index, np.asarray(masks[index], dtype=bool))
    return scope, np.array(full[scope.slices], copy=True)


# ----------------------------------------------------------------------------------------------
# Edits
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Edit:
    """One planned change: the ``before``/``after`` content of ``region`` of target ``key``.

    ``key`` names the target (the Slicer Logic uses ``(segmentationNodeID, segmentID)``).
    Both arrays have ``region.shape`` and the label array's dtype.
    """

    key: Hashable
    region: Region
    before: np.ndarray
    after: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)

    @property
    def changed_voxels(self) -> int:
        return int(np.count_nonzero(self.before != self.after))


def _scoped(
    labels: np.ndarray, mask: np.ndarray, scope: Optional[Region]
) -> Tuple[Region, np.ndarray]:
    labels_shape = tuple(labels.shape)
    if labels.ndim != 3:
        raise ValueError(f"label array must be 3D (K, J, I), got shape {labels_shape}")
    if scope is None:
        scope = Region.full(labels_shape)
    scope.check_inside(labels_shape)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    if mask.shape != scope.shape:
        if mask.size == scope.size and mask.ndim == 2:  # a 2D slice for a one-slice scope
            mask = mask.reshape(scope.shape)
        else:
            raise ValueError(f"mask shape {mask.shape} does not fit the scope {scope.shape}")
    return scope, mask


def plan_edit(
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    scope: Optional[Region] = None,
    value: int = 1,
    mode: str = "replace",
    overwrite: bool = True,
    key: Hashable = None,
) -> Optional[Edit]:
    """Plan writing ``mask`` into ``labels`` as label ``value``; nothing is modified.

    Args:
        labels: (K, J, I) integer label array (a segment's binary labelmap, value 1, or a
            multi-label map).
        mask: bool mask of ``scope.shape`` (a 2D mask is accepted for a one-slice scope).
        scope: the part of ``labels`` the mask covers; None = the whole array.
        value: label value the mask writes (non-zero).
        mode: one of :data:`MODES`.
        overwrite: False leaves voxels holding another non-zero label alone (multi-label maps).
        key: target name stored in the :class:`Edit`.

    Returns:
        The :class:`Edit` over the bounding box of changed voxels, or None when nothing changes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    value = int(value)
    if value == 0:
        raise ValueError("value must be non-zero (0 is background)")
    labels = np.asarray(labels)
    scope, mask = _scoped(labels, mask, scope)
    current = labels[scope.slices]
    new = current.copy()
    ours = current == value
    writable = np.ones_like(mask) if overwrite else (current == 0) | ours
    if mode in ("replace", "remove"):
        clear = ours & (~mask if mode == "replace" else mask)
        new[clear] = 0
    if mode in ("replace", "add"):
        new[mask & writable] = value
    local = changed_region(current, new)
    if local is None:
        return None
    region = local.offset(scope.start)
    return Edit(
        key=key,
        region=region,
        before=np.array(current[local.slices], copy=True),
        after=np.array(new[local.slices], copy=True),
    )


def apply_edit(labels: np.ndarray, edit: Edit, *, undo: bool = False) -> Region:
    """Write ``edit.after`` (``edit.before`` to undo) into its region of ``labels``, in place."""
    edit.region.check_inside(labels.shape)
    labels[edit.region.slices] = edit.before if undo else edit.after
    return edit.region


def write_mask(
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    scope: Optional[Region] = None,
    value: int = 1,
    mode: str = "replace",
    overwrite: bool = True,
    undo_stack: Optional[UndoStack] = None,
    key: Hashable = None,
) -> Optional[Region]:
    """Write ``mask`` into ``labels`` in place, touching only the box of changed voxels.

    Arguments as :func:`plan_edit`. When ``undo_stack`` is given the edit is pushed as one step.

    Returns:
        The changed :class:`Region`, or None when nothing changed.
    """
    edit = plan_edit(
        labels, mask, scope=scope, value=value, mode=mode, overwrite=overwrite, key=key
    )
    if edit is None:
        return None
    apply_edit(labels, edit)
    if undo_stack is not None:
        undo_stack.push([edit])
    return edit.region


# ----------------------------------------------------------------------------------------------
# Undo
# ----------------------------------------------------------------------------------------------
class UndoStack:
    """Bounded undo history: each step is a list of :class:`Edit` undone together.

    The oldest steps are dropped when more than ``max_steps`` are held, or when the held bytes
    exceed ``max_bytes`` (the newest step is always kept, however large: undoing the last action
    must work).
    """

    def __init__(self, max_steps: int = DEFAULT_UNDO_STEPS, max_bytes: int = DEFAULT_UNDO_BYTES):
        if int(max_steps) < 1:
            raise ValueError("max_steps must be at least 1")
        self.max_steps = int(max_steps)
        self.max_bytes = int(max_bytes)
        self._steps: deque = deque()

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def can_undo(self) -> bool:
        return bool(self._steps)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for step in self._steps for e in step)

    def push(self, edits: Union[Edit, Sequence[Edit]]) -> None:
        """Add one step (empty steps are ignored)."""
        step = [edits] if isinstance(edits, Edit) else [e for e in edits if e is not None]
        if not step:
            return
        self._steps.append(step)
        while len(self._steps) > self.max_steps or (
            len(self._steps) > 1 and self.nbytes > self.max_bytes
        ):
            dropped = self._steps.popleft()
            logger.debug("undo history full: dropped a step of %d edit(s)", len(dropped))

    def peek(self) -> Optional[List[Edit]]:
        return list(self._steps[-1]) if self._steps else None

    def pop(self) -> Optional[List[Edit]]:
        """Remove and return the last step (its edits in the order they were made), or None."""
        return self._steps.pop() if self._steps else None

    def clear(self) -> None:
        self._steps.clear()

    def discard(self, key: Hashable) -> None:
        """Forget every edit of target ``key`` (its node was deleted); empty steps go too."""
        kept = deque()
        for step in self._steps:
            step = [e for e in step if e.key != key]
            if step:
                kept.append(step)
        self._steps = kept


def undo(labels: np.ndarray, stack: UndoStack) -> Optional[Region]:
    """Undo the last step of ``stack`` on a numpy label array (all its edits must target it).

    Returns the restored region (union of the step's regions), or None when there is no step.
    """
    step = stack.pop()
    if step is None:
        return None
    region = None
    for edit in reversed(step):  # reverse order: overlapping edits restore the oldest content
        region = apply_edit(labels, edit, undo=True).union(region)
    return region


# ----------------------------------------------------------------------------------------------
# Geometry hand-over (numpy side of Slicer's arrays and IJKToRAS matrices)
# ----------------------------------------------------------------------------------------------
def as_ijk_to_ras(matrix) -> np.ndarray:
    """A checked (4, 4) float64 IJK-to-RAS matrix from nested rows or 16 row-major numbers.

    Accepts what ``slicer.util.arrayFromVTKMatrix(vtkMatrix4x4)`` returns, a nested list, or a
    flat sequence of 16 values (``vtkMatrix4x4.DeepCopy`` order: row-major). The matrix maps
    homogeneous ``(i, j, k, 1)`` (i first) to RAS millimetres.

    Raises:
        VolumeError: wrong size, non-finite entries, a last row other than (0, 0, 0, 1), or a
            singular 3x3 part (a zero spacing).
    """
    m = np.array(matrix, dtype=np.float64)
    if m.size != 16:
        raise VolumeError(f"IJK-to-RAS must be a 4x4 matrix, got {m.size} values")
    m = m.reshape(4, 4)
    if not np.all(np.isfinite(m)):
        raise VolumeError("IJK-to-RAS matrix holds non-finite values")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0)):
        raise VolumeError(f"IJK-to-RAS must be affine (last row 0 0 0 1), got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise VolumeError("IJK-to-RAS matrix is singular (a zero voxel spacing?)")
    return m


def spacing_from_ijk_to_ras(matrix) -> Tuple[float, float, float]:
    """Voxel spacing (sk, sj, si) in mm, array order, from the column norms of the matrix."""
    m = as_ijk_to_ras(matrix)
    si, sj, sk = (float(np.linalg.norm(m[:3, c])) for c in range(3))
    return (sk, sj, si)


def same_grid(shape_a, matrix_a, shape_b, matrix_b, tolerance_mm: float = 1e-3) -> bool:
    """Whether two (K, J, I) arrays with their IJK-to-RAS matrices lie on the same voxel grid.

    Compares the shapes and where the voxel corners land (within ``tolerance_mm``), so that a
    float round-trip through a file does not count as a different grid.
    """
    if tuple(int(n) for n in shape_a[:3]) != tuple(int(n) for n in shape_b[:3]):
        return False
    a, b = as_ijk_to_ras(matrix_a), as_ijk_to_ras(matrix_b)
    k, j, i = (int(n) for n in shape_a[:3])
    corners = np.array(
        [
            [x, y, z, 1.0]
            for x in (0, max(i - 1, 0))
            for y in (0, max(j - 1, 0))
            for z in (0, max(k - 1, 0))
        ]
    )
    return bool(np.max(np.abs(corners @ a.T - corners @ b.T)) <= tolerance_mm)


def volume_from_arrays(array: np.ndarray, ijk_to_ras, *, copy: bool = True) -> Volume:
    """Engine :class:`~SlicerSAM.volume.Volume` from a Slicer (K, J, I) array and IJK-to-RAS.

    ``copy`` (default) detaches the data from Slicer's VTK buffer: ``arrayFromVolume`` returns a
    view that becomes invalid when the node's image data is reallocated, while the engine may keep
    the volume (and cache embeddings keyed on its digest) for the whole session.
    """
    from SlicerSAM.volume import Volume

    array = np.array(array, copy=True) if copy else np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(
            f"expected a 3D scalar volume (K, J, I), got shape {array.shape}; vector or "
            "multi-component volumes are not supported"
        )
    if min(array.shape) < 1:
        raise VolumeError(f"volume has an empty dimension: shape {array.shape}")
    return Volume.from_array(array, as_ijk_to_ras(ijk_to_ras))


def arrays_from_volume(volume: Volume) -> Tuple[np.ndarray, np.ndarray]:
    """(array (K, J, I), IJK-to-RAS (4, 4)) of an engine volume, ready for
    ``slicer.util.updateVolumeFromArray`` and ``vtkMRMLVolumeNode.SetIJKToRASMatrix``."""
    return np.asarray(volume.array), as_ijk_to_ras(volume.ijk_to_ras)


def check_labels_on_grid(
    labels: np.ndarray, volume_shape: Sequence[int], what: str = "labels"
) -> None:
    """Raise a :class:`SlicerSAMError` naming ``what`` when a label array is not on the grid."""
    if (
        tuple(np.shape(labels)[:3]) != tuple(int(n) for n in volume_shape[:3])
        or np.ndim(labels) != 3
    ):
        raise SlicerSAMError(
            f"{what} array {tuple(np.shape(labels))} is not on the volume grid "
            f"{tuple(int(n) for n in volume_shape[:3])} (K, J, I)"
        )
