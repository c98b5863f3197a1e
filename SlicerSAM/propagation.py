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
   a range of the previous mask's own values, ``grow_match="range"``, lets a rib's walk slide
   onto the muscle its mask holds). The
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

from SlicerSAM.errors import PromptError
from SlicerSAM.mask_geometry import box_of_mask, interior_point
from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.stop_rules import NO_STOP, STOP_TEXT, StopRules, feature_similarity
from SlicerSAM.walk import REJOIN_DICE, Context, Key, Walk, key_roi

logger = logging.getLogger(__name__)

# the propagation API in one place (stop rules, geometry and the walk live in their own modules)
__all__ = [
    "NO_STOP",
    "PropagationResult",
    "PropagationStrategy",
    "REJOIN_DICE",
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
    ctx = Context(segmenter, strategy, rules, bounds_xyxy, progress, cancel, 1, existing)
    ctx.check_cancel()
    prepared: Dict[int, Key] = {}
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
            prepared[k] = Key(k, mask, ctx.to_image(mask), logits, int(mask.sum()), box)
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


def _walk_alone(ctx: Context, name: str, key: Key, step: int, last: int, masks) -> str:
    """Walk from ``key`` towards ``last`` (inclusive) with no walk coming the other way; its masks
    go into ``masks``. Returns why it stopped."""
    walk = Walk(ctx, name, key, step, last)
    walk.run_to(last)
    walk.finish("end")
    masks.update(walk.masks())
    return walk.reason


def _fill_gap(ctx: Context, a: Key, b: Key, direction: str, reasons) -> Dict[int, np.ndarray]:
    """Masks for the slices strictly between key slices a < b (module docstring)."""
    name = f"{a.index}-{b.index}"
    if b.index - a.index < 2:
        return {}
    up = Walk(ctx, "up", a, +1, b.index - 1) if direction in ("both", "up") else None
    down = Walk(ctx, "down", b, -1, a.index + 1) if direction in ("both", "down") else None
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
