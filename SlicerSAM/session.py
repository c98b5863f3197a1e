"""The interactive session: what a user builds up while segmenting one structure, in one object.

Every front door drives an :class:`InteractiveSession`: the CLI's ``segment`` and ``propagate``,
the benchmark's workflow protocols (and so the demo), the Slicer module's Logic. They translate
their inputs (prompt files, markups nodes, simulated clicks) into calls here and the results back;
what a prompt means, how a region of interest bounds a walk and what a correction does exist
once, here and in the engine modules this one calls.

A session holds, in plain data:

- the volume (:class:`~SlicerSAM.volume.Volume`: a (K, J, I) array and its IJK-to-RAS matrix) and
  a :class:`~SlicerSAM.segmenter.Segmenter` for the current slicing orientation and intensity
  mapping (one model and one embedding cache for the whole session);
- key slices (:class:`KeySlice`): the prompts given on a slice, in model-image pixels, and the
  model's answer;
- a region of interest (:class:`Roi`): the slice range and in-plane rectangle of a 3D box, which
  bound every mask and every propagation;
- slices marked absent: a negative correction left nothing there, so no walk crosses them;
- the result (:meth:`InteractiveSession.result`): the key slices' masks over the last
  propagation's masks, on the slice grids; it is what ``accept`` writes;
- the accepted segment, a (K, J, I) uint8 label array (the session's own, or the caller's, e.g.
  the Slicer segment's array), with an undo step per accept.

How prompts on a slice combine (docs/prompts.md, "How prompts combine"):

1. A box drawn on the slice, or the ROI's rectangle when the slice has no previous mask: the box
   is the prompt; clicks choose within it. For a box-trained model (LiteMedSAM, MedSAM) the box's
   own mask is kept when it honours every click, so a click inside an ROI never changes a mask
   that already agrees with it; a model trained with points gets box and clicks together.
   Clicks inside an ROI on a slice other than its middle one stand in for a correction: when
   propagating, the walks start from the ROI's slice and the clicks then correct what they gave
   there (2.), as if the user had clicked after seeing the ROI's result. Where the walks left
   that slice empty, the clicks choose their own box inside the ROI (3.): the ROI's rectangle
   bounds the structure over all its slices and is too large a box on a slice the structure
   only crosses (a rib, a vein, the end of an organ).
2. Clicks on a slice that already holds a mask (a propagated slice, or a key slice whose clicks
   are added to): a correction of that mask (:meth:`Segmenter.segment` with
   ``SlicePrompts.mask``). A negative correction that leaves nothing marks the slice absent.
3. Clicks alone: the box around them that a box-trained model is surest of; the clicks
   themselves for a point-trained one.

Frames: prompts come as user-level :class:`~SlicerSAM.prompts.Prompts` (RAS millimetres or voxel
``(k, j, i)``) or as :class:`~SlicerSAM.prompts.SlicePrompts` (model-image pixels ``(x, y)`` of
one slice); masks are bool ``(rows, cols)`` slice grids of the current plane
(docs/architecture.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np

from SlicerSAM.editing import (
    DEFAULT_UNDO_STEPS,
    Edit,
    UndoStack,
    apply_edit,
    masks_to_block,
    plan_edit,
)
from SlicerSAM.errors import PromptError
from SlicerSAM.prompts import (
    Box,
    Prompts,
    SlicePrompts,
    box_slice_range,
    points_by_slice,
    prompts_on_slice,
    roi_on_plane,
)

logger = logging.getLogger(__name__)

__all__ = ["InteractiveSession", "KeySlice", "Roi"]

Progress = Callable[[int, int, str], None]

# A click's mask is measured against the nearest slices of the current result: a structure
# does not grow to more than LEAK_GROWTH times its size from one slice to the next, so a bigger
# candidate holds a neighbour as well (the benchmark calls a prediction more than twice the
# reference's volume a leak).
LEAK_GROWTH = 2.0


@dataclass(frozen=True, eq=False)
class Roi:
    """A 3D region of interest on one slicing plane.

    slice_range: (first, last) slice indices it covers, inclusive; bounds_xyxy: (4,) float32 XYXY
    rectangle in model-image pixels. A pixel belongs to it when its centre lies inside the
    rectangle (edges included) on a slice of the range.
    """

    slice_range: Tuple[int, int]
    bounds_xyxy: np.ndarray

    def __post_init__(self):
        first, last = (int(v) for v in self.slice_range)
        if first > last:
            first, last = last, first
        object.__setattr__(self, "slice_range", (first, last))
        bounds = np.asarray(self.bounds_xyxy, dtype=np.float32).reshape(-1)
        if bounds.shape != (4,) or not np.all(np.isfinite(bounds)):
            raise PromptError(f"an ROI rectangle is 4 finite numbers, got {self.bounds_xyxy!r}")
        if bounds[2] < bounds[0] or bounds[3] < bounds[1]:
            raise PromptError(f"the ROI rectangle {bounds.tolist()} is not (x0, y0, x1, y1)")
        object.__setattr__(self, "bounds_xyxy", bounds)

    def holds_slice(self, index: int) -> bool:
        return self.slice_range[0] <= int(index) <= self.slice_range[1]

    @property
    def middle(self) -> int:
        """The ROI's own key slice: the middle of its range."""
        return (self.slice_range[0] + self.slice_range[1]) // 2

    def holds_xy(self, xy: np.ndarray) -> np.ndarray:
        """(N,) bool: which (x, y) points (N, 2) lie inside the rectangle."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        x0, y0, x1, y1 = (float(v) for v in self.bounds_xyxy)
        tol = 1e-3
        return (
            (xy[:, 0] >= x0 - tol)
            & (xy[:, 0] <= x1 + tol)
            & (xy[:, 1] >= y0 - tol)
            & (xy[:, 1] <= y1 + tol)
        )

    def grid_mask(self, plane) -> np.ndarray:
        """(rows, cols) bool: the slice-grid pixels inside the rectangle."""
        h, w = (int(n) for n in plane.image_shape)
        yy, xx = np.mgrid[:h, :w]
        inside = self.holds_xy(np.stack([xx.ravel(), yy.ravel()], axis=1)).reshape(h, w)
        if tuple(plane.image_shape) == tuple(plane.grid_shape):
            return inside
        return np.asarray(plane.to_grid(inside.astype(np.float32), order=1)) >= 0.5


@dataclass(frozen=True, eq=False)
class KeySlice:
    """A slice the user prompted (or gave a mask for).

    prompts: the slice's prompts in model-image pixels (None for a mask given as it is);
    result: the model's answer (None for a given mask); candidate: which of ``result.masks`` is
    chosen; mask: (rows, cols) bool, the chosen mask clipped to the ROI (empty: the structure is
    absent from this slice); stand_in: the mask came from the ROI's rectangle and the slice's
    clicks because the slice had no mask for them to correct yet. Propagation first walks from the
    other key slices and then applies those clicks as a correction of the mask it reached there
    (:meth:`InteractiveSession.propagate`).
    """

    index: int
    prompts: Optional[SlicePrompts]
    result: object
    candidate: int
    mask: np.ndarray
    stand_in: bool = False


def _same_points(a: Optional[SlicePrompts], b: Optional[SlicePrompts], count: int) -> bool:
    """Whether the first ``count`` clicks of ``a`` and ``b`` are the same."""
    pa = np.zeros((0, 2)) if a is None or a.points_xy is None else a.points_xy
    pb = np.zeros((0, 2)) if b is None or b.points_xy is None else b.points_xy
    if len(pa) < count or len(pb) < count:
        return False
    la = a.point_labels if count else np.zeros(0)
    lb = b.point_labels if count else np.zeros(0)
    return bool(
        np.allclose(pa[:count], pb[:count], atol=1e-4)
        and np.array_equal(np.asarray(la)[:count], np.asarray(lb)[:count])
    )


def _same_box(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b, atol=1e-4))


def same_prompts(a: Optional[SlicePrompts], b: Optional[SlicePrompts]) -> bool:
    """Whether two slices' prompts are the same clicks (in order) and the same box."""
    if a is None or b is None:
        return a is None and b is None
    return (
        a.index == b.index
        and a.num_points == b.num_points
        and _same_points(a, b, a.num_points)
        and _same_box(a.box_xyxy, b.box_xyxy)
    )


