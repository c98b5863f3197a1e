"""Geometry of 2D masks on slices: Dice, boxes, the most interior point, margins, disks.

Masks are bool arrays on a slice grid ``(rows, cols)`` or on the square-pixel model image
``(H, W)`` (docs/architecture.md); boxes are XYXY in model-image pixels, on the outer pixel edges
when they enclose a mask (pixel centres at integers). Propagation, the benchmark protocols and
the session share these.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from SlicerSAM.errors import PromptError

__all__ = [
    "MIN_BOX",
    "OUTWARD",
    "box_of_image_mask",
    "box_of_mask",
    "clip_box",
    "dice",
    "disk",
    "grid_to_image_mask",
    "interior_point",
    "interior_points",
    "touching",
    "with_margin",
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def grid_to_image_mask(plane, mask: np.ndarray) -> np.ndarray:
    if tuple(plane.image_shape) == tuple(plane.grid_shape):
        return np.asarray(mask, dtype=bool)
    return np.asarray(plane.to_image(np.asarray(mask, dtype=np.float32), order=1)) >= 0.5


def box_of_image_mask(mask_img: np.ndarray, edge: bool = True) -> Optional[np.ndarray]:
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
    box = box_of_image_mask(grid_to_image_mask(plane, mask), edge)
    if box is None:
        return None
    return clip_box(box + np.array([-margin, -margin, margin, margin]), plane.image_shape)


def clip_box(box: np.ndarray, image_shape, bounds: Optional[np.ndarray] = None) -> np.ndarray:
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


def disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9


# signs that turn (left, top, right, bottom) outward margins into XYXY offsets
OUTWARD = np.array([-1.0, -1.0, 1.0, 1.0])
MIN_BOX = 1.0  # pixels: a negative margin never shrinks a box below this width / height


def with_margin(box: np.ndarray, margin) -> np.ndarray:
    """``box`` grown by outward ``margin`` (scalar or (left, top, right, bottom)); a negative
    margin shrinks it, but never below MIN_BOX around its centre."""
    box = np.asarray(box, dtype=np.float64)
    out = box + np.broadcast_to(np.asarray(margin, dtype=np.float64), (4,)) * OUTWARD
    for lo, hi in ((0, 2), (1, 3)):
        if out[hi] - out[lo] < MIN_BOX:
            centre = 0.5 * (box[lo] + box[hi])
            out[lo], out[hi] = centre - MIN_BOX / 2, centre + MIN_BOX / 2
    return out


def touching(mask: np.ndarray, previous: np.ndarray, radius: float) -> np.ndarray:
    """The connected components of ``mask`` (8-connected) that touch ``previous`` grown by
    ``radius`` pixels; ``mask`` unchanged when none does (the model moved: let the rules judge)."""
    from scipy import ndimage

    near = ndimage.binary_dilation(previous, structure=disk(radius)) if radius > 0 else previous
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    keep = np.unique(labels[near & mask])
    keep = keep[keep > 0]
    if keep.size == 0:
        return mask
    return np.isin(labels, keep)


def interior_points(mask_img: np.ndarray, count: int) -> List[Tuple[float, float]]:
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
