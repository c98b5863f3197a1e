"""Clicks for box-trained models: the box around the clicks that the model is surest of.

LiteMedSAM and MedSAM were trained with box prompts only (their authors: bowang-lab/MedSAM issues
#90, #281 and #345). Given a click they return a few pixels at a predicted IoU of 0.1-0.2, so a
radiologist's click, and the ``keyslice-point`` and ``clicks-N`` protocols, got almost nothing
(mean Dice 0.04 and 0.34 axially before this module; docs/propagation.md, "Clicks for
box-trained models"). SAM answers an ambiguous click with masks at several scales ranked by its
predicted IoU; this module does the same with the only prompt these models understand:

1. **Candidates.** The bounding box of the positive clicks, grown on every side by each of
   :data:`HALF_SIZES_MM` (6 to 76 mm: a rib to a kidney-sized cross-section in one box; a liver
   takes a second click), clipped to the image (:func:`candidate_boxes`).
2. **Clicks are constraints.** A candidate's mask honours a click when a positive click lies
   inside it or a negative click outside it (at the mask's edge: :data:`CLICK_TOLERANCE_PX`).
   Positive clicks say what the object is and come first: the masks that honour the most
   positive clicks stay in the running, then those that honour the most negative ones (a
   negative click chooses among masks of the object; it never outvotes the object itself).
   Normally some candidates honour every click.
3. **Rank.** By predicted IoU times SAM's stability score (the area where the logits exceed +1
   over the area where they exceed -1: a mask whose outline the model is unsure of changes with
   the threshold). The best :data:`RERANK` are prompted once more with their own tight box; the
   Dice between the two masks (a box-trained model's answer to the box of its own answer should
   be the same mask) multiplies their score.

Measured on the shared CT (29 structures, 3 slices each, one click at the most interior point;
``Testing/benchmarks/bench_click_boxes.py``, docs/propagation.md): mean Dice of the chosen mask
0.624 / 0.645 / 0.568 on axial / coronal / sagittal slices, against 0.061 / 0.019 / 0.024 for
the model's own answer to the click, 0.545 / 0.578 / 0.517 for the best single box size (27 mm)
and 0.750 / 0.766 / 0.723 for an oracle picking the best candidate by the reference. Cost:
``len(HALF_SIZES_MM) + RERANK`` decodes per new set of positive clicks (the segmenter remembers
recent decodes, so a negative click re-ranks them without decoding again).

Coordinates: boxes XYXY and clicks (x, y) in model-image pixels (docs/architecture.md); masks on
the model image here, the segmenter converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "HALF_SIZES_MM",
    "POINT_PROMPTS",
    "RERANK",
    "BoxCandidate",
    "candidate_boxes",
    "clicks_honoured",
    "cut_boxes",
    "distinct",
    "honours_all",
    "rank_boxes",
    "stability_score",
    "search_box",
    "tight_box",
    "within",
]

# What clicks given without a box become (Segmenter's ``point_prompts``): "box" (this module),
# "model" (the model's own point prompts), "auto" (by the model's ModelSpec.point_prompts)
POINT_PROMPTS = ("auto", "box", "model")

# Half-sizes of the candidate boxes (mm, added on each side of the clicks' bounding box): steps
# of about 1.4x. 4 mm and 108 mm were measured too: the smallest adds nothing the 6 mm box does
# not find, the largest is often ranked first while it holds a neighbour as well (mean Dice over
# three axes 0.612 without both, 0.590 with them).
HALF_SIZES_MM: Tuple[float, ...] = (6.0, 9.0, 13.0, 19.0, 27.0, 38.0, 54.0, 76.0)

# How many of the best-ranked candidates are prompted again with their own tight box (the
# self-consistency factor): 3 scores as re-prompting all 8 does (mean Dice over the three axes
# 0.612 and 0.611), and adds 0.009 to ranking by IoU x stability alone.
RERANK = 3

# A mask that covers one of the positive clicks honours the other clicks when it reaches the
# click's pixel or one of its 8 neighbours (radius 1.5 px): a correction click on the boundary of
# the right mask (the most interior point of a one-pixel error rim) would otherwise rule that mask
# out for a smaller or an unrelated one. A mask that covers no positive click is not the object
# clicked on, and its near misses do not count (else a neighbour touching a click on a thin
# structure would compete with it). Measured in docs/propagation.md ("Clicks for box-trained
# models").
CLICK_TOLERANCE_PX = 1.5

# SAM's stability-score offset (segment-anything's automatic mask generator uses 1.0 on logits)
STABILITY_OFFSET = 1.0


@dataclass(frozen=True, eq=False)
class BoxCandidate:
    """One candidate box and what the model made of it.

    box_xyxy (4,) model-image pixels; mask (H, W) bool on the model image; iou: predicted IoU;
    stability: :func:`stability_score` of its low-res logits; honoured: (positive, negative)
    clicks its mask honours (:func:`clicks_honoured`);
    consistency: Dice with the mask of its own tight box (None when not re-prompted);
    payload: the decoder's output, passed through for the caller.
    """

    box_xyxy: np.ndarray
    mask: np.ndarray
    iou: float
    stability: float
    honoured: Tuple[int, int]
    consistency: Optional[float] = None
    payload: object = None

    @property
    def score(self) -> float:
        """Predicted IoU x stability (x consistency once re-prompted)."""
        s = self.iou * self.stability
        return s * self.consistency if self.consistency is not None else s


def candidate_boxes(
    points_xy: np.ndarray,
    point_labels: np.ndarray,
    image_shape: Sequence[int],
    pixel_mm: float,
    half_sizes_mm: Sequence[float] = HALF_SIZES_MM,
) -> np.ndarray:
    """(B, 4) float32 XYXY boxes: the positive clicks' bounding box (through their pixel
    centres) grown by each half-size (mm / ``pixel_mm`` pixels) on every side, clipped to the
    image (edges at -0.5 and size - 0.5); a box equal to a smaller one after clipping is dropped.

    Args:
        points_xy: (N, 2) clicks (x, y); point_labels: (N,) 1 positive / 0 negative.
        image_shape: (H, W) of the model image; pixel_mm: its pixel size in mm.

    Raises:
        ValueError: no positive click (a negative click alone says nowhere to look).
    """
    xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(point_labels).reshape(-1)
    positive = xy[labels == 1]
    if len(positive) == 0:
        raise ValueError("a box search needs at least one positive click")
    h, w = (int(n) for n in image_shape)
    lo = np.array([-0.5, -0.5, -0.5, -0.5])
    hi = np.array([w - 0.5, h - 0.5, w - 0.5, h - 0.5])
    core = np.concatenate([positive.min(axis=0), positive.max(axis=0)])
    out = []
    for half in sorted(float(m) for m in half_sizes_mm):
        grow = half / float(pixel_mm)
        box = np.clip(core + np.array([-grow, -grow, grow, grow]), lo, hi)
        if not out or not np.allclose(box, out[-1]):
            out.append(box)
    return np.asarray(out, dtype=np.float32)


def clicks_honoured(
    mask: np.ndarray,
    points_xy: np.ndarray,
    point_labels: np.ndarray,
    tolerance: float = CLICK_TOLERANCE_PX,
) -> Tuple[int, int]:
    """How many of the positive and of the negative clicks ``mask`` (H, W bool, model image)
    honours, as (positive, negative).

    A click's pixel is the pixel nearest to its (x, y); clicks of one label on one pixel count
    once (a correction the model cannot make gets clicked again on the same pixel, and should not
    outvote other clicks by repetition). If the mask covers the pixel of at least one positive
    click, a positive click is honoured when a mask pixel lies within ``tolerance`` pixels of its
    pixel, a negative click when a pixel outside the mask does; otherwise (or with ``tolerance``
    0) each click's own pixel decides.
    """
    mask = np.asarray(mask, dtype=bool)
    xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(point_labels).reshape(-1)
    cols = np.clip(np.rint(xy[:, 0]).astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(int), 0, mask.shape[0] - 1)
    rows, cols, labels = np.unique(np.stack([rows, cols, (labels == 1).astype(int)]), axis=1)
    if not np.any(mask[rows, cols] & (labels == 1)):
        tolerance = 0.0
    reach = int(np.floor(tolerance))
    offsets = [
        (dr, dc)
        for dr in range(-reach, reach + 1)
        for dc in range(-reach, reach + 1)
        if dr * dr + dc * dc <= tolerance * tolerance
    ]
    honoured = [0, 0]  # positive, negative
    for row, col, label in zip(rows, cols, labels):
        wanted = bool(label == 1)
        for dr, dc in offsets:
            r, c = row + dr, col + dc
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] == wanted:
                honoured[0 if wanted else 1] += 1
                break
    return honoured[0], honoured[1]


def stability_score(logits: np.ndarray, offset: float = STABILITY_OFFSET) -> float:
    """Area where ``logits`` > offset over the area where they are > -offset (1 for an empty
    mask's logits, which have neither: nothing to be unsure about, and it is ranked out by its
    clicks anyway)."""
    logits = np.asarray(logits)
    outer = int(np.count_nonzero(logits > -offset))
    return 1.0 if outer == 0 else float(np.count_nonzero(logits > offset)) / outer


def tight_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """(4,) float32 XYXY through the outer pixel edges of ``mask`` (H, W bool); None if empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    return np.array(
        [cols[0] - 0.5, rows[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5], dtype=np.float32
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# decode(box XYXY) -> (mask (H, W) bool on the model image, predicted IoU, low-res logits, payload)
Decode = Callable[[np.ndarray], Tuple[np.ndarray, float, np.ndarray, object]]


def rank_boxes(
    decode: Decode,
    boxes: Sequence[np.ndarray],
    points_xy: np.ndarray,
    point_labels: np.ndarray,
    rerank: int = RERANK,
    prefer: Optional[Callable[[np.ndarray], bool]] = None,
) -> list:
    """Decode each box and rank the masks by the clicks they honour, then by score.

    Args:
        decode: prompts the model with one box (see :data:`Decode`).
        boxes: (B, 4) XYXY model-image pixels (duplicates are decoded once).
        points_xy, point_labels: the clicks (N, 2) (x, y) and (N,) 1 positive / 0 negative.
        rerank: how many of the best are prompted again with their own tight box.
        prefer: ``prefer(mask) -> bool``; among masks honouring as many clicks, the preferred
            ones come first (a correction prefers the masks that keep the mask it corrects).

    Returns:
        [:class:`BoxCandidate`], the ones honouring the most positive clicks first, among them
        those honouring the most negative ones, then the preferred ones, each group by score;
        the first ``rerank`` carry their consistency.
    """
    found = []
    seen = []
    for box in boxes:
        box = np.asarray(box, dtype=np.float32).reshape(4)
        if any(np.allclose(box, b) for b in seen):
            continue
        seen.append(box)
        mask, iou, logits, payload = decode(box)
        found.append(
            BoxCandidate(
                box_xyxy=box,
                mask=np.asarray(mask, dtype=bool),
                iou=float(iou),
                stability=stability_score(logits),
                honoured=clicks_honoured(mask, points_xy, point_labels),
                payload=payload,
            )
        )

    preferred = {id(c): bool(prefer(c.mask)) if prefer else False for c in found}

    def order(c: BoxCandidate):
        return (-c.honoured[0], -c.honoured[1], not preferred[id(c)], -c.score)

    found.sort(key=order)
    top = []
    for c in found[: max(0, int(rerank))]:
        box = tight_box(c.mask)
        consistency = 0.0 if box is None else _dice(np.asarray(decode(box)[0], bool), c.mask)
        again = BoxCandidate(
            c.box_xyxy, c.mask, c.iou, c.stability, c.honoured, consistency, c.payload
        )
        preferred[id(again)] = preferred[id(c)]
        top.append(again)
    top.sort(key=order)
    return top + found[len(top) :]


def search_box(
    decode: Decode,
    points_xy: np.ndarray,
    point_labels: np.ndarray,
    image_shape: Sequence[int],
    pixel_mm: float,
    half_sizes_mm: Sequence[float] = HALF_SIZES_MM,
    rerank: int = RERANK,
) -> list:
    """The candidate boxes around the clicks, best first (module docstring).

    Args:
        decode: prompts the model with one box (see :data:`Decode`).
        points_xy, point_labels, image_shape, pixel_mm, half_sizes_mm: as in
            :func:`candidate_boxes`.
        rerank: how many of the best are prompted again with their own tight box.

    Returns:
        :func:`rank_boxes` of :func:`candidate_boxes`.
    """
    boxes = candidate_boxes(points_xy, point_labels, image_shape, pixel_mm, half_sizes_mm)
    return rank_boxes(decode, boxes, points_xy, point_labels, rerank)


def honours_all(
    mask: np.ndarray,
    points_xy: np.ndarray,
    point_labels: np.ndarray,
    tolerance: float = CLICK_TOLERANCE_PX,
) -> bool:
    """Whether ``mask`` (H, W bool) honours every click (:func:`clicks_honoured` with
    ``tolerance``; clicks of one label on one pixel count once)."""
    xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    labels = (np.asarray(point_labels).reshape(-1) == 1).astype(int)
    cols = np.clip(np.rint(xy[:, 0]).astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(int), 0, mask.shape[0] - 1)
    unique = np.unique(np.stack([rows, cols, labels]), axis=1)
    wanted = (int(np.count_nonzero(unique[2] == 1)), int(np.count_nonzero(unique[2] == 0)))
    return clicks_honoured(mask, points_xy, point_labels, tolerance) == wanted


def within(boxes: np.ndarray, bounds: Sequence[float], min_size: float = 1.0) -> np.ndarray:
    """(B', 4) float32: ``boxes`` (B, 4) XYXY clipped to ``bounds`` (x0, y0, x1, y1); boxes left
    narrower or lower than ``min_size`` pixels, and repeats, are dropped."""
    b = np.asarray(bounds, dtype=np.float64).reshape(4)
    lo = np.array([b[0], b[1], b[0], b[1]])
    hi = np.array([b[2], b[3], b[2], b[3]])
    out: list = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        clipped = np.clip(box, lo, hi)
        if clipped[2] - clipped[0] < min_size or clipped[3] - clipped[1] < min_size:
            continue
        if not any(np.allclose(clipped, o) for o in out):
            out.append(clipped)
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def cut_boxes(
    box: np.ndarray,
    points_xy: np.ndarray,
    mask: Optional[np.ndarray] = None,
    min_size: float = 1.0,
) -> np.ndarray:
    """(B, 4) float32: ``box`` XYXY with one side moved so that a negative click falls outside
    it: four boxes per click inside ``box`` (its left, top, right and bottom part). The boxes a
    negative click leaves to choose from.

    With ``mask`` (H, W bool: what the box gave), a click on one of several connected parts of
    it cuts at that part's edge, so the whole part is left out; otherwise the cut runs along the
    outer edge of the click's pixel.
    """
    box = np.asarray(box, dtype=np.float64).reshape(4)
    parts = None
    if mask is not None and np.asarray(mask).any():
        from scipy import ndimage

        parts, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), dtype=bool))
        parts = parts if n > 1 else None
    out: list = []
    for x, y in np.asarray(points_xy, dtype=np.float64).reshape(-1, 2):
        if not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
            continue
        col, row = float(np.rint(x)), float(np.rint(y))
        left = right = col
        top = bottom = row
        if parts is not None:
            r = int(np.clip(row, 0, parts.shape[0] - 1))
            c = int(np.clip(col, 0, parts.shape[1] - 1))
            if parts[r, c]:
                rows, cols = np.nonzero(parts == parts[r, c])
                left, right, top, bottom = cols.min(), cols.max(), rows.min(), rows.max()
        for side, edge in ((2, left - 0.5), (3, top - 0.5), (0, right + 0.5), (1, bottom + 0.5)):
            cut = box.copy()
            cut[side] = edge
            if cut[2] - cut[0] >= min_size and cut[3] - cut[1] >= min_size:
                out.append(cut)
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def distinct(candidates: Sequence[BoxCandidate], n: int, max_dice: float = 0.9) -> list:
    """The first ``n`` of ``candidates`` (best first) whose masks differ from every one kept
    before them (Dice at most ``max_dice``): several box sizes often give the same mask, and a
    user cycling through the alternatives should see different ones."""
    kept: list = []
    for c in candidates:
        if len(kept) >= n:
            break
        if all(_dice(c.mask, k.mask) <= max_dice for k in kept):
            kept.append(c)
    return kept
