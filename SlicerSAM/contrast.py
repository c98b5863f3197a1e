"""Which voxel values belong to a structure, and the re-fit of a mask to the next slice.

Propagation re-fits the previous slice's mask to the next slice before boxing it (:func:`refit`;
:mod:`SlicerSAM.propagation`, step 3): it keeps the pixels near the previous mask whose value
belongs to the structure. A value range read off the previous mask (its 5th-95th percentiles)
accepts whatever that mask already holds: a rib's mask that also covers the muscle under it
accepts muscle, and the walk slides onto the muscle. :class:`IntensityContrast` asks instead
whether a value is more typical of the key slice's mask than of the pixels just outside it, so
a neighbour that the key mask holds a little of, and its ring a lot of, is not followed.
docs/propagation.md ("The re-fit") has the measurements.

Values are raw voxel values (CT Hounsfield units, MR signal), not the model's windowed pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["IntensityContrast", "refit", "ring_around"]


def ring_around(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` 4-connected steps of ``mask`` (2D bool), ``mask`` excluded."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if width < 1 or not mask.any():
        return np.zeros_like(mask)
    return ndimage.binary_dilation(mask, iterations=int(width)) & ~mask


@dataclass(frozen=True, eq=False)
class IntensityContrast:
    """A value belongs to the structure where its density inside the mask exceeds its density in
    the ring around it (a likelihood ratio above 1, equal priors).

    Attributes:
        edges: (bins + 1,) ascending bin edges over the 1st-99th percentiles of both samples;
            values beyond them fall into the outer bins.
        ratio: (bins,) density inside / density in the ring.
    """

    edges: np.ndarray
    ratio: np.ndarray

    @classmethod
    def learn(
        cls, inside: np.ndarray, ring: np.ndarray, bins: int = 32, prior: float = 1.0
    ) -> Optional[IntensityContrast]:
        """The contrast of the values ``inside`` a mask against the values of its ``ring`` (1-D
        arrays, any order); None when either is empty.

        Each density is a histogram smoothed over neighbouring bins, plus ``prior`` times a
        uniform density (the same for both samples): a value seen in neither sample has ratio 1
        (not the structure's), and a handful of pixels (a rib's cross-section) cannot make a
        value the structure's by being rare in the ring alone.
        """
        inside = np.asarray(inside, dtype=np.float64).ravel()
        ring = np.asarray(ring, dtype=np.float64).ravel()
        if inside.size == 0 or ring.size == 0:
            return None
        both = np.concatenate([inside, ring])
        lo, hi = np.percentile(both, [1.0, 99.0])
        edges = np.linspace(lo - 1.0, hi + 1.0, int(bins) + 1)

        def density(values: np.ndarray) -> np.ndarray:
            counts = np.histogram(np.clip(values, edges[0], edges[-1]), edges)[0]
            smooth = np.convolve(
                np.pad(counts.astype(np.float64), 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid"
            )
            return (smooth + prior * values.size / bins) / (values.size * (1.0 + prior))

        return cls(edges=edges, ratio=density(inside) / density(ring))

    def matches(self, values: np.ndarray) -> np.ndarray:
        """Bool array of ``values``' shape: True where a value belongs to the structure."""
        values = np.asarray(values)
        bins = np.clip(np.digitize(values, self.edges) - 1, 0, self.ratio.size - 1)
        return self.ratio[bins] > 1.0


def refit(
    prev_img: np.ndarray,
    prev_values: np.ndarray,
    values: np.ndarray,
    strategy,
    contrast: Optional[IntensityContrast] = None,
) -> np.ndarray:
    """The previous slice's mask re-fitted to the next slice: the pixels within the growth radius
    of ``prev_img`` whose value belongs to the structure and that connect to its footprint.

    Args:
        prev_img: (H, W) bool, the previous mask on the model image.
        prev_values, values: (H, W) float raw voxel values of the previous and the next slice.
        strategy: a :class:`SlicerSAM.propagation.PropagationStrategy` (``grow_*`` fields).
        contrast: which values belong (:class:`IntensityContrast` of the key slice); None: the
            previous mask's ``grow_percentiles`` widened by ``grow_pad``.

    Returns:
        (H, W) bool: the region whose box prompts the next slice ("fit": the matched region;
        "union": with the previous mask). A fit under half the previous area is not trusted:
        the previous mask is returned instead.
    """
    from scipy import ndimage

    from SlicerSAM.mask_geometry import disk

    s = strategy
    vals = prev_values[prev_img]
    if vals.size < 4:
        return prev_img
    lo, hi = np.percentile(vals, list(s.grow_percentiles))
    pad = s.grow_pad * (hi - lo) + 1e-6
    if contrast is not None:
        match = contrast.matches(values)
    else:
        match = (values >= lo - pad) & (values <= hi + pad)
    radius = float(s.grow_radius)
    if s.grow_fraction is not None:
        diameter = np.sqrt(4.0 * float(prev_img.sum()) / np.pi)
        radius = float(np.clip(s.grow_fraction * diameter, 1.0, radius))
    band = ndimage.binary_dilation(prev_img, structure=disk(radius))
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
        edge = (values >= lo - wide) & (values <= hi + wide) & band
        region |= ndimage.binary_dilation(region) & edge
    # a region much smaller than the previous mask is a poor fit (noise, a partial-volume
    # rim): keep the previous mask rather than collapse the box
    if region.sum() < 0.5 * prev_img.sum():
        return prev_img | region if s.grow_mode == "union" else prev_img
    return prev_img | region if s.grow_mode == "union" else region