def extends(new: SlicePrompts, old: Optional[SlicePrompts]) -> bool:
    """Whether ``new`` adds clicks to ``old`` (same box, ``old``'s clicks first): a correction of
    what ``old`` gave. A click moved or removed asks again instead."""
    if old is None or new.index != old.index or not _same_box(new.box_xyxy, old.box_xyxy):
        return False
    return new.num_points > old.num_points and _same_points(new, old, old.num_points)


class InteractiveSession:
    """One structure being segmented in one volume (see the module docstring).

    Args:
        volume: the :class:`~SlicerSAM.volume.Volume` to segment.
        model: a model name (``sam_core.zoo``), a loaded ``Sam``, or a function returning one
            (the CLI's, which may download); a name or function is loaded when the first slice
            is segmented, so that bad prompts fail before any model work.
        orientation: "axial" | "coronal" | "sagittal" slicing.
        intensity: an :class:`~SlicerSAM.intensity.IntensityMapping` (None: window L40/W400).
        device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps".
        cache: an :class:`~SlicerSAM.cache.EmbeddingCache` to share (None: a private one).
        checkpoint: checkpoint file when ``model`` is a name.
        point_prompts: what clicks become for the model ("auto", "box", "model"; see
            :class:`~SlicerSAM.segmenter.Segmenter`).
        strategy, stop: propagation strategy and stop rules (None: the engine's defaults).
        segmenter: a ready segmenter of ``volume`` to use instead (its model, orientation,
            intensity and cache; the benchmark shares one between structures).
        undo_stack: the :class:`~SlicerSAM.editing.UndoStack` of accepts (None: a new one; the
            Slicer Logic keeps one across volumes).
    """

    def __init__(
        self,
        volume=None,
        model="litemedsam",
        *,
        orientation: str = "axial",
        intensity=None,
        device="auto",
        cache=None,
        checkpoint=None,
        point_prompts: str = "auto",
        strategy=None,
        stop=None,
        segmenter=None,
        undo_stack: Optional[UndoStack] = None,
    ):
        if segmenter is None and volume is None:
            raise ValueError("InteractiveSession needs a volume (or a segmenter of one)")
        self.strategy = strategy
        self.stop = stop
        self.undo_stack = undo_stack if undo_stack is not None else UndoStack(DEFAULT_UNDO_STEPS)
        self.labels: Optional[np.ndarray] = None  # the accepted segment (own target), lazily
        self._segmenter = segmenter
        self._sam = None
        self._model = model
        self._checkpoint = checkpoint
        self._device = device
        self._cache = cache
        self._point_prompts = point_prompts
        if segmenter is not None:
            self.volume = segmenter.volume
            self._orientation = segmenter.plane.orientation
            self._intensity = getattr(segmenter, "intensity", None)
            self._cache = getattr(segmenter, "cache", cache)
            self._sam = getattr(segmenter, "sam", None)
        else:
            from SlicerSAM.cache import EmbeddingCache
            from SlicerSAM.intensity import IntensityMapping
            from SlicerSAM.prompts import ORIENTATIONS

            if orientation not in ORIENTATIONS:
                raise PromptError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
            self.volume = volume
            self._orientation = orientation
            self._intensity = intensity if intensity is not None else IntensityMapping()
            self._cache = cache if cache is not None else EmbeddingCache()
        self._roi_box: Optional[Box] = None
        self.roi: Optional[Roi] = None
        self.clear()

    # ------------------------------------------------------------------ model and plane
    @property
    def segmenter(self):
        """The segmenter of the current orientation and intensity (the model loads on first use)."""
        if self._segmenter is None:
            from SlicerSAM.segmenter import Segmenter

            if self._sam is None:
                if isinstance(self._model, str):
                    from sam_core.zoo import load_model

                    self._sam = load_model(self._model, self._checkpoint, device=self._device)
                elif callable(self._model) and not hasattr(self._model, "image_encoder"):
                    self._sam = self._model()
                else:
                    self._sam = self._model
            self._segmenter = Segmenter(
                self.volume,
                self._sam,
                orientation=self._orientation,
                intensity=self._intensity,
                device=self._device if hasattr(self._model, "image_encoder") else "auto",
                cache=self._cache,
                point_prompts=self._point_prompts,
            )
        return self._segmenter

    @property
    def plane(self):
        """The :class:`~SlicerSAM.slicing.SlicePlane` of the current orientation."""
        if self._segmenter is not None:
            return self._segmenter.plane
        from SlicerSAM.slicing import plane_for

        return plane_for(self.volume, self._orientation)

    @property
    def orientation(self) -> str:
        return self._orientation

    @property
    def intensity(self):
        return self._intensity

    def close(self) -> None:
        """Stop the segmenter's background work (the session stays usable)."""
        if self._segmenter is not None and hasattr(self._segmenter, "close"):
            self._segmenter.close()

    def set_orientation(self, orientation: str) -> None:
        """Slice along another orientation. Key slices, marks and the result are per plane and
        are cleared; the ROI is recomputed from its 3D box; embeddings stay cached."""
        from SlicerSAM.prompts import ORIENTATIONS

        if orientation not in ORIENTATIONS:
            raise PromptError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if orientation == self._orientation:
            return
        self.close()
        self._orientation = orientation
        self._segmenter = None
        self.clear()
        self.roi = None if self._roi_box is None else self._roi_of(self._roi_box)

    def set_intensity(self, intensity) -> None:
        """Use another intensity mapping for the slices the model sees. Masks already made
        stay (they are valid whatever the mapping was); later prompts use the new mapping."""
        if intensity == self._intensity:
            return
        self.close()
        self._intensity = intensity
        self._segmenter = None

    # ------------------------------------------------------------------ region of interest
    def _roi_of(self, box: Box) -> Roi:
        slice_range, bounds = roi_on_plane(box, self.volume, self.plane)
        return Roi(slice_range, bounds)

    def set_roi(self, roi: Union[Box, Roi, None]) -> None:
        """Bound every mask and propagation by a region of interest: a 3D :class:`Box` (RAS or
        voxel frame, e.g. a Slicer ROI), a :class:`Roi` of the current plane, or None (no ROI).
        Key slices outside it are dropped, the others clipped; a propagation is dropped."""
        if isinstance(roi, Box):
            self._roi_box, new = roi, self._roi_of(roi)
        elif roi is None or isinstance(roi, Roi):
            self._roi_box, new = None, roi
        else:
            raise PromptError(f"an ROI is a Box or a Roi, got {type(roi).__name__}")
        same = (new is None and self.roi is None) or (
            new is not None
            and self.roi is not None
            and new.slice_range == self.roi.slice_range
            and np.allclose(new.bounds_xyxy, self.roi.bounds_xyxy)
        )
        self.roi = new
        if same:
            return
        self._propagation = None
        if new is not None:
            for index in list(self.keys):
                if not new.holds_slice(index):
                    del self.keys[index]
                else:
                    key = self.keys[index]
                    self.keys[index] = replace(key, mask=self._clip(key.mask))

    def _clip(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (rows, cols) with the pixels outside the ROI's rectangle cleared."""
        mask = np.asarray(mask, dtype=bool)
        if self.roi is None:
            return mask
        return mask & self._roi_grid()

    def _roi_grid(self) -> np.ndarray:
        cached = getattr(self, "_roi_grid_cache", None)
        if cached is None or cached[0] is not self.roi:
            cached = (self.roi, self.roi.grid_mask(self.plane))
            self._roi_grid_cache = cached
        return cached[1]

    # ------------------------------------------------------------------ prompts
    def plan(self, prompts: Prompts) -> Tuple[Optional[Box], Dict[int, SlicePrompts]]:
        """What :meth:`set_prompts` would do with ``prompts``, validated, with no model work:
        (the 3D box that becomes the ROI or None, {slice index: that slice's prompts}).

        Raises:
            PromptError: no prompt; a point outside the volume or the ROI; points off the
                prompts' own slice.
        """
        if not isinstance(prompts, Prompts):
            raise PromptError(f"expected Prompts, got {type(prompts).__name__}")
        if prompts.is_empty:
            raise PromptError("no prompt given: place at least one point, a box or a mask")
        plane = self.plane
        roi_box = box2d = roi = None
        box_index = None
        if prompts.box is not None:
            first, last = box_slice_range(prompts.box, self.volume, plane)
            if first == last:
                box2d, box_index = prompts.box, first
            else:
                roi_box, roi = prompts.box, self._roi_of(prompts.box)
        if prompts.index is not None and prompts.points:
            # a prompt file that names its slice: every point must lie on it
            prompts_on_slice(replace(prompts, box=None, mask=None), self.volume, plane)
        groups = points_by_slice(prompts, self.volume, plane)
        wanted: Dict[int, SlicePrompts] = {}
        for index, points in groups.items():
            group = Prompts(points=points, frame=prompts.frame)
            wanted[index] = prompts_on_slice(group, self.volume, plane, index)
        if box2d is not None:
            box_only = Prompts(box=box2d, frame=prompts.frame)
            sp = prompts_on_slice(box_only, self.volume, plane, box_index)
            base = wanted.get(box_index, SlicePrompts(box_index))
            wanted[box_index] = replace(base, box_xyxy=sp.box_xyxy)
        if roi is not None:
            middle = roi.middle
            if prompts.index is not None and not groups:
                middle = prompts.index  # the ROI's key slice named by the prompt file
            wanted.setdefault(middle, SlicePrompts(middle, box_xyxy=roi.bounds_xyxy))
        for sp in wanted.values():
            self._check_in_roi(sp, roi)
        return roi_box, dict(sorted(wanted.items()))

    def set_prompts(self, prompts: Prompts, multimask: Optional[bool] = None) -> Dict[int, object]:
        """Take the complete set of a user's prompts (a prompt or markups file, the markups nodes
        in Slicer) and segment what changed.

        A 3D box is the ROI (None: no ROI); it prompts its middle slice (or the prompts' own
        ``index``) with its rectangle. Points are grouped by the slice they lie on (with an
        ``index``, all must lie on it); a 2D box joins the points of its slice. Each slice whose
        prompts changed is segmented (:meth:`segment`). A key slice whose prompts are gone from
        the set (a box dragged to another slice) keeps its mask, as a key given as a mask;
        :meth:`remove_key` or :meth:`clear` forget it. A 3D mask makes every slice it holds a
        key (as given). Returns {slice index: SliceResult} of the slices segmented now.

        Raises:
            PromptError: as :meth:`plan`, before any model work.
        """
        roi_box, wanted = self.plan(prompts)
        self.set_roi(roi_box)
        for index, key in list(self.keys.items()):
            if key.prompts is not None and index not in wanted:
                # its prompts moved elsewhere (a box dragged to another slice): the mask stays
                self.keys[index] = replace(key, prompts=None)
        if prompts.mask is not None:
            self._add_mask_prompt(prompts)
        results = {}
        for index, sp in wanted.items():
            key = self.keys.get(index)
            if key is not None and same_prompts(key.prompts, sp):
                continue
            results[index] = self.segment(sp, multimask=multimask)
        return results

    def _add_mask_prompt(self, prompts: Prompts) -> None:
        mask = prompts.mask
        plane = self.plane
        if mask.ndim == 3:
            if tuple(mask.shape) != tuple(self.volume.shape[:3]):
                raise PromptError(
                    f"3D mask shape {mask.shape} differs from the volume's "
                    f"{tuple(self.volume.shape[:3])}"
                )
            for index in range(plane.num_slices):
                grid = np.asarray(plane.grid(mask, index), dtype=bool)
                if grid.any():
                    self.add_mask(index, grid)
        else:
            if prompts.index is None:
                raise PromptError("a 2D mask prompt needs a slice index")
            self.add_mask(prompts.index, mask)

    def _check_in_roi(self, prompts: SlicePrompts, roi: Optional[Roi]) -> None:
        if roi is None:
            return
        if not roi.holds_slice(prompts.index):
            raise PromptError(
                f"{self.plane.orientation} slice {prompts.index} is outside the ROI's slice range "
                f"{roi.slice_range[0]}..{roi.slice_range[1]}"
            )
        if prompts.points_xy is not None:
            outside = np.flatnonzero(~roi.holds_xy(prompts.points_xy))
            if outside.size:
                x, y = prompts.points_xy[outside[0]]
                raise PromptError(
                    f"a click on {self.plane.orientation} slice {prompts.index} at pixel "
                    f"(x {x:.1f}, y {y:.1f}) lies outside the ROI (x {roi.bounds_xyxy[0]:.1f}.."
                    f"{roi.bounds_xyxy[2]:.1f}, y {roi.bounds_xyxy[1]:.1f}.."
                    f"{roi.bounds_xyxy[3]:.1f}): move the click or the ROI"
                )

    def segment(
        self,
        prompts: Union[SlicePrompts, Prompts],
        index: Optional[int] = None,
        multimask: Optional[bool] = None,
    ) -> object:
        """Segment one slice from its complete prompts; the slice becomes (or stays) a key.

        ``prompts``: :class:`SlicePrompts` (model-image pixels; ``box_xyxy`` is a box drawn on
        that slice) or user-level :class:`Prompts` on one slice (a 3D box in them sets the ROI).
        The prompts replace the slice's earlier ones; how they combine with the ROI and with a
        mask already on the slice is in the module docstring. Returns the SliceResult.
        """
        return self._segment(prompts, index, multimask)

    def _segment(self, prompts, index=None, multimask=None, roi_box: bool = True) -> object:
        """:meth:`segment`; ``roi_box=False``: clicks on a slice without a mask choose their own
        box inside the ROI instead of taking its rectangle (a slice the walks left empty)."""
        if isinstance(prompts, Prompts):
            if prompts.box is not None:
                first, last = box_slice_range(prompts.box, self.volume, self.plane)
                if first != last:
                    self.set_roi(prompts.box)
                    prompts = replace(prompts, box=None)
                    if not prompts.points:
                        raise PromptError("segment() takes one slice's prompts; use set_prompts")
            prompts = prompts_on_slice(prompts, self.volume, self.plane, index)
        if not isinstance(prompts, SlicePrompts):
            raise PromptError(f"expected SlicePrompts or Prompts, got {type(prompts).__name__}")
        if index is not None and int(index) != prompts.index:
            raise PromptError(f"the prompts are for slice {prompts.index}, not slice {index}")
        if prompts.num_points == 0 and prompts.box_xyxy is None and prompts.mask is None:
            raise PromptError(f"no prompt for slice {prompts.index}: give points or a box")
        index = self._check_index(prompts.index)
        self._check_in_roi(prompts, self.roi)
        previous = self._previous_mask(prompts)
        asked = prompts
        if prompts.box_xyxy is None and self.roi is not None:
            if previous is None and (roi_box or not prompts.num_points):
                prompts = replace(prompts, box_xyxy=self.roi.bounds_xyxy)
            else:
                prompts = replace(prompts, bounds_xyxy=self.roi.bounds_xyxy)
        if previous is not None and prompts.box_xyxy is None and prompts.num_points:
            if self._honoured(previous, prompts):
                # the mask already says what the clicks say: they change nothing
                self.keys[index] = KeySlice(index, asked, None, 0, self._clip(previous))
                return self._as_result(index, previous)
            prompts = replace(prompts, mask=previous)
        kwargs = {}
        # a click's mask is bounded by the nearest slices' areas, except on a slice the walks left
        # empty: the nearest masks there are where the walks lost the structure
        bounded = (
            prompts.num_points and prompts.box_xyxy is None and (roi_box or previous is not None)
        )
        limit = self._area_limit(index) if bounded else None
        if limit is not None:  # (only then: stand-in segmenters need not know the argument)
            kwargs["max_area"] = limit
        result = self.segmenter.segment(index, prompts, multimask=multimask, **kwargs)
        best = int(result.best)
        stand_in = (
            self.roi is not None
            and previous is None
            and asked.box_xyxy is None
            and asked.num_points > 0
            and index != self.roi.middle
        )
        self.keys[index] = KeySlice(
            index, asked, result, best, self._clip(result.masks[best]), stand_in
        )
        return result

    def _area_limit(self, index: int) -> Optional[float]:
        """The largest plausible area (pixels) of a click's mask on slice ``index``, from the
        nearest other slices of the current result: their largest area times LEAK_GROWTH per
        slice of distance. None when the result holds no other slice."""
        result = self.result()
        others = [i for i in result if i != index]
        if not others:
            return None
        distance = min(abs(i - index) for i in others)
        area = max(int(np.count_nonzero(result[i])) for i in others if abs(i - index) == distance)
        return float(area) * LEAK_GROWTH**distance

    def _check_index(self, index) -> int:
        n = int(self.plane.num_slices)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise PromptError(f"slice index must be an integer, got {index!r}")
        if not 0 <= int(index) < n:
            raise PromptError(
                f"slice index {index} is outside the volume: {self.plane.orientation} slices run "
                f"0..{n - 1}"
            )
        return int(index)

    def _honoured(self, mask: np.ndarray, prompts: SlicePrompts) -> bool:
        """Whether every click of ``prompts`` is on the right side of ``mask`` (the click's own
        pixel: positive inside, negative outside)."""
        from SlicerSAM.box_search import honours_all
        from SlicerSAM.mask_geometry import grid_to_image_mask

        image = grid_to_image_mask(self.plane, mask)
        return honours_all(image, prompts.points_xy, prompts.point_labels, tolerance=0.0)

    def _as_result(self, index: int, mask: np.ndarray):
        """A SliceResult holding ``mask`` as it is (a mask the session kept)."""
        from SlicerSAM.segmenter import SliceResult

        return SliceResult(
            index=index,
            masks=np.asarray(mask, dtype=bool)[None],
            iou=np.ones(1, dtype=np.float32),
            best=0,
            low_res_logits=np.zeros((1, 256, 256), dtype=np.float32),
        )

    def _previous_mask(self, prompts: SlicePrompts) -> Optional[np.ndarray]:
        """The mask that the clicks of ``prompts`` correct: a key slice's when they add clicks to
        its prompts, else the propagated mask of the slice; None when there is none."""
        if prompts.num_points == 0:
            return None
        key = self.keys.get(prompts.index)
        if key is not None:
            if extends(prompts, key.prompts) or key.prompts is None:
                return key.mask if key.mask.any() else None
            return None
        if self._propagation is not None:
            mask = self._propagation.masks.get(prompts.index)
            if mask is not None and mask.any():
                return mask
        return None

    def add_click(self, index: int, xy: Sequence[float], positive: bool = True) -> object:
        """Add one click (x, y model-image pixels) to slice ``index``'s prompts and segment it:
        a correction when the slice holds a mask. Returns the SliceResult."""
        index = int(index)
        key = self.keys.get(index)
        base = key.prompts if key is not None and key.prompts is not None else SlicePrompts(index)
        xy = np.asarray(xy, dtype=np.float32).reshape(1, 2)
        label = np.array([1 if positive else 0], dtype=np.int32)
        if base.points_xy is not None:
            xy = np.concatenate([base.points_xy, xy])
            label = np.concatenate([base.point_labels, label])
        return self.segment(replace(base, points_xy=xy, point_labels=label))

    def add_mask(self, index: int, mask: np.ndarray) -> None:
        """Make slice ``index`` a key with ``mask`` (rows, cols) as it is (an accepted or edited
        slice to propagate from); an empty mask marks the slice absent."""
        index = self._check_index(index)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(self.plane.grid_shape):
            raise PromptError(
                f"slice {index}: mask shape {mask.shape} differs from the "
                f"{self.plane.orientation} slice grid {tuple(self.plane.grid_shape)} (rows, cols)"
            )
        self.keys[index] = KeySlice(index, None, None, 0, self._clip(mask))

    def segment_everything(self, index: int, **options) -> list:
        """Every mask the model finds on slice ``index``, largest first
        (:func:`SlicerSAM.everything.segment_everything`, whose keyword arguments ``options``
        are). Changes nothing: keep a candidate with ``add_mask(index, candidate.mask)``."""
        from SlicerSAM.everything import check_slice, segment_everything

        index = check_slice(self.plane, self.volume, index)  # before the model loads
        return segment_everything(self.segmenter, index, **options)

    def select_candidate(self, index: int, candidate: int) -> np.ndarray:
        """Choose another of slice ``index``'s candidate masks (multimask); returns it."""
        key = self.keys.get(int(index))
        if key is None or key.result is None:
            raise PromptError(f"slice {index} has no candidates: segment it first")
        n = len(key.result.masks)
        candidate = int(candidate) % n
        self.keys[key.index] = replace(
            key, candidate=candidate, mask=self._clip(key.result.masks[candidate])
        )
        return self.keys[key.index].mask

    def remove_key(self, index: int) -> None:
        """Forget slice ``index``'s prompts and mask (and the propagation made from them)."""
        if self.keys.pop(int(index), None) is not None:
            self._propagation = None

    def clear(self) -> None:
        """Forget key slices, marks and the result (the accepted segment and undo stay)."""
        self.keys: Dict[int, KeySlice] = {}
        self._propagation = None
        self._propagation_settings = None
        self._propagation_keys: List[int] = []

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        direction: str = "both",
        progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None,
        *,
        strategy=None,
        stop=None,
    ):
        """Propagate the key slices through the volume (inside the ROI when there is one).

        After a correction (a key added or changed since the last propagation with the same
        settings), only the slices next to it are recomputed. ``progress(done, total, message)``
        and ``cancel() -> bool`` as in :func:`SlicerSAM.propagation.propagate`; a cancelled run
        raises :class:`~SlicerSAM.errors.Cancelled` and changes nothing.

        Returns the :class:`~SlicerSAM.propagation.PropagationResult` (masks clipped to the ROI).
        """
        from SlicerSAM.propagation import PropagationResult
        from SlicerSAM.propagation import propagate as walk

        if not self.keys:
            raise PromptError("nothing to propagate: segment a key slice first")
        stand_ins = sorted(i for i, k in self.keys.items() if k.stand_in)
        if stand_ins and len(stand_ins) < len(self.keys):
            return self._propagate_then_correct(
                stand_ins, direction, progress, cancel, strategy=strategy, stop=stop
            )
        keys = {i: k for i, k in self.keys.items() if k.mask.any()}
        absent = sorted(i for i, k in self.keys.items() if not k.mask.any())
        if not keys:  # the model found nothing on the key slices: nothing to walk from
            self._propagation = PropagationResult(masks={}, stop_reasons={"key": "empty"})
            self._propagation_settings = None
            self._propagation_keys = sorted(self.keys)
            return self._propagation
        strategy = strategy if strategy is not None else self.strategy
        stop = stop if stop is not None else self.stop
        roi = self.roi
        settings = (
            direction,
            strategy,
            stop,
            None if roi is None else (roi.slice_range, tuple(roi.bounds_xyxy.tolist())),
        )
        existing = previous_keys = None
        if self._propagation is not None and self._propagation_settings == settings:
            existing = self._propagation.masks
            previous_keys = self._propagation_keys
        given = {}
        for index, key in keys.items():
            if key.result is None:
                given[index] = key.mask
            else:  # the result (its logits, the box it came from) with the chosen, clipped mask
                masks = np.array(key.result.masks, dtype=bool, copy=True)
                masks[key.candidate] = key.mask
                given[index] = replace(key.result, masks=masks, best=key.candidate)
        result = walk(
            self.segmenter,
            given,
            direction=direction,
            strategy=strategy if strategy is not None else "adaptive",
            stop=stop,
            slice_range=None if roi is None else roi.slice_range,
            bounds_xyxy=None if roi is None else roi.bounds_xyxy,
            progress=progress,
            cancel=cancel,
            existing=existing,
            absent=absent,
            previous_keys=previous_keys,
        )
        if roi is not None:
            clipped = {i: self._clip(m) for i, m in result.masks.items()}
            result = PropagationResult(
                masks={i: m for i, m in clipped.items() if m.any()},
                stop_reasons=result.stop_reasons,
                visited=result.visited,
            )
        self._propagation = result
        self._propagation_settings = settings
        self._propagation_keys = sorted(self.keys)
        return result

    def _propagate_then_correct(self, stand_ins, direction, progress, cancel, **settings):
        """Clicks inside an ROI on slices that had no mask: propagate from the other key slices,
        apply each such slice's clicks as a correction of the mask the walks gave it, then
        propagate again around the corrections. A click inside an ROI thus corrects the ROI's
        result (and changes nothing where that result already agrees with it) instead of
        starting a second, competing walk from the ROI's loose rectangle on that slice.
        Cancelled or failed: the session is as it was."""
        saved = (dict(self.keys), self._propagation, self._propagation_settings)
        saved_keys = list(self._propagation_keys)
        try:
            asked = {i: self.keys.pop(i).prompts for i in stand_ins}
            self._propagation = None  # the walks start from the other key slices afresh
            self.propagate(direction, progress, cancel, **settings)
            for index, prompts in asked.items():
                self._segment(prompts, roi_box=False)
                if self.keys[index].stand_in:  # the walks did not reach it: it stays a key
                    self.keys[index] = replace(self.keys[index], stand_in=False)
            return self.propagate(direction, progress, cancel, **settings)
        except BaseException:
            self.keys, self._propagation, self._propagation_settings = saved
            self._propagation_keys = saved_keys
            raise

    @property
    def propagation(self):
        """The last :class:`~SlicerSAM.propagation.PropagationResult` still in force, or None."""
        return self._propagation

    # ------------------------------------------------------------------ result
    def result(self) -> Dict[int, np.ndarray]:
        """{slice index: (rows, cols) bool} of the current result: the last propagation's masks
        with the key slices' masks over them; slices marked absent and empty ones left out."""
        masks: Dict[int, np.ndarray] = {}
        if self._propagation is not None:
            masks.update(self._propagation.masks)
        for index, key in self.keys.items():
            masks[index] = key.mask
        return {i: masks[i] for i in sorted(masks) if masks[i].any()}

    def result_volume(self, dtype=np.uint8) -> np.ndarray:
        """The result as a (K, J, I) array on the volume grid (1 inside, 0 outside)."""
        return self.plane.stack(self.result(), dtype=dtype)

    # ------------------------------------------------------------------ accept and undo
    def accept(
        self,
        target: Optional[np.ndarray] = None,
        mode: str = "replace",
        key: Hashable = "session",
        masks=None,
    ) -> Optional[Edit]:
        """Write the result into a segment and start afresh (keys and result are cleared; the
        ROI, orientation and intensity stay).

        Args:
            target: the (K, J, I) label array of the segment to write into, in place (e.g. the
                Slicer segment's array); None: the session's own ``labels``.
            mode: "replace" (inside the slab of slices the result spans, the segment becomes the
                result), "add" or "remove" (SlicerSAM.editing.MODES).
            key: names the target in the :class:`~SlicerSAM.editing.Edit` (undo hands it back).
            masks: what to write instead of the result: {slice index: (rows, cols) bool} of
                the current plane, or a (K, J, I) bool array (written over the whole volume).

        Returns:
            The Edit (the changed region, its content before and after), or None when nothing
            changed. It is one undo step.
        """
        masks = self.result() if masks is None else masks
        if masks is None or (not isinstance(masks, np.ndarray) and not masks):
            raise PromptError("nothing to accept: segment a slice or propagate first")
        shape = tuple(self.volume.shape[:3])
        if target is None:
            if self.labels is None:
                self.labels = np.zeros(shape, dtype=np.uint8)
            target = self.labels
        if tuple(target.shape) != shape:
            raise PromptError(f"the segment's grid {tuple(target.shape)} differs from {shape}")
        if isinstance(masks, np.ndarray):
            if tuple(masks.shape) != shape:
                raise PromptError(f"the mask's grid {tuple(masks.shape)} differs from {shape}")
            scope, block = None, masks.astype(bool, copy=False)
        else:
            scope, block = masks_to_block(self.plane, masks, shape)
        edit = plan_edit(target, block, scope=scope, mode=mode, key=key)
        if edit is not None:
            apply_edit(target, edit)
            self.undo_stack.push([edit])
        self.clear()
        return edit

    def undo(self) -> Optional[List[Edit]]:
        """Undo the last accept. Edits of the session's own ``labels`` (key "session") are
        restored here; every edit of the step is returned so that a caller restores its own
        targets (``edit.before`` into ``edit.region``). None when there is nothing to undo."""
        step = self.undo_stack.pop()
        if step is None:
            return None
        for edit in reversed(step):
            if edit.key == "session" and self.labels is not None:
                apply_edit(self.labels, edit, undo=True)
        return step
