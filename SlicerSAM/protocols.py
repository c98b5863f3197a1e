"""Benchmark prompt protocols: simulated prompts from reference labels (docs/protocols.md).

Each protocol turns one structure's reference mask (a bool (K, J, I) array on the volume grid)
into prompts, runs them through a :class:`~SlicerSAM.segmenter.Segmenter` (and
:func:`~SlicerSAM.propagation.propagate` where the protocol propagates) and returns the predicted
masks per slice. Prompts live in model-image pixels of the plane's slices (architecture.md); boxes
are pixel-edge boxes (:func:`SlicerSAM.propagation.box_of_mask`): they enclose the reference's
pixels exactly.

=====================  ==========================================================================
protocol               prompts
=====================  ==========================================================================
``box-per-slice``      the tight 2D box of the reference on every slice where it is present
``box3d-propagate``    the reference's 3D bounding box: its slice range bounds the propagation and
                       its in-plane rectangle bounds every box; the middle slice of the range is
                       prompted with the reference's 2D box on it (LiteMedSAM's 3D protocol)
``keyslice-box``       one 2D box on the slice of largest reference area, no slice range
``keyslice-point``     one positive click at the most interior point of that slice (maximum of
                       the distance transform), then propagation
``clicks-N``           on every slice with reference: a click at the most interior point, then up
                       to N - 1 correction clicks, each at the most interior point of the largest
                       connected error region (positive where missed, negative where false)
=====================  ==========================================================================

Slices without reference get no prompt in the per-slice protocols (``box-per-slice``,
``clicks-N``): a user does not click where the structure is absent, so those slices stay empty.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from SlicerSAM.prompts import SlicePrompts
from SlicerSAM.propagation import (
    StopRules,
    _clip_box,
    _grid_to_image_mask,
    box_of_mask,
    interior_point,
    propagate,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "Box3D",
    "Protocol",
    "box3d_prompt",
    "error_click",
    "jitter_box",
    "largest_slice",
    "parse_protocol",
    "reference_box",
    "run_protocol",
    "select_structures",
]

PROTOCOLS = ("box-per-slice", "box3d-propagate", "keyslice-box", "keyslice-point", "clicks-N")
_CLICKS = re.compile(r"^clicks-(\d+)$")


@dataclass(frozen=True)
class Protocol:
    """A parsed protocol name: ``kind`` is one of PROTOCOLS, ``clicks`` N for ``clicks-N``."""

    name: str
    kind: str
    clicks: int = 0


def parse_protocol(name: str) -> Protocol:
    """``"clicks-3"`` -> Protocol("clicks-3", "clicks-N", 3); other names as they are."""
    name = str(name).strip()
    match = _CLICKS.match(name)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise ValueError(f"{name}: clicks-N needs N >= 1")
        return Protocol(name, "clicks-N", n)
    if name in PROTOCOLS and name != "clicks-N":
        return Protocol(name, name)
    raise ValueError(
        f"unknown protocol {name!r}; choose one of box-per-slice, box3d-propagate, keyslice-box, "
        "keyslice-point, clicks-N (e.g. clicks-3)"
    )


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
    return _clip_box(np.array([x0, y0, x1, y1]), plane.image_shape)


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

    Args:
        segmenter: the segmenter (one per volume; its embedding cache serves all structures).
        mask3d: the structure's reference, bool (K, J, I) on the volume grid.
        protocol: a name or a :class:`Protocol`.
        jitter: box jitter in model-image pixels (0: exact boxes); needs ``rng``.
        rng: the seeded generator for the jitter.
        strategy, stop: propagation strategy and stop rules (None: the defaults; box3d-propagate
            uses ``StopRules(min_pixels=1, patience=1)`` by default, see docs/protocols.md).
        cancel: cancel() -> bool, passed to propagation and checked between slices.
    """
    from SlicerSAM.errors import Cancelled

    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    plane = segmenter.plane
    mask3d = np.asarray(mask3d, dtype=bool)
    cancel = cancel or (lambda: False)
    strategy = strategy if strategy is not None else "adaptive"

    def check():
        if cancel():
            raise Cancelled("benchmark cancelled")

    if protocol.kind == "box-per-slice":
        out = {}
        for k, ref in _reference_slices(plane, mask3d):
            check()
            box = reference_box(plane, ref, jitter, rng)
            result = segmenter.segment(k, SlicePrompts(k, box_xyxy=box), multimask=False)
            out[k] = np.asarray(result.mask, dtype=bool)
        return out

    if protocol.kind == "box3d-propagate":
        b3 = box3d_prompt(plane, mask3d, jitter, rng)
        # the slice range bounds the walk: by default it runs to the ends of the range and only
        # stops on an empty slice (docs/propagation.md: stop rules inside a known range cost Dice)
        rules = stop if stop is not None else BOX3D_STOP
        prop = propagate(
            segmenter,
            {b3.middle: SlicePrompts(b3.middle, box_xyxy=b3.box_xyxy)},
            strategy=strategy,
            stop=rules,
            slice_range=b3.slice_range,
            bounds_xyxy=b3.roi_xyxy,
            cancel=cancel,
        )
        return prop.masks

    if protocol.kind in ("keyslice-box", "keyslice-point"):
        key = largest_slice(plane, mask3d)
        ref = np.asarray(plane.grid(mask3d, key), dtype=bool)
        if protocol.kind == "keyslice-box":
            prompts = SlicePrompts(key, box_xyxy=reference_box(plane, ref, jitter, rng))
        else:
            x, y = interior_point(_grid_to_image_mask(plane, ref))
            prompts = SlicePrompts(key, points_xy=[[x, y]], point_labels=[1])
        prop = propagate(segmenter, {key: prompts}, strategy=strategy, stop=stop, cancel=cancel)
        return prop.masks

    if protocol.kind == "clicks-N":
        out = {}
        for k, ref in _reference_slices(plane, mask3d):
            check()
            mask = _clicks_on_slice(segmenter, plane, k, ref, protocol.clicks)
            if mask.any():
                out[k] = mask
        return out

    raise ValueError(f"unknown protocol {protocol!r}")


# box3d-propagate: inside the known slice range, only an empty slice (confirmed at once) stops
BOX3D_STOP = StopRules(
    min_overlap=None,
    min_iou=None,
    min_area_fraction=None,
    min_pixels=1,
    max_feature_drop=None,
    patience=1,
)


def _clicks_on_slice(segmenter, plane, index: int, ref: np.ndarray, n_clicks: int) -> np.ndarray:
    """Iterative clicks on one slice (SAM paper): first click at the reference's most interior
    point (multimask, best predicted IoU), then each next click at the largest error region with
    all earlier clicks and the previous low-res logits as prompts (single mask)."""
    ref_img = _grid_to_image_mask(plane, ref)
    points: List[Sequence[float]] = []
    labels: List[int] = []
    mask = np.zeros(plane.grid_shape, dtype=bool)
    logits = None
    for n in range(n_clicks):
        pred_img = _grid_to_image_mask(plane, mask)
        click = error_click(pred_img, ref_img)
        if click is None:
            break
        points.append(click[:2])
        labels.append(click[2])
        prompts = SlicePrompts(
            index,
            points_xy=np.asarray(points, dtype=np.float32),
            point_labels=np.asarray(labels, dtype=np.int32),
            mask_logits=logits,
        )
        result = segmenter.segment(index, prompts, multimask=(n == 0))
        best = int(result.best)
        mask = np.asarray(result.masks[best], dtype=bool)
        logits = np.asarray(result.low_res_logits)[best][None]
    return mask
