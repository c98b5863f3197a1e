"""Benchmark prompt protocols: simulated prompts from reference labels (docs/protocols.md).

Each protocol turns one structure's reference mask (a bool (K, J, I) array on the volume grid)
into prompts, runs them through a :class:`~SlicerSAM.segmenter.Segmenter` (and
:func:`~SlicerSAM.propagation.propagate` where the protocol propagates) and returns the predicted
masks per slice. Prompts live in model-image pixels of the plane's slices (architecture.md); boxes
are pixel-edge boxes (:func:`SlicerSAM.propagation.box_of_mask`): they enclose the reference's
pixels exactly.

=======================  ========================================================================
protocol                 prompts (every protocol runs through an InteractiveSession)
=======================  ========================================================================
``box-per-slice``        the tight 2D box of the reference on every slice where it is present
``roi-propagate``        the reference's 3D bounding box: its slice range and in-plane rectangle
                         are the session's ROI; the middle slice of the range is prompted with
                         the reference's 2D box on it (LiteMedSAM's 3D protocol; also known as
                         ``box3d-propagate``)
``click-roi-propagate``  ``roi-propagate``, then one positive click at the most interior point of
                         the reference on its largest slice (a correction of the ROI's result
                         there: nothing changes where that mask holds the click), then
                         propagation again
``box-propagate``        one 2D box on the slice of largest reference area, no slice range
                         (also known as ``keyslice-box``)
``click-propagate``      one positive click at the most interior point of that slice, then
                         propagation (also known as ``keyslice-point``)
``click-correct``        ``click-propagate``, then one correction click on the slice with the
                         largest error (positive where missed, negative where false), then
                         propagation again; Dice is reported before and after
``clicks-N``             on every slice with reference: a click at the most interior point, then
                         up to N - 1 correction clicks, each at the most interior point of the
                         largest connected error region (positive where missed, negative where
                         false)
=======================  ========================================================================

Slices without reference get no prompt in the per-slice protocols (``box-per-slice``,
``clicks-N``): a user does not click where the structure is absent, so those slices stay empty.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from SlicerSAM.mask_geometry import box_of_mask, clip_box, grid_to_image_mask, interior_point
from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.stop_rules import StopRules

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "PROTOCOLS",
    "PROTOCOLS_TEXT",
    "Workflow",
    "Box3D",
    "Protocol",
    "box3d_prompt",
    "error_click",
    "jitter_box",
    "largest_slice",
    "parse_protocol",
    "reference_box",
    "run_protocol",
    "run_workflow",
    "select_structures",
    "worst_slice_click",
]

PROTOCOLS = (
    "box-per-slice",
    "roi-propagate",
    "click-roi-propagate",
    "box-propagate",
    "click-propagate",
    "click-correct",
    "clicks-N",
)
# the names these protocols were published under first: the same prompts, the same runs
ALIASES = {
    "box3d-propagate": "roi-propagate",
    "keyslice-box": "box-propagate",
    "keyslice-point": "click-propagate",
}
_CLICKS = re.compile(r"^clicks-(\d+)$")
PROTOCOLS_TEXT = (
    "box-per-slice, roi-propagate (box3d-propagate), click-roi-propagate, box-propagate "
    "(keyslice-box), click-propagate (keyslice-point), click-correct, clicks-N (e.g. clicks-3)"
)


@dataclass(frozen=True)
class Protocol:
    """A parsed protocol name: ``kind`` is one of PROTOCOLS (an alias gives the protocol it
    names), ``clicks`` N for ``clicks-N``; ``name`` is the name as given."""

    name: str
    kind: str
    clicks: int = 0


def parse_protocol(name: str) -> Protocol:
    """``"clicks-3"`` -> Protocol("clicks-3", "clicks-N", 3); ``"keyslice-box"`` ->
    Protocol("keyslice-box", "box-propagate"); other names as they are."""
    name = str(name).strip()
    match = _CLICKS.match(name)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise ValueError(f"{name}: clicks-N needs N >= 1")
        return Protocol(name, "clicks-N", n)
    if name in ALIASES:
        return Protocol(name, ALIASES[name])
    if name in PROTOCOLS and name != "clicks-N":
        return Protocol(name, name)
    raise ValueError(f"unknown protocol {name!r}; choose one of {PROTOCOLS_TEXT}")


def select_structures(
    reference: np.ndarray, label_names: Optional[Mapping[int, str]], min_voxels: int = 200
) -> List[Tuple[int, str, int]]:
    """[(label, name, voxels)] of the structures with at least ``min_voxels`` voxels, by label.

    Without ``label_names``, every non-zero value present is used and named ``label_<value>``;
    with it, only its labels are considered.
    """
    values, counts = np.unique(np.asarray(reference), return_counts=True)
    present = {int(v): int(c) for v, c in zip(values, counts) if int(v) != 0}
    out = []
    for value in sorted(present):
        if label_names is not None and value not in label_names:
            continue
        name = str(label_names[value]) if label_names is not None else f"label_{value}"
        if present[value] >= int(min_voxels):
            out.append((value, name, present[value]))
    return out


# ----------------------------------------------------------------------------------------------
# Prompt generators
# ----------------------------------------------------------------------------------------------
def jitter_box(box: np.ndarray, jitter: float, rng: Optional[np.random.Generator], plane):
    """The box with every coordinate moved by uniform [-jitter, +jitter] pixels (seeded ``rng``),
    kept ordered (at least one pixel wide) and inside the image."""
    if not jitter or rng is None:
        return box
    moved = np.asarray(box, dtype=np.float64) + rng.uniform(-jitter, jitter, size=4)
    x0, x1 = sorted((moved[0], moved[2]))
    y0, y1 = sorted((moved[1], moved[3]))
    x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)
    return clip_box(np.array([x0, y0, x1, y1]), plane.image_shape)


def reference_box(plane, mask2d: np.ndarray, jitter: float = 0.0, rng=None):
    """Tight pixel-edge box XYXY of a slice-grid reference mask (optionally jittered); None if
    the slice holds no reference."""
    box = box_of_mask(plane, mask2d)
    if box is None:
        return None
    return jitter_box(box, jitter, rng, plane).astype(np.float32)


def _slice_areas(plane, mask3d: np.ndarray) -> np.ndarray:
    return np.array([int(np.count_nonzero(plane.grid(mask3d, k))) for k in range(plane.num_slices)])


def largest_slice(plane, mask3d: np.ndarray) -> int:
    """Index of the slice with the largest reference area (ties: the lowest index)."""
    areas = _slice_areas(plane, mask3d)
    if areas.max() == 0:
        raise ValueError("the reference mask is empty")
    return int(np.argmax(areas))


@dataclass(frozen=True)
class Box3D:
    """A reference's 3D bounding box as the box3d protocol uses it.

    slice_range: (first, last) slices holding the reference, inclusive; middle: the slice
    prompted (the middle of the range, or the nearest slice holding reference); box_xyxy: the
    reference's 2D box on ``middle``; roi_xyxy: the in-plane rectangle of the 3D box.
    """

    slice_range: Tuple[int, int]
    middle: int
    box_xyxy: np.ndarray
    roi_xyxy: np.ndarray


def box3d_prompt(plane, mask3d: np.ndarray, jitter: float = 0.0, rng=None) -> Box3D:
    """The box3d-propagate prompt of a reference mask (see :class:`Box3D`)."""
    areas = _slice_areas(plane, mask3d)
    present = np.flatnonzero(areas)
    if present.size == 0:
        raise ValueError("the reference mask is empty")
    first, last = int(present[0]), int(present[-1])
    middle = (first + last) // 2
    if areas[middle] == 0:  # a structure in pieces along the axis: nearest slice with reference
        middle = int(present[np.argmin(np.abs(present - middle))])
    union = np.zeros(plane.grid_shape, dtype=bool)
    for k in present:
        union |= np.asarray(plane.grid(mask3d, int(k)), dtype=bool)
    roi = box_of_mask(plane, union)
    box = reference_box(plane, plane.grid(mask3d, middle), jitter, rng)
    return Box3D((first, last), middle, box, roi)


def error_click(pred_img: np.ndarray, ref_img: np.ndarray) -> Optional[Tuple[float, float, int]]:
    """The correction click for a prediction: ``(x, y, label)`` or None when there is no error.

    The error regions are the connected components (8-connected) of the missed pixels (reference
    and not prediction; a click there is positive, label 1) and of the false pixels (prediction
    and not reference; negative, label 0). The click goes to the largest component (ties:
    missed first), at its most interior pixel (distance-transform maximum), SAM-paper style.
    """
    from scipy import ndimage

    pred_img = np.asarray(pred_img, dtype=bool)
    ref_img = np.asarray(ref_img, dtype=bool)
    best = None  # (size, -order, component mask, label)
    for order, (error, label) in enumerate(((ref_img & ~pred_img, 1), (pred_img & ~ref_img, 0))):
        components, n = ndimage.label(error, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        biggest = int(np.argmax(sizes)) + 1
        candidate = (int(sizes[biggest - 1]), -order)
        if best is None or candidate > best[0]:
            best = (candidate, components == biggest, label)
    if best is None:
        return None
    x, y = interior_point(best[1])
    return x, y, best[2]


# ----------------------------------------------------------------------------------------------
# Protocol runners
# ----------------------------------------------------------------------------------------------
def _reference_slices(plane, mask3d: np.ndarray):
    """(slice index, bool grid) of every slice where the reference is present, in order."""
    for k in range(plane.num_slices):
        ref = np.asarray(plane.grid(mask3d, k), dtype=bool)
        if ref.any():
            yield k, ref


@dataclass(frozen=True, eq=False)
class Workflow:
    """What a protocol produced for one structure: ``masks`` {slice index: grid mask}; for
    ``click-correct`` also ``before`` (the masks before the correction) and ``correction``
    (slice index, x, y, label) of the click given."""

    masks: Dict[int, np.ndarray]
    before: Optional[Dict[int, np.ndarray]] = None
    correction: Optional[Tuple[int, float, float, int]] = None


def run_protocol(
    segmenter,
    mask3d: np.ndarray,
    protocol,
    *,
    jitter: float = 0.0,
    rng: Optional[np.random.Generator] = None,
    strategy=None,
    stop: Optional[StopRules] = None,
    cancel=None,
) -> Dict[int, np.ndarray]:
    """Run one protocol for one structure; returns {slice index: predicted grid mask}.

    :func:`run_workflow`'s masks (same arguments).
    """
    return run_workflow(
        segmenter,
        mask3d,
        protocol,
        jitter=jitter,
        rng=rng,
        strategy=strategy,
        stop=stop,
        cancel=cancel,
    ).masks


def run_workflow(
    segmenter,
    mask3d: np.ndarray,
    protocol,
    *,
    jitter: float = 0.0,
    rng: Optional[np.random.Generator] = None,
    strategy=None,
    stop: Optional[StopRules] = None,
    cancel=None,
) -> Workflow:
    """Run one protocol for one structure through an :class:`~SlicerSAM.session.InteractiveSession`.

    Args:
        segmenter: the segmenter (one per volume; its embedding cache serves all structures).
        mask3d: the structure's reference, bool (K, J, I) on the volume grid.
        protocol: a name or a :class:`Protocol`.
        jitter: box jitter in model-image pixels (0: exact boxes); needs ``rng``.
        rng: the seeded generator for the jitter.
        strategy, stop: propagation strategy and stop rules (None: the defaults; roi-propagate and
            click-roi-propagate use ``BOX3D_STOP`` by default, see docs/protocols.md).
        cancel: cancel() -> bool, passed to propagation and checked between slices.
    """
    from SlicerSAM.errors import Cancelled
    from SlicerSAM.session import InteractiveSession, Roi

    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    plane = segmenter.plane
    mask3d = np.asarray(mask3d, dtype=bool)
    cancel = cancel or (lambda: False)
    session = InteractiveSession(
        segmenter=segmenter,
        strategy=strategy if strategy is not None else "adaptive",
        stop=stop,
    )
    kind = protocol.kind

    def check():
        if cancel():
            raise Cancelled("benchmark cancelled")

    def propagate(**kwargs):
        session.propagate(cancel=cancel, **kwargs)

    if kind == "box-per-slice":
        for k, ref in _reference_slices(plane, mask3d):
            check()
            box = reference_box(plane, ref, jitter, rng)
            session.segment(SlicePrompts(k, box_xyxy=box), multimask=False)
        return Workflow(session.result())

    if kind in ("roi-propagate", "click-roi-propagate"):
        b3 = box3d_prompt(plane, mask3d, jitter, rng)
        session.set_roi(Roi(b3.slice_range, b3.roi_xyxy))
        session.segment(SlicePrompts(b3.middle, box_xyxy=b3.box_xyxy))
        # the slice range bounds the walk: by default it runs to the ends of the range and only
        # stops on an empty slice (docs/propagation.md: stop rules inside a known range cost Dice)
        rules = stop if stop is not None else BOX3D_STOP
        propagate(stop=rules)
        if kind == "click-roi-propagate":
            # the click on the slice where the structure is largest, after the ROI's result is
            # shown: a correction of that slice (nothing changes where the mask holds it)
            key = largest_slice(plane, mask3d)
            x, y = interior_point(grid_to_image_mask(plane, plane.grid(mask3d, key)))
            session.add_click(key, (x, y), positive=True)
            propagate(stop=rules)
        return Workflow(session.result())

    if kind in ("box-propagate", "click-propagate", "click-correct"):
        key = largest_slice(plane, mask3d)
        ref = np.asarray(plane.grid(mask3d, key), dtype=bool)
        if kind == "box-propagate":
            session.segment(SlicePrompts(key, box_xyxy=reference_box(plane, ref, jitter, rng)))
        else:
            x, y = interior_point(grid_to_image_mask(plane, ref))
            session.segment(SlicePrompts(key, points_xy=[[x, y]], point_labels=[1]))
        propagate()
        if kind != "click-correct":
            return Workflow(session.result())
        before = session.result()
        click = worst_slice_click(plane, before, mask3d)
        if click is None:
            return Workflow(before, before)
        index, x, y, label = click
        check()
        session.add_click(index, (x, y), positive=bool(label))
        if session.keys:
            propagate()
        return Workflow(session.result(), before, click)

    if kind == "clicks-N":
        for k, ref in _reference_slices(plane, mask3d):
            check()
            _clicks_on_slice(session, plane, k, ref, protocol.clicks)
        return Workflow(session.result())

    raise ValueError(f"unknown protocol {protocol!r}")


def worst_slice_click(
    plane, masks: Mapping[int, np.ndarray], mask3d: np.ndarray
) -> Optional[Tuple[int, float, float, int]]:
    """The correction click of ``click-correct``: (slice index, x, y, label) on the slice whose
    prediction differs from the reference in the most pixels (ties: the lowest index), at
    :func:`error_click`'s place; None when the prediction is exact."""
    worst, index = 0, None
    empty = np.zeros(plane.grid_shape, dtype=bool)
    for k in range(plane.num_slices):
        ref = np.asarray(plane.grid(mask3d, k), dtype=bool)
        pred = np.asarray(masks.get(k, empty), dtype=bool)
        errors = int(np.count_nonzero(ref ^ pred))
        if errors > worst:
            worst, index = errors, k
    if index is None:
        return None
    ref = np.asarray(plane.grid(mask3d, index), dtype=bool)
    pred = np.asarray(masks.get(index, empty), dtype=bool)
    click = error_click(grid_to_image_mask(plane, pred), grid_to_image_mask(plane, ref))
    return None if click is None else (index, click[0], click[1], click[2])


# box3d-propagate: inside the known slice range, only an empty slice (confirmed at once) stops
BOX3D_STOP = StopRules(
    min_overlap=None,
    min_iou=None,
    min_area_fraction=None,
    min_pixels=1,
    max_feature_drop=None,
    patience=1,
)


def _clicks_on_slice(session, plane, index: int, ref: np.ndarray, n_clicks: int) -> None:
    """Iterative clicks on one slice (SAM paper): the first click at the reference's most
    interior point, each next one at the largest error region of the session's current mask of
    the slice; each click is added to the slice's prompts (:meth:`InteractiveSession.add_click`:
    a correction of the mask the earlier clicks gave)."""
    ref_img = grid_to_image_mask(plane, ref)
    for _ in range(n_clicks):
        key = session.keys.get(index)
        mask = key.mask if key is not None else np.zeros(plane.grid_shape, dtype=bool)
        click = error_click(grid_to_image_mask(plane, mask), ref_img)
        if click is None:
            break
        session.add_click(index, click[:2], positive=bool(click[2]))
