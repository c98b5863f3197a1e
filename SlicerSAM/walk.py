"""One walk of a propagation: from a key slice towards one end, a slice at a time.

:func:`SlicerSAM.propagation.propagate` plans the walks (which key slices, which gaps, which
direction) and runs them; this module holds what a walk does on each slice: box the previous
mask (re-fitted to the next slice's intensities, :func:`SlicerSAM.contrast.refit`), with the
margins calibrated on the key slice and inside the walk's in-plane bounds, ask the segmenter,
check the stop rules (:mod:`SlicerSAM.stop_rules`), and stop where they fail, where the range
ends, or where it rejoins an earlier propagation's result. Masks are slice grids (rows, cols);
boxes are model-image pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from SlicerSAM.contrast import IntensityContrast, refit, ring_around
from SlicerSAM.errors import Cancelled
from SlicerSAM.mask_geometry import (
    OUTWARD,
    box_of_image_mask,
    clip_box,
    dice,
    grid_to_image_mask,
    interior_points,
    touching,
    with_margin,
)
from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.stop_rules import feature_similarity

logger = logging.getLogger(__name__)

__all__ = ["REJOIN_DICE", "Context", "Key", "Walk", "key_roi"]


class Context:
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
        return grid_to_image_mask(self.plane, mask)

    # -- prompts --------------------------------------------------------------------------------
    def margin_px(self, margin: float) -> float:
        return float(margin) / self.model_scale

    def contrast(self, key: Key) -> Optional[IntensityContrast]:
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
        intensities of slice ``index`` when growth is on (:func:`SlicerSAM.contrast.refit`)."""
        if self.strategy.grow_radius <= 0:
            return prev_img
        cur, prev_vals = self.intensity(index), self.intensity(prev_index)
        if cur is None or prev_vals is None:
            return prev_img
        return refit(prev_img, prev_vals, cur, self.strategy, contrast)

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
            box = box_of_image_mask(region, s.edge_box)
            box = clip_box(with_margin(box, margin), self.plane.image_shape, bounds)
        if s.points:
            pts = interior_points(prev_img, s.points)
            if pts:
                points = np.asarray(pts, dtype=np.float32)
                labels = np.ones(len(pts), dtype=np.int32)
        if s.mask_prompt and prev_logits is not None:
            logits = prev_logits
        return SlicePrompts(
            index=index, points_xy=points, point_labels=labels, box_xyxy=box, mask_logits=logits
        )

    def calibrate(self, key: Key) -> np.ndarray:
        """Outward margins (left, top, right, bottom) in model-image pixels for walks from a key."""
        s = self.strategy
        if not isinstance(s.margin, str):
            return np.full(4, self.margin_px(s.margin))
        key_img = key.image
        tight = box_of_image_mask(key_img, s.edge_box)
        if tight is None or not s.box:
            return np.zeros(4)
        lo, hi = s.margin_limits
        if s.calibration == "box" and key.box is not None:
            # how much the model's mask falls short of (or spills over) the box it was given,
            # side by side: the margin that gives the next slice the same relation
            shrink = (tight - np.asarray(key.box, dtype=np.float64)) * -OUTWARD
            logger.debug("slice %d: box-calibrated margins %s", key.index, shrink)
            return np.clip(shrink, lo, hi)
        key_index = key.index
        best, best_score = 0.0, -1.0
        for margin in s.calibration_margins:
            m = self.margin_px(margin)
            box = clip_box(tight + np.array([-m, -m, m, m]), self.plane.image_shape, self.bounds)
            result = self.segment(key_index, SlicePrompts(key_index, box_xyxy=box), False)
            score = dice(self.to_image(result.mask), key_img)
            if score > best_score + 1e-9:  # ties: the smaller margin (listed first)
                best, best_score = self.margin_px(margin), score
        logger.debug("slice %d: calibrated margin %.1f px (Dice %.3f)", key_index, best, best_score)
        return np.full(4, float(np.clip(best, lo, hi)))


# Re-running after a correction, a walk that gives a slice nearly the mask the earlier
# propagation gave it (Dice at least this) has rejoined that propagation: the correction's effect
# has faded, and the earlier masks beyond stand (the corrected slice changes its neighbours, not
# the whole walk; docs/propagation.md, "Corrections").
REJOIN_DICE = 0.9


def _model_input_size(segmenter) -> float:
    sam = getattr(segmenter, "sam", None)
    pre = getattr(sam, "preprocessing", None)
    size = getattr(pre, "img_size", None)
    return float(size) if size else 1024.0


def key_roi(plane, key_image: np.ndarray, strategy) -> Optional[np.ndarray]:
    """The implicit in-plane bounds (x0, y0, x1, y1) of walks from a key slice, in model-image
    pixels: the key mask's box (outer pixel edges) grown on each side by ``strategy.key_roi``
    times its width (x) / height (y), at least ``strategy.key_roi_min_mm`` (converted with the
    plane's pixel spacing, x with the column spacing), plus one pixel. None when ``key_roi`` is
    None or the key mask (model image, bool) is empty."""
    if strategy.key_roi is None:
        return None
    kb = box_of_image_mask(key_image, True)
    if kb is None:
        return None
    grow = float(strategy.key_roi) * np.array([kb[2] - kb[0], kb[3] - kb[1]] * 2)
    if strategy.key_roi_min_mm is not None:
        row_mm, col_mm = plane.pixel_spacing
        grow = np.maximum(grow, float(strategy.key_roi_min_mm) / np.array([col_mm, row_mm] * 2))
    return kb + (grow + 1.0) * OUTWARD


class Walk:
    """One walk from a key slice in one direction; advanced one slice at a time."""

    def __init__(self, ctx: Context, name: str, key: Key, step: int, last: int):
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
            mask = touching(mask, self.prev_mask, float(s.keep_connected))
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
            if earlier is not None and mask.any() and dice(mask, earlier) >= REJOIN_DICE:
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
class Key:
    index: int
    mask: np.ndarray  # grid
    image: np.ndarray  # model image
    logits: Optional[np.ndarray]
    area: int
    box: Optional[np.ndarray] = None  # the box the key slice was prompted with, if any
    margin: np.ndarray = field(default_factory=lambda: np.zeros(4))
    contrast: Optional[IntensityContrast] = None  # learned on first use (Context.contrast)
