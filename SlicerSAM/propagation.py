"""Propagate a segment from key slices through the volume, one slice at a time.

A radiologist segments (or accepts, or corrects) one or a few "key" slices; :func:`propagate`
walks from each key slice to its neighbours, prompting every next slice from the previous slice's
result, until a stop rule fires, the slice range ends or it meets the walk coming from the next
key slice. docs/propagation.md holds the measurements behind every default here.

How a next slice is prompted (:class:`PropagationStrategy`, default ``"adaptive"``; every choice
below was measured, docs/propagation.md):

1. **Box only**, on the outer pixel edges of the region below. LiteMedSAM was trained with box
   prompts: the previous low-res logits as a dense mask prompt, an interior point next to the
   box, or multimask selection all make it worse; they remain available for other models
   (``mask_prompt``, ``points``, ``multimask``).
2. **Calibrated per-side margins.** SAM-family models return a mask a little off the box they are
   given (smaller for organs, larger for thin bright structures); prompting each slice with the
   previous mask's tight box compounds that slice after slice (the published LiteMedSAM 3D
   protocol loses most of its Dice by shrinking). When the key slice was prompted with a box, the
   margin of each side is how far the key result's box falls short of (or spills over) the given
   box, clipped to [-3, 6] pixels: the next slice's box then stands to its mask as the user's box
   stood to the key mask. For a key given as a mask (or a click), the margin is the one among
   0, 1, 2, 3, 4, 6 pixels whose decode best reproduces the key mask (Dice).
3. **Intensity-guided re-fit.** Organs grow and recede from slice to slice. The previous mask is
   re-fitted to the next slice before boxing: the pixels of the next slice that lie within r
   pixels of the previous mask, whose value belongs to the structure and that connect to the
   previous mask's footprint. A value belongs to it when it is more typical of the key slice's
   mask than of a 3-pixel ring around that mask (:class:`SlicerSAM.contrast.IntensityContrast`;
   until the seventh session: inside the previous mask's 5th-95th percentiles widened by 10 %,
   ``grow_match="range"``, which let a rib's walk slide onto the muscle its mask held). The
   radius r scales with the structure (0.15 times the previous mask's equivalent diameter, between
   1 and 3 pixels): a rib may move 1 pixel, a liver 3. A fit that loses more than half of the
   previous area is not trusted (the previous mask is used).
4. **Bounds.** Every box stays inside ``bounds_xyxy`` (the in-plane rectangle of a 3D ROI) when
   given, else inside the key slice's box grown on each side by 25 % of its size, and by at least
   15 mm: an organ does not wander far in-plane from its key slice (a box that does has leaked),
   but a small cross-section (aorta, spinal cord) drifts further than a quarter of its size.

When to stop (:class:`StopRules`, all combinable, each None to disable): predicted IoU below
``min_iou`` (0.65); area below ``min_area_fraction`` (0.1) of the key slice's area or below
``min_pixels`` (4); Dice with the last accepted slice below ``min_overlap`` (0.3: a jump); the
image encoder's view of the mask changing abruptly (``max_feature_drop``, 0.06: the cosine
similarity of the mean embedding vectors under this and the previous slice's mask falls that far
below its median over the walk); optionally area growth beyond ``growth_limit`` times the last
accepted slice or ``max_area_factor`` times the key slice, ``max_slices`` per walk, and the
``slice_range`` of :func:`propagate`. Hysteresis (``patience``, 2): a walk stops only after
``patience`` consecutive slices fail a rule, and those failed slices are dropped; a single failing
slice followed by a good one is kept. A failed slice is never the baseline of the next one's
overlap: a leak that lasts two slices fails twice, though the second leaked slice agrees with the
first. At the end of an organ, SAM's predicted IoU falls as the box closes on other tissue: that
is the signal that stops most walks before they leak. Where the neighbour looks the same (the next
vertebra), the model stays confident and only the feature similarity dips, at the disc
between them (docs/propagation.md).

Several key slices: each gap between two key slices is filled from both ends, each walk covering
its half ("meeting in the middle": a slice takes the mask of the nearer key's walk; the middle
slice of an odd gap belongs to the lower key). When one walk stops early (the structure narrows
to nothing), the walk from the other end continues past the middle to fill what it can. Beyond the
outermost key slices, the walks extend up and down. "up" means increasing slice index.

Slices known not to hold the structure (``absent``: a correction emptied them) are never given
a mask and no walk crosses them: a walk towards one stops on the slice before it.

Re-running after a correction (:class:`SlicerSAM.session.InteractiveSession` does this): pass
the previous result as ``existing`` and the previous run's key slices as ``previous_keys``. A key
whose mask differs from ``existing`` (or is new), and an absent slice that held a mask, is
"changed"; only the gaps next to a changed slice (and the outer extension beyond it, when it is
the outermost) are recomputed; every other slice keeps its ``existing`` mask and is not
visited. Two rules keep a correction local (docs/propagation.md, "Corrections"):

- a new key on a slice the earlier propagation had reached corrects that slice and the gaps next
  to it; the masks beyond it (away from the other keys) stand, unless the earlier walk had not
  got past it;
- a recomputed walk that gives a slice nearly its earlier mask (Dice >= ``REJOIN_DICE``) has
  rejoined the earlier result: it stops, and the earlier masks stand from there on.

Embeddings are computed lazily by the segmenter: only visited slices are encoded. Everything is
deterministic (no randomness; ties broken by the smaller margin).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from SlicerSAM.contrast import IntensityContrast, ring_around
from SlicerSAM.errors import Cancelled, PromptError
from SlicerSAM.prompts import SlicePrompts

logger = logging.getLogger(__name__)

__all__ = [
    "PropagationResult",
    "PropagationStrategy",
    "STOP_TEXT",
    "STRATEGIES",
    "StopRules",
    "box_of_mask",
    "feature_similarity",
    "interior_point",
    "key_roi",
    "propagate",
]

DIRECTIONS = ("both", "up", "down")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StopRules:
    """When a walk stops. Every threshold may be None (rule off); the rules combine (any fails).

    Attributes:
        min_overlap: stop when Dice(this slice's mask, the last accepted slice's mask) < this.
            Adjacent slices of one organ overlap well; a jump to a neighbouring structure does
            not. The baseline is the last *accepted* mask, not the previous slice's: a jump that
            lasts two slices then fails twice (the second slice agrees with the first).
        min_iou: stop when the model's predicted IoU of the chosen mask < this.
        min_area_fraction: stop when the mask's area < this fraction of the key slice's area
            (the organ is vanishing: its tip rarely carries a reliable segment).
        min_pixels: stop when the mask has fewer pixels than this (empty or nearly so).
        max_slices: visit at most this many slices per walk (None: no limit).
        growth_limit: stop when the area grows beyond this factor of the last accepted area
            (a leak into a neighbour typically grows the area fast).
        max_area_factor: stop when the area exceeds this factor of the key slice's area.
        max_feature_drop: stop when the similarity of this slice to the previous one, as the
            image encoder sees them, drops more than this below its typical value in the walk.
            The similarity is the cosine between the mean embedding vectors under the two masks
            (``Segmenter.mask_features``); "typical" is the median over the slices the walk has
            accepted so far (the first step cannot fail). Crossing into a neighbour that looks the
            same slice by slice (the next vertebra across a disc) makes it dip for a slice or two
            while the predicted IoU stays high. Needs a segmenter with ``mask_features``.
        feature_min_cells: the feature rule compares two slices only when both masks cover at
            least this many cells of the image embedding (64 x 64 for LiteMedSAM): the mean over
            a handful of cells is noise (a spinal cord's cross-section covers about 5).
        patience: stop only after this many consecutive failing slices, then drop them (1: stop at
            the first failing slice and drop it).
    """

    min_overlap: Optional[float] = 0.3
    min_iou: Optional[float] = 0.65
    min_area_fraction: Optional[float] = 0.1
    min_pixels: Optional[int] = 4
    max_slices: Optional[int] = None
    growth_limit: Optional[float] = None
    max_area_factor: Optional[float] = None
    max_feature_drop: Optional[float] = 0.06
    feature_min_cells: float = 24.0
    patience: int = 2

    def __post_init__(self):
        if int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_slices is not None and int(self.max_slices) < 0:
            raise ValueError(f"max_slices must be >= 0, got {self.max_slices}")

    def failures(
        self,
        mask: np.ndarray,
        previous: Optional[np.ndarray],
        iou: float,
        key_area: int,
        similarity: Optional[float] = None,
        typical: Optional[float] = None,
    ) -> List[str]:
        """Names of the rules ``mask`` fails ("empty", "area", "iou", "overlap", "growth",
        "features"). ``similarity``: feature similarity to the previous slice, ``typical``: its
        median over the walk so far (either None: the feature rule is not checked)."""
        failed = []
        area = int(mask.sum())
        if self.min_pixels is not None and area < int(self.min_pixels):
            failed.append("empty")
        if self.min_area_fraction is not None and area < self.min_area_fraction * key_area:
            failed.append("area")
        if self.max_area_factor is not None and area > self.max_area_factor * key_area:
            failed.append("growth")
        if self.min_iou is not None and iou < self.min_iou:
            failed.append("iou")
        if previous is not None and previous.any():
            if self.min_overlap is not None and _dice(mask, previous) < self.min_overlap:
                failed.append("overlap")
            if self.growth_limit is not None and area > self.growth_limit * int(previous.sum()):
                if "growth" not in failed:
                    failed.append("growth")
        if (
            self.max_feature_drop is not None
            and similarity is not None
            and typical is not None
            and similarity < typical - self.max_feature_drop
        ):
            failed.append("features")
        return failed


def feature_similarity(a, b, rules: StopRules) -> Optional[float]:
    """Cosine similarity of two ``mask_features`` results (vector, cells), or None when either
    mask covers fewer than ``rules.feature_min_cells`` embedding cells."""
    (va, cells_a), (vb, cells_b) = a, b
    if min(cells_a, cells_b) < float(rules.feature_min_cells):
        return None
    va, vb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb) / norm if norm > 0 else None


NO_STOP = StopRules(
    min_overlap=None,
    min_iou=None,
    min_area_fraction=None,
    min_pixels=None,
    max_feature_drop=None,
    patience=1,
)


@dataclass(frozen=True)
class PropagationStrategy:
    """How each next slice is prompted from the previous slice's result.

    Attributes:
        box: prompt with a box around the previous mask.
        margin: box margin in ``margin_frame`` pixels on every side, or "calibrated" (read off the
            key slice, see the module docstring).
        calibration: "box": per-side margins from how the key result's box differs from the box
            the key slice was prompted with (keys given as ``SlicePrompts`` with a box), else as
            "search"; "search": the margin among ``calibration_margins`` whose decode of the key
            slice best reproduces the key mask.
        calibration_margins: candidate margins of the search.
        margin_limits: calibrated margins are clipped to this range (pixels).
        edge_box: box edges on the outer pixel edges (min - 0.5, max + 0.5); False puts them on
            the pixel centres (as the published LiteMedSAM protocol does).
        margin_frame: "image" (margins in model-image pixels) or "model" (in pixels of the model's
            own input frame, e.g. 256 for LiteMedSAM: the published protocol's 3 px).
        grow_radius: pixels the intensity-guided growth may extend beyond the previous mask (0:
            off). Needs the segmenter's ``volume``.
        grow_mode: "fit" (box of the intensity-matched region only: follows growth and recession)
            or "union" (box of the previous mask and the matched region: only grows).
        mask_prompt: also give the previous low-res logits as a dense mask prompt.
        points: positive interior points from the previous mask (0: none).
        multimask: ask for 3 candidates and keep the best by predicted IoU.
        fallback_to_key: when the previous mask is empty, prompt with the key slice's box instead
            of counting the slice as empty (the published protocol does this).
        key_roi: without ``bounds_xyxy``, keep every box inside the key slice's box grown by this
            fraction of its width / height on each side (None: no implicit bounds). Organs move
            and grow little in-plane from one key slice; a box that walks away has leaked.
        key_roi_min_mm: the key ROI grows each side by at least this many mm (None: no floor).
            A quarter of a small cross-section is a pixel or two, less than a tube (aorta, spinal
            cord, psoas) drifts in-plane over its course.
        grow_match: which values the growth accepts. "contrast": those more typical of the key
            slice's mask than of a ring of ``grow_ring`` pixels around it
            (:class:`SlicerSAM.contrast.IntensityContrast`); "range": those inside the previous
            mask's ``grow_percentiles``, widened by ``grow_pad`` times their spread on each side.
        grow_ring: width (4-connected steps, model-image pixels) of the key mask's ring that
            "contrast" compares the mask with.
        grow_percentiles, grow_pad: the value range of ``grow_match="range"`` (and of the wider
            border of ``grow_edge_pad``).
        grow_fraction: scale the growth radius with the structure: this fraction of the previous
            mask's equivalent diameter, between 1 pixel and ``grow_radius`` (None: always
            ``grow_radius``).
        grow_edge_pad: when set, the matched region is grown by one pixel into pixels within the
            wider range (``grow_edge_pad`` times the spread on each side): noisy pixels on the
            organ's border then do not cut the box short.
        keep_connected: when set, drop the parts (connected components) of a new mask that do not
            touch the previous mask grown by this many pixels: islands the box happened to hold.
    """

    box: bool = True
    margin: Union[float, str] = "calibrated"
    calibration: str = "box"
    calibration_margins: Tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
    margin_limits: Tuple[float, float] = (-3.0, 6.0)
    edge_box: bool = True
    margin_frame: str = "image"
    grow_radius: float = 3.0
    grow_mode: str = "fit"
    mask_prompt: bool = False
    points: int = 0
    multimask: bool = False
    fallback_to_key: bool = False
    key_roi: Optional[float] = 0.25
    key_roi_min_mm: Optional[float] = 15.0
    grow_match: str = "contrast"
    grow_ring: int = 3
    grow_percentiles: Tuple[float, float] = (5.0, 95.0)
    grow_pad: float = 0.1
    grow_fraction: Optional[float] = 0.15
    grow_edge_pad: Optional[float] = None
    keep_connected: Optional[float] = None

    def __post_init__(self):
        if not (self.box or self.points or self.mask_prompt):
            raise ValueError("a strategy needs a box, points or a mask prompt")
        if isinstance(self.margin, str) and self.margin != "calibrated":
            raise ValueError(f"margin must be a number or 'calibrated', got {self.margin!r}")
        if self.grow_mode not in ("fit", "union"):
            raise ValueError(f"grow_mode must be 'fit' or 'union', got {self.grow_mode!r}")
        if self.grow_match not in ("contrast", "range"):
            raise ValueError(f"grow_match must be 'contrast' or 'range', got {self.grow_match!r}")
        if int(self.grow_ring) != self.grow_ring or self.grow_ring < 1:
            raise ValueError(
                f"grow_ring must be a whole number of pixels >= 1, got {self.grow_ring!r}"
            )
        if self.calibration not in ("box", "search"):
            raise ValueError(f"calibration must be 'box' or 'search', got {self.calibration!r}")
        if self.margin_frame not in ("image", "model"):
            raise ValueError(f"margin_frame must be 'image' or 'model', got {self.margin_frame!r}")


STRATEGIES: Dict[str, PropagationStrategy] = {
    # the default (docs/propagation.md): box only, calibrated per-side margins, intensity-guided
    # re-fit scaled with the structure, boxes kept near the key slice's box
    "adaptive": PropagationStrategy(),
    # the published LiteMedSAM 3D inference (CVPR 2024 "MedSAM on laptop" baseline): previous
    # mask's box on pixel centres + 3 px in the 256 px model frame, key box when empty
    "published": PropagationStrategy(
        margin=3.0,
        edge_box=False,
        margin_frame="model",
        grow_radius=0.0,
        fallback_to_key=True,
        key_roi=None,
    ),
    "box": PropagationStrategy(margin=2.0, grow_radius=0.0),
    "calibrated": PropagationStrategy(grow_radius=0.0),
    "box+mask": PropagationStrategy(mask_prompt=True),
    "box+point": PropagationStrategy(points=1),
    "mask": PropagationStrategy(box=False, mask_prompt=True, grow_radius=0.0),
    "point": PropagationStrategy(box=False, points=1, grow_radius=0.0),
}


@dataclass(frozen=True, eq=False)
class PropagationResult:
    """What :func:`propagate` returns.

    Attributes:
        masks: {slice index: (rows, cols) bool mask on the slice grid} for every slice holding the
            segment (the key slices and, with ``existing``, the kept slices included); slices
            without the segment are absent.
        stop_reasons: {walk: reason}. Walks are "up" / "down" (beyond the outermost key slices)
            and "a-b up" / "a-b down" (filling the gap between key slices a < b). Reasons: "end"
            (slice range or volume edge), "met" (reached the part the other walk covers),
            "max_slices", or the failing rule ("overlap", "iou", "area", "empty", "growth").
        visited: slice indices segmented by this call, in the order they were visited.
    """

    masks: Dict[int, np.ndarray]
    stop_reasons: Dict[str, str] = field(default_factory=dict)
    visited: List[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a user: which slices hold the segment and why each walk ended, e.g.
        ``"slices 3-14 (12); up: the tissue under the mask changed ...; down: end of the range"``
        (walks that met another key's walk are not mentioned)."""
        if not self.masks:
            text = "no slice"
        else:
            indices = sorted(self.masks)
            text = f"slices {indices[0]}-{indices[-1]} ({len(indices)})"
        ends = [
            f"{walk}: {STOP_TEXT.get(reason, reason)}"
            for walk, reason in sorted(self.stop_reasons.items())
            if reason != "met"
        ]
        return "; ".join([text] + ends)


# what each stop reason means, for people (PropagationResult.summary)
STOP_TEXT = {
    "end": "end of the range",
    "max_slices": "slice limit reached",
    "empty": "the mask vanished",
    "area": "the structure shrank away",
    "iou": "the model lost confidence",
    "overlap": "the mask jumped away from the slices before it",
    "growth": "the mask grew too fast (a leak)",
    "features": "the tissue under the mask changed (a look-alike neighbour?)",
    "absent": "reached a slice marked as not holding the structure",
    "rejoined": "rejoined the earlier result",
}


# ----------------------------------------------------------------------------------------------
# Mask geometry helpers (public: the benchmark protocols use them too)
# ----------------------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _grid_to_image_mask(plane, mask: np.ndarray) -> np.ndarray:
    if tuple(plane.image_shape) == tuple(plane.grid_shape):
        return np.asarray(mask, dtype=bool)
    return np.asarray(plane.to_image(np.asarray(mask, dtype=np.float32), order=1)) >= 0.5


def _box_of_image_mask(mask_img: np.ndarray, edge: bool = True) -> Optional[np.ndarray]:
    rows = np.flatnonzero(mask_img.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask_img.any(axis=0))
    half = 0.5 if edge else 0.0
    return np.array(
        [cols[0] - half, rows[0] - half, cols[-1] + half, rows[-1] + half], dtype=np.float64
    )


def box_of_mask(plane, mask: np.ndarray, margin: float = 0.0, edge: bool = True):
    """Bounding box XYXY (4,) float32 in model-image pixels of a slice-grid mask; None if empty.

    ``edge`` puts the box on the outer pixel edges (first pixel centre - 0.5, last + 0.5): the box
    that exactly encloses the mask's pixels (pixel centres are at integers, architecture.md).
    ``margin`` (model-image pixels) grows it on every side; the result is clipped to the image.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(plane.grid_shape):
        raise PromptError(f"mask shape {mask.shape} differs from the grid {plane.grid_shape}")
    box = _box_of_image_mask(_grid_to_image_mask(plane, mask), edge)
    if box is None:
        return None
    return _clip_box(box + np.array([-margin, -margin, margin, margin]), plane.image_shape)


def _clip_box(box: np.ndarray, image_shape, bounds: Optional[np.ndarray] = None) -> np.ndarray:
    h, w = image_shape
    lo = np.array([-0.5, -0.5, -0.5, -0.5])
    hi = np.array([w - 0.5, h - 0.5, w - 0.5, h - 0.5])
    if bounds is not None:
        lo = np.maximum(lo, [bounds[0], bounds[1], bounds[0], bounds[1]])
        hi = np.minimum(hi, [bounds[2], bounds[3], bounds[2], bounds[3]])
    box = np.clip(np.asarray(box, dtype=np.float64), lo, hi)
    return box.astype(np.float32)


def interior_point(mask_img: np.ndarray) -> Optional[Tuple[float, float]]:
    """(x, y) of the most interior pixel of a 2D mask: the maximum of the Euclidean distance
    transform (the image border counts as outside). Where several pixels share the maximum (a
    rectangle's midline), the one nearest to their centroid, then the first in row-major order.
    None when the mask is empty."""
    from scipy import ndimage

    mask_img = np.asarray(mask_img, dtype=bool)
    if not mask_img.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(mask_img, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(dist >= dist.max() - 1e-9)
    d2 = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    n = int(np.argmin(d2))
    return float(cols[n]), float(rows[n])  # (row, col) -> SAM's (x, y)


def _disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------
class _Context:
    """What all walks of one propagate() call share: segmenter, strategy, rules, callbacks."""

    def __init__(self, segmenter, strategy, rules, bounds, progress, cancel, total, existing=None):
        self.segmenter = segmenter
        # an earlier propagation's masks: a walk that reproduces one of them has rejoined it
        self.existing: Dict[int, np.ndarray] = dict(existing or {})
        self.plane = segmenter.plane
        self.strategy = strategy
        self.rules = rules
        self.bounds = None if bounds is None else np.asarray(bounds, dtype=np.float64)
        self.progress = progress
        self.cancel = cancel
        self.total = max(int(total), 1)
        self.visited: List[int] = []
        self.volume = getattr(segmenter, "volume", None)
        self._mask_features = getattr(segmenter, "mask_features", None)
        if rules.max_feature_drop is None:
            self._mask_features = None
        self._intensity: Dict[int, np.ndarray] = {}
        self.model_scale = 1.0  # model-frame pixels per model-image pixel
        if strategy.margin_frame == "model":
            size = _model_input_size(segmenter)
            self.model_scale = size / float(max(self.plane.image_shape))

    # -- callbacks ------------------------------------------------------------------------------
    def check_cancel(self) -> None:
        if self.cancel():
            raise Cancelled("propagation cancelled")

    def segment(self, index: int, prompts: SlicePrompts, multimask: Optional[bool] = None):
        self.check_cancel()
        result = self.segmenter.segment(index, prompts, multimask=multimask)
        if not self.visited or self.visited[-1] != index:
            self.visited.append(index)
            self.progress(min(len(self.visited), self.total), self.total, f"slice {index}")
        return result

    def features(self, index: int, mask: np.ndarray) -> Optional[Tuple[np.ndarray, float]]:
        """(mean embedding vector, cells covered) of slice ``index`` under ``mask`` (grid), or
        None when the mask is empty or the segmenter cannot say (``Segmenter.mask_features``)."""
        if self._mask_features is None or not mask.any():
            return None
        return self._mask_features(index, mask)

    # -- images ---------------------------------------------------------------------------------
    def intensity(self, index: int) -> Optional[np.ndarray]:
        """Raw voxel values of slice ``index`` on the model image (float32), or None."""
        if self.volume is None:
            return None
        if index not in self._intensity:
            grid = np.asarray(self.plane.grid(self.volume.array, index), dtype=np.float32)
            self._intensity[index] = np.asarray(self.plane.to_image(grid, order=1))
        return self._intensity[index]

    def to_image(self, mask: np.ndarray) -> np.ndarray:
        return _grid_to_image_mask(self.plane, mask)

    # -- prompts --------------------------------------------------------------------------------
    def margin_px(self, margin: float) -> float:
        return float(margin) / self.model_scale

    def contrast(self, key: _Key) -> Optional[IntensityContrast]:
        """The key slice's :class:`IntensityContrast` (its mask against the ring around it),
        learned once per key; None without intensities or for ``grow_match="range"``."""
        s = self.strategy
        if s.grow_match != "contrast" or s.grow_radius <= 0:
            return None
        if key.contrast is None:
            values = self.intensity(key.index)
            if values is None:
                return None
            ring = ring_around(key.image, s.grow_ring)
            key.contrast = IntensityContrast.learn(values[key.image], values[ring])
        return key.contrast

    def region_for(
        self,
        index: int,
        prev_index: int,
        prev_img: np.ndarray,
        contrast: Optional[IntensityContrast] = None,
    ) -> np.ndarray:
        """The region whose box prompts slice ``index``: the previous mask, re-fitted to the
        intensities of slice ``index`` when growth is on (module docstring, step 3). The values
        it accepts are ``contrast``'s when given, else the previous mask's range."""
        s = self.strategy
        if s.grow_radius <= 0:
            return prev_img
        cur = self.intensity(index)
        prev_vals = self.intensity(prev_index)
        if cur is None or prev_vals is None:
            return prev_img
        from scipy import ndimage

        values = prev_vals[prev_img]
        if values.size < 4:
            return prev_img
        lo, hi = np.percentile(values, list(s.grow_percentiles))
        pad = s.grow_pad * (hi - lo) + 1e-6
        if contrast is not None:
            match = contrast.matches(cur)
        else:
            match = (cur >= lo - pad) & (cur <= hi + pad)
        radius = float(s.grow_radius)
        if s.grow_fraction is not None:
            diameter = np.sqrt(4.0 * float(prev_img.sum()) / np.pi)
            radius = float(np.clip(s.grow_fraction * diameter, 1.0, radius))
        band = ndimage.binary_dilation(prev_img, structure=_disk(radius))
        candidates = match & band
        labels, n = ndimage.label(candidates)
        if n == 0:
            return prev_img
        seeds = np.unique(labels[prev_img & candidates])
        seeds = seeds[seeds > 0]
        if seeds.size == 0:
            return prev_img
        region = np.isin(labels, seeds)
        if s.grow_edge_pad is not None:
            wide = s.grow_edge_pad * (hi - lo) + 1e-6
            edge = (cur >= lo - wide) & (cur <= hi + wide) & band
            region |= ndimage.binary_dilation(region) & edge
        # a region much smaller than the previous mask is a poor fit (noise, a partial-volume
        # rim): keep the previous mask rather than collapse the box
        if region.sum() < 0.5 * prev_img.sum():
            return prev_img | region if s.grow_mode == "union" else prev_img
        return prev_img | region if s.grow_mode == "union" else region

    def prompts_for(
        self,
        index: int,
        prev_index: int,
        prev_img: np.ndarray,
        prev_logits: Optional[np.ndarray],
        margin: np.ndarray,
        bounds: Optional[np.ndarray] = None,
        contrast: Optional[IntensityContrast] = None,
    ) -> SlicePrompts:
        s = self.strategy
        box = points = labels = logits = None
        if s.box:
            region = self.region_for(index, prev_index, prev_img, contrast)
            box = _box_of_image_mask(region, s.edge_box)
            box = _clip_box(_with_margin(box, margin), self.plane.image_shape, bounds)
        if s.points:
            pts = _interior_points(prev_img, s.points)
            if pts:
                points = np.asarray(pts, dtype=np.float32)
                labels = np.ones(len(pts), dtype=np.int32)
        if s.mask_prompt and prev_logits is not None:
            logits = prev_logits
        return SlicePrompts(
            index=index, points_xy=points, point_labels=labels, box_xyxy=box, mask_logits=logits
        )

    def calibrate(self, key: _Key) -> np.ndarray:
        """Outward margins (left, top, right, bottom) in model-image pixels for walks from a key."""
        s = self.strategy
        if not isinstance(s.margin, str):
            return np.full(4, self.margin_px(s.margin))
        key_img = key.image
        tight = _box_of_image_mask(key_img, s.edge_box)
        if tight is None or not s.box:
            return np.zeros(4)
        lo, hi = s.margin_limits
        if s.calibration == "box" and key.box is not None:
            # how much the model's mask falls short of (or spills over) the box it was given,
            # side by side: the margin that gives the next slice the same relation
            shrink = (tight - np.asarray(key.box, dtype=np.float64)) * -_OUTWARD
            logger.debug("slice %d: box-calibrated margins %s", key.index, shrink)
            return np.clip(shrink, lo, hi)
        key_index = key.index
        best, best_score = 0.0, -1.0
        for margin in s.calibration_margins:
            m = self.margin_px(margin)
            box = _clip_box(tight + np.array([-m, -m, m, m]), self.plane.image_shape, self.bounds)
            result = self.segment(key_index, SlicePrompts(key_index, box_xyxy=box), False)
            score = _dice(self.to_image(result.mask), key_img)
            if score > best_score + 1e-9:  # ties: the smaller margin (listed first)
                best, best_score = self.margin_px(margin), score
        logger.debug("slice %d: calibrated margin %.1f px (Dice %.3f)", key_index, best, best_score)
        return np.full(4, float(np.clip(best, lo, hi)))


# Re-running after a correction, a walk that gives a slice nearly the mask the earlier
# propagation gave it (Dice at least this) has rejoined that propagation: the correction's effect
# has faded, and the earlier masks beyond stand (the corrected slice changes its neighbours, not
# the whole walk; docs/propagation.md, "Corrections").
REJOIN_DICE = 0.9

# signs that turn (left, top, right, bottom) outward margins into XYXY offsets
_OUTWARD = np.array([-1.0, -1.0, 1.0, 1.0])
_MIN_BOX = 1.0  # pixels: a negative margin never shrinks a box below this width / height


def _with_margin(box: np.ndarray, margin) -> np.ndarray:
    """``box`` grown by outward ``margin`` (scalar or (left, top, right, bottom)); a negative
    margin shrinks it, but never below _MIN_BOX around its centre."""
    box = np.asarray(box, dtype=np.float64)
    out = box + np.broadcast_to(np.asarray(margin, dtype=np.float64), (4,)) * _OUTWARD
    for lo, hi in ((0, 2), (1, 3)):
        if out[hi] - out[lo] < _MIN_BOX:
            centre = 0.5 * (box[lo] + box[hi])
            out[lo], out[hi] = centre - _MIN_BOX / 2, centre + _MIN_BOX / 2
    return out


def _model_input_size(segmenter) -> float:
    sam = getattr(segmenter, "sam", None)
    pre = getattr(sam, "preprocessing", None)
    size = getattr(pre, "img_size", None)
    return float(size) if size else 1024.0


def _touching(mask: np.ndarray, previous: np.ndarray, radius: float) -> np.ndarray:
    """The connected components of ``mask`` (8-connected) that touch ``previous`` grown by
    ``radius`` pixels; ``mask`` unchanged when none does (the model moved: let the rules judge)."""
    from scipy import ndimage

    near = ndimage.binary_dilation(previous, structure=_disk(radius)) if radius > 0 else previous
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    keep = np.unique(labels[near & mask])
    keep = keep[keep > 0]
    if keep.size == 0:
        return mask
    return np.isin(labels, keep)


def key_roi(plane, key_image: np.ndarray, strategy: PropagationStrategy) -> Optional[np.ndarray]:
    """The implicit in-plane bounds (x0, y0, x1, y1) of walks from a key slice, in model-image
    pixels: the key mask's box (outer pixel edges) grown on each side by ``strategy.key_roi``
    times its width (x) / height (y), at least ``strategy.key_roi_min_mm`` (converted with the
    plane's pixel spacing, x with the column spacing), plus one pixel. None when ``key_roi`` is
    None or the key mask (model image, bool) is empty."""
    if strategy.key_roi is None:
        return None
    kb = _box_of_image_mask(key_image, True)
    if kb is None:
        return None
    grow = float(strategy.key_roi) * np.array([kb[2] - kb[0], kb[3] - kb[1]] * 2)
    if strategy.key_roi_min_mm is not None:
        row_mm, col_mm = plane.pixel_spacing
        grow = np.maximum(grow, float(strategy.key_roi_min_mm) / np.array([col_mm, row_mm] * 2))
    return kb + (grow + 1.0) * _OUTWARD


def _interior_points(mask_img: np.ndarray, count: int) -> List[Tuple[float, float]]:
    """Up to ``count`` interior points: distance-transform maxima, each next one away from the
    earlier ones (the mask minus a disk around each chosen point)."""
    from scipy import ndimage

    points: List[Tuple[float, float]] = []
    remaining = np.asarray(mask_img, dtype=bool).copy()
    for _ in range(count):
        if not remaining.any():
            break
        dist = ndimage.distance_transform_edt(np.pad(remaining, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        points.append((float(c), float(r)))
        radius = max(2.0, float(dist[r, c]))
        yy, xx = np.ogrid[: remaining.shape[0], : remaining.shape[1]]
        remaining &= (yy - r) ** 2 + (xx - c) ** 2 > radius * radius
    return points


class _Walk:
    """One walk from a key slice in one direction; advanced one slice at a time."""

    def __init__(self, ctx: _Context, name: str, key: _Key, step: int, last: int):
        self.ctx = ctx
        self.name = name
        self.key = key
        self.step = step
        self.last = last  # last slice this walk may visit (inclusive)
        self.pos = key.index  # last slice processed
        self.prev_index = key.index
        self.prev_mask = key.mask
        self.prev_img = ctx.to_image(key.mask)
        self.prev_logits = key.logits
        # the last mask this walk accepted: the baseline of the overlap and growth rules, so that
        # a leak lasting two slices fails twice (the second leaked slice agrees with the first)
        self.last_good = key.mask
        self.prev_features = None  # (vector, cells) of the last non-empty mask (lazily for the key)
        self.similarities: List[float] = []  # feature similarity of each accepted step
        self.accepted: Dict[int, np.ndarray] = {}
        self.pending: List[Tuple[int, np.ndarray]] = []
        self.count = 0
        self.reason: Optional[str] = None
        self.rejoined_at: Optional[int] = None
        self.bounds = (
            ctx.bounds if ctx.bounds is not None else key_roi(ctx.plane, key.image, ctx.strategy)
        )
        if self._beyond(self.pos + self.step):
            self.reason = "end"

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _beyond(self, index: int) -> bool:
        return (index - self.last) * self.step > 0

    def covered_until(self) -> int:
        """The farthest slice this walk holds a mask for (pending ones count), or the key."""
        indices = list(self.accepted) + [i for i, _ in self.pending]
        if not indices:
            return self.key.index
        return max(indices) if self.step > 0 else min(indices)

    def advance(self) -> None:
        ctx, rules, s = self.ctx, self.ctx.rules, self.ctx.strategy
        index = self.pos + self.step
        prev_img, prev_logits, prev_index = self.prev_img, self.prev_logits, self.prev_index
        if not prev_img.any():
            if not s.fallback_to_key:
                self._stop("empty")
                return
            prev_img, prev_logits, prev_index = self.key.image, self.key.logits, self.key.index
        prompts = ctx.prompts_for(
            index,
            prev_index,
            prev_img,
            prev_logits,
            self.key.margin,
            self.bounds,
            ctx.contrast(self.key),
        )
        result = ctx.segment(index, prompts, s.multimask)
        best = int(result.best)
        mask = np.asarray(result.masks[best], dtype=bool)
        iou = float(np.asarray(result.iou).reshape(-1)[best])
        if s.keep_connected is not None and mask.any() and self.prev_mask.any():
            mask = _touching(mask, self.prev_mask, float(s.keep_connected))
        self.pos = index
        self.count += 1
        similarity, features = self._similarity(index, mask)
        typical = float(np.median(self.similarities)) if self.similarities else None
        failed = rules.failures(mask, self.last_good, iou, self.key.area, similarity, typical)
        if features is not None:
            self.prev_features = features
        if failed:
            self.pending.append((index, mask))
            if len(self.pending) >= rules.patience:
                self.pending = []  # the failed slices are dropped
                self._stop(failed[0])
                return
        else:
            self._flush()
            if mask.any():
                self.accepted[index] = mask
                self.last_good = mask
            if similarity is not None:
                self.similarities.append(similarity)
            earlier = ctx.existing.get(index)
            if earlier is not None and mask.any() and _dice(mask, earlier) >= REJOIN_DICE:
                # re-running after a correction: from here on the walk would redo what the
                # earlier propagation did, so the earlier masks stand
                self.rejoined_at = index
                self._stop("rejoined")
                return
        if mask.any() or not s.fallback_to_key:
            self.prev_mask = mask
            self.prev_img = ctx.to_image(mask)
            self.prev_index = index
            logits = np.asarray(result.low_res_logits)
            self.prev_logits = logits[best][None] if logits.ndim == 3 else logits
        else:  # published protocol: an empty slice is prompted again from the key box
            self.prev_mask = mask
            self.prev_img = mask
        if rules.max_slices is not None and self.count >= int(rules.max_slices):
            self._stop("max_slices")
        elif self._beyond(self.pos + self.step):
            self._stop("end")

    def _similarity(self, index: int, mask: np.ndarray):
        """(cosine similarity of ``mask``'s features to the previous non-empty mask's, ``mask``'s
        (features, cells)). The similarity is None where either is unknown (feature rule off,
        empty mask, segmenter without features) or covers fewer than ``feature_min_cells``."""
        features = self.ctx.features(index, mask)
        if features is None:
            return None, None
        if self.prev_features is None and self.prev_mask.any():
            self.prev_features = self.ctx.features(self.prev_index, self.prev_mask)
        if self.prev_features is None:
            return None, features
        return feature_similarity(features, self.prev_features, self.ctx.rules), features

    def _flush(self) -> None:
        for index, mask in self.pending:
            if mask.any():
                self.accepted[index] = mask
        self.pending = []

    def _stop(self, reason: str) -> None:
        if reason in ("end", "max_slices", "met", "rejoined"):
            self._flush()  # fewer than `patience` failures: not a confirmed stop
        self.reason = reason

    def finish(self, reason: str = "met") -> None:
        if not self.done:
            self._stop(reason)

    def run_to(self, index: int) -> None:
        """Advance until slice ``index`` is processed or the walk stops."""
        while not self.done and (index - self.pos) * self.step > 0:
            self.advance()

    def masks(self, until: Optional[int] = None) -> Dict[int, np.ndarray]:
        """{slice: mask} of this walk; after it rejoined an earlier propagation, that
        propagation's masks from there to ``until`` (inclusive; default: ``last``)."""
        out = dict(self.accepted)
        for index, mask in self.pending:  # not confirmed as a stop: kept
            if mask.any():
                out[index] = mask
        if self.rejoined_at is not None:
            until = self.last if until is None else until
            for index in range(self.rejoined_at + self.step, until + self.step, self.step):
                if index in self.ctx.existing:
                    out[index] = self.ctx.existing[index]
        return out


@dataclass
class _Key:
    index: int
    mask: np.ndarray  # grid
    image: np.ndarray  # model image
    logits: Optional[np.ndarray]
    area: int
    box: Optional[np.ndarray] = None  # the box the key slice was prompted with, if any
    margin: np.ndarray = field(default_factory=lambda: np.zeros(4))
    contrast: Optional[IntensityContrast] = None  # learned on first use (_Context.contrast)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _noop_progress(done: int, total: int, message: str = "") -> None:
    pass


def _never() -> bool:
    return False


def _resolve_strategy(strategy) -> PropagationStrategy:
    if strategy is None:
        return STRATEGIES["adaptive"]
    if isinstance(strategy, PropagationStrategy):
        return strategy
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]
        except KeyError:
            raise ValueError(
                f"unknown propagation strategy {strategy!r}; choose one of {sorted(STRATEGIES)}"
            ) from None
    raise TypeError(f"strategy must be a name or a PropagationStrategy, got {strategy!r}")


def propagate(
    segmenter,
    keys: Mapping[int, object],
    direction: str = "both",
    strategy: Union[str, PropagationStrategy, None] = "adaptive",
    stop: Optional[StopRules] = None,
    slice_range: Optional[Tuple[int, int]] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    existing: Optional[Mapping[int, np.ndarray]] = None,
    bounds_xyxy: Optional[Sequence[float]] = None,
    absent: Optional[Sequence[int]] = None,
    previous_keys: Optional[Sequence[int]] = None,
) -> PropagationResult:
    """Propagate a segment from key slices through the volume (see the module docstring).

    Args:
        segmenter: a :class:`SlicerSAM.segmenter.Segmenter` (anything with ``plane`` and
            ``segment(index, SlicePrompts, multimask) -> SliceResult``; ``volume`` enables the
            intensity-guided growth).
        keys: {slice index: key}, a key being a (rows, cols) bool mask on the slice grid (an
            accepted or corrected segment), a ``SliceResult`` of that slice, or ``SlicePrompts``
            (segmented here first). Key masks are returned unchanged.
        direction: "both", "up" (increasing slice index only) or "down". With several keys,
            "up"/"down" also fill the gaps from one end only.
        strategy: a name of :data:`STRATEGIES` or a :class:`PropagationStrategy`.
        stop: the stop rules (None: ``StopRules()``, the documented defaults).
        slice_range: (first, last) slice indices, inclusive, that walks may visit (a 3D ROI).
        progress: ``progress(done, total, message)``; ``total`` is the most slices this call can
            visit (walks usually stop sooner).
        cancel: ``cancel() -> bool``; True raises :class:`SlicerSAM.errors.Cancelled`.
        existing: the masks of an earlier propagation ({slice: mask}); with it, only the parts next
            to changed keys are recomputed (module docstring).
        bounds_xyxy: in-plane limits (x0, y0, x1, y1) in model-image pixels (a 3D ROI's
            rectangle): every box prompt is clipped to them.
        absent: slices known not to hold the structure (a correction removed it there): they
            stay empty and no walk crosses them; with ``existing``, the parts next to an absent
            slice that held a mask are recomputed.
        previous_keys: the key slices of the propagation that gave ``existing``. A key that is
            new and sits on a slice ``existing`` holds a mask for is a correction: the gaps next
            to it are recomputed, but the masks beyond it (away from the other keys) are kept
            when ``existing`` holds any there (a correction is local; measured in
            docs/propagation.md, "Corrections").

    Returns:
        A :class:`PropagationResult`.

    Raises:
        PromptError: no key, a key outside the volume or the slice range, or a key mask of the
            wrong shape or empty.
        Cancelled: ``cancel()`` returned True (nothing is returned).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    strategy = _resolve_strategy(strategy)
    rules = stop if stop is not None else StopRules()
    progress = progress or _noop_progress
    cancel = cancel or _never
    plane = segmenter.plane
    n = int(plane.num_slices)
    if not keys:
        raise PromptError("propagation needs at least one key slice")
    lo, hi = (0, n - 1) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    if lo > hi:
        lo, hi = hi, lo
    lo, hi = max(lo, 0), min(hi, n - 1)
    indices = sorted(int(k) for k in keys)
    for k in indices:
        if not 0 <= k < n:
            raise PromptError(f"key slice {k} is outside the volume (slices 0..{n - 1})")
        if not lo <= k <= hi:
            raise PromptError(f"key slice {k} is outside the slice range {lo}..{hi}")

    # keys given as prompts are segmented first; a key whose result is empty starts no walk
    ctx = _Context(segmenter, strategy, rules, bounds_xyxy, progress, cancel, 1, existing)
    ctx.check_cancel()
    prepared: Dict[int, _Key] = {}
    from_prompts = set()
    for k in indices:
        value = keys[k]
        logits = box = None
        if _is_prompts(value):
            box = value.box_xyxy
            if value.index != k:
                raise PromptError(f"key {k} holds prompts for slice {value.index}")
            from_prompts.add(k)
            value = ctx.segment(k, value)
            mask = _check_mask(plane, k, np.asarray(value.masks[int(value.best)], dtype=bool))
        else:
            mask = _key_mask(plane, k, value)
        if _is_result(value):
            lr = np.asarray(value.low_res_logits)
            logits = lr[int(value.best)][None] if lr.ndim == 3 else lr
            boxes = getattr(value, "boxes_xyxy", None)
            if boxes is not None and not getattr(value, "searched", False):
                box = np.asarray(boxes)[int(value.best)]  # the box given for the key slice
        if mask.any():
            prepared[k] = _Key(k, mask, ctx.to_image(mask), logits, int(mask.sum()), box)
    indices = sorted(prepared)
    if not indices:
        progress(1, 1, "done")
        return PropagationResult(masks={}, stop_reasons={"key": "empty"}, visited=ctx.visited)

    # segments between consecutive anchors: key slices and slices known to be empty
    # (None = beyond the outermost anchor)
    absent_set = {int(i) for i in (absent or ()) if lo <= int(i) <= hi} - set(indices)
    anchors = sorted(set(indices) | absent_set)
    segments: List[Tuple[Optional[int], Optional[int]]] = []
    if direction in ("both", "down"):
        segments.append((None, anchors[0]))
    segments += list(zip(anchors[:-1], anchors[1:]))
    if direction in ("both", "up"):
        segments.append((anchors[-1], None))
    changed = set(anchors)
    if existing is not None:
        changed = {
            k
            for k in indices
            if k in from_prompts
            or k not in existing
            or not np.array_equal(np.asarray(existing[k], dtype=bool), prepared[k].mask)
        } | {i for i in absent_set if i in existing and np.asarray(existing[i]).any()}
    todo = [seg for seg in segments if (seg[0] in changed) or (seg[1] in changed)]
    if existing is not None and previous_keys is not None:
        # a new key on a slice the earlier propagation had reached corrects that slice and the
        # gaps next to it; the walk beyond it stands, unless it had not reached past the key
        held = {int(i) for i, m in existing.items() if np.asarray(m).any()}
        corrections = {k for k in indices if k not in set(previous_keys) and k in held}
        todo = [
            (a, b)
            for a, b in todo
            if not (b is None and a in corrections and any(i > a for i in held))
            and not (a is None and b in corrections and any(i < b for i in held))
        ]
    total = len(ctx.visited)
    for a, b in todo:
        total += (b - lo) if a is None else (hi - a) if b is None else (b - a - 1)
    ctx.total = max(total, 1)

    # calibrate only the keys that start walks
    starters = {x for seg in todo for x in seg if x in prepared}
    for k in sorted(starters):
        prepared[k].margin = ctx.calibrate(prepared[k])

    masks: Dict[int, np.ndarray] = {}
    if existing is not None:
        masks = {int(i): np.asarray(m, dtype=bool) for i, m in existing.items()}
    reasons: Dict[str, str] = {}
    for a, b in todo:
        # clear what this segment recomputes
        first = lo if a is None else a + 1
        last = hi if b is None else b - 1
        for i in range(first, last + 1):
            masks.pop(i, None)
        if a is None:
            if b in prepared:
                reasons["down"] = _walk_alone(ctx, "down", prepared[b], -1, lo, masks)
        elif b is None:
            if a in prepared:
                reasons["up"] = _walk_alone(ctx, "up", prepared[a], +1, hi, masks)
        elif a in prepared and b in prepared:
            masks.update(_fill_gap(ctx, prepared[a], prepared[b], direction, reasons))
        elif a in prepared and direction in ("both", "up") and b - a > 1:
            reason = _walk_alone(ctx, "up", prepared[a], +1, b - 1, masks)
            reasons[f"{a}-{b} up"] = "absent" if reason == "end" else reason
        elif b in prepared and direction in ("both", "down") and b - a > 1:
            reason = _walk_alone(ctx, "down", prepared[b], -1, a + 1, masks)
            reasons[f"{a}-{b} down"] = "absent" if reason == "end" else reason
    for i in absent_set:
        masks.pop(i, None)
    for k in indices:
        masks[k] = prepared[k].mask
    progress(ctx.total, ctx.total, "done")
    masks = {i: masks[i] for i in sorted(masks) if masks[i].any()}
    return PropagationResult(masks=masks, stop_reasons=reasons, visited=list(ctx.visited))


def _walk_alone(ctx: _Context, name: str, key: _Key, step: int, last: int, masks) -> str:
    """Walk from ``key`` towards ``last`` (inclusive) with no walk coming the other way; its masks
    go into ``masks``. Returns why it stopped."""
    walk = _Walk(ctx, name, key, step, last)
    walk.run_to(last)
    walk.finish("end")
    masks.update(walk.masks())
    return walk.reason


def _fill_gap(ctx: _Context, a: _Key, b: _Key, direction: str, reasons) -> Dict[int, np.ndarray]:
    """Masks for the slices strictly between key slices a < b (module docstring)."""
    name = f"{a.index}-{b.index}"
    if b.index - a.index < 2:
        return {}
    up = _Walk(ctx, "up", a, +1, b.index - 1) if direction in ("both", "up") else None
    down = _Walk(ctx, "down", b, -1, a.index + 1) if direction in ("both", "down") else None
    if up is None or down is None:
        walk = up or down
        walk.run_to(walk.last)
        walk.finish("end")
        reasons[f"{name} {walk.name}"] = walk.reason
        return walk.masks()
    middle = (a.index + b.index) // 2  # the lower key's walk owns the middle slice
    up.run_to(middle)
    down.run_to(middle + 1)
    # a walk that stopped short leaves its part to the other one
    if up.done and up.reason not in ("end", "rejoined"):
        down.run_to(up.covered_until() + 1)
    if down.done and down.reason not in ("end", "rejoined"):
        up.run_to(down.covered_until() - 1)
    up.finish("met")
    down.finish("met")
    reasons[f"{name} up"] = up.reason
    reasons[f"{name} down"] = down.reason
    from_up, from_down = up.masks(until=middle), down.masks(until=middle + 1)
    out: Dict[int, np.ndarray] = {}
    for i in range(a.index + 1, b.index):
        near, far = (from_up, from_down) if i <= middle else (from_down, from_up)
        if i in near:
            out[i] = near[i]
        elif i in far:
            out[i] = far[i]
    return out


def _is_prompts(value) -> bool:
    return isinstance(value, SlicePrompts)


def _is_result(value) -> bool:
    return hasattr(value, "masks") and hasattr(value, "best") and hasattr(value, "iou")


def _check_mask(plane, index: int, mask: np.ndarray) -> np.ndarray:
    if mask.shape != tuple(plane.grid_shape):
        raise PromptError(
            f"key slice {index}: mask shape {mask.shape} differs from the slice grid "
            f"{tuple(plane.grid_shape)} (rows, cols)"
        )
    return mask


def _key_mask(plane, index: int, value) -> np.ndarray:
    if _is_result(value):
        mask = np.asarray(value.masks[int(value.best)], dtype=bool)
    else:
        mask = np.asarray(value, dtype=bool)
    mask = _check_mask(plane, index, mask)
    if not mask.any():
        raise PromptError(f"key slice {index} has an empty mask: nothing to propagate")
    return mask
