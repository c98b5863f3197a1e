"""IntensityContrast (which values belong to a structure) and the propagation re-fit that uses it.

The situation it was built for (docs/propagation.md, "The re-fit"): a rib's key mask also
holds some of the muscle under it; the rib moves a pixel per slice along the muscle. A value
range read off the mask accepts muscle, so the re-fitted region (and the next box) slides onto
the muscle; the contrast with the ring around the key mask accepts only the rib's values.
"""

from __future__ import annotations

import numpy as np
import pytest

from SlicerSAM.contrast import IntensityContrast, ring_around
from SlicerSAM.propagation import PropagationStrategy, StopRules
from SlicerSAM.slicing import plane_for
from SlicerSAM.volume import Volume
from SlicerSAM.walk import Context, Key

FAT, MUSCLE, BONE = -100.0, 50.0, 300.0


def test_ring_around_counts_the_pixels_within_width_steps():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert ring_around(mask, 1).sum() == 4  # the 4-neighbours
    assert ring_around(mask, 2).sum() == 12  # a diamond of radius 2 is 13 pixels
    assert not ring_around(mask, 2)[4, 4]
    assert not ring_around(mask, 0).any() and not ring_around(np.zeros_like(mask), 3).any()


def test_contrast_accepts_what_is_typical_inside_and_rare_in_the_ring():
    rng = np.random.default_rng(0)
    # inside: 10 bone pixels and 6 of the muscle under them; ring: muscle and fat, no bone
    inside = np.concatenate([rng.normal(BONE, 30, 10), rng.normal(MUSCLE, 8, 6)])
    ring = np.concatenate([rng.normal(MUSCLE, 8, 40), rng.normal(FAT, 10, 30)])
    contrast = IntensityContrast.learn(inside, ring)
    values = np.array([BONE, BONE - 40, BONE + 40, MUSCLE, FAT])
    assert contrast.matches(values).tolist() == [True, True, True, False, False]
    assert contrast.matches(values.reshape(5, 1)).shape == (5, 1)
    # a value seen in neither sample is not the structure's (the prior is the same for both)
    assert not contrast.matches(np.array([-1000.0]))[0]
    assert not contrast.matches(np.array([150.0]))[0]  # between muscle and bone: seen in neither


def test_contrast_of_an_organ_against_a_look_alike_neighbour_keeps_the_organ():
    # an organ (60 HU) whose ring is mostly fat with a little of a same-valued neighbour: the
    # organ's values stay accepted (typical inside, a minority of the ring)
    rng = np.random.default_rng(1)
    inside = rng.normal(60, 10, 400)
    ring = np.concatenate([rng.normal(FAT, 15, 150), rng.normal(60, 10, 50)])
    contrast = IntensityContrast.learn(inside, ring)
    assert contrast.matches(rng.normal(60, 10, 200)).mean() > 0.9
    assert not contrast.matches(np.array([FAT]))[0]


def test_contrast_needs_both_samples():
    assert IntensityContrast.learn(np.array([]), np.array([1.0])) is None
    assert IntensityContrast.learn(np.array([1.0]), np.array([])) is None


def _rib_on_muscle():
    """Two axial slices (40 x 40 px, 3 mm): fat, a muscle band (rows 20-31) and a 2 x 5 px rib
    lying on it (rows 18-19, cols 10-14 on slice 0); on slice 1 the rib has moved one column
    right. Returns (volume, rib mask of slice 1, key mask of slice 0: the rib
    and the 5 muscle pixels under it)."""
    rng = np.random.default_rng(0)
    array = np.full((2, 40, 40), FAT, dtype=np.float32)
    array[:, 20:32, :] = MUSCLE
    array[0, 18:20, 10:15] = BONE
    array[1, 18:20, 11:16] = BONE
    array += rng.normal(0, 5, array.shape).astype(np.float32)
    volume = Volume(array.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    rib1 = np.zeros((40, 40), dtype=bool)
    rib1[18:20, 11:16] = True
    key = np.zeros((40, 40), dtype=bool)
    key[18:21, 10:15] = True
    return volume, rib1, key


class _VolumeOnly:
    def __init__(self, volume):
        self.volume = volume
        self.plane = plane_for(volume, "axial")


@pytest.mark.parametrize("match", ["contrast", "range"])
def test_refit_follows_the_rib_not_the_muscle_its_key_mask_held(match):
    volume, rib1, key_mask = _rib_on_muscle()
    segmenter = _VolumeOnly(volume)
    plane = segmenter.plane
    # the plane's grid and the array may be oriented differently: map through the plane
    key_grid = np.asarray(plane.grid(np.asarray(key_mask[None].repeat(2, 0)), 0), dtype=bool)
    rib_grid = np.asarray(plane.grid(np.asarray(rib1[None].repeat(2, 0)), 1), dtype=bool)
    strategy = PropagationStrategy(grow_match=match)
    ctx = Context(segmenter, strategy, StopRules(), None, lambda *a: None, lambda: False, 1)
    key = Key(0, key_grid, ctx.to_image(key_grid), None, int(key_grid.sum()))
    contrast = ctx.contrast(key)
    assert (contrast is not None) == (match == "contrast")
    region = ctx.region_for(1, 0, key.image, contrast)
    rib_img = ctx.to_image(rib_grid)
    muscle = np.asarray(plane.to_image(np.asarray(plane.grid(volume.array, 1))), float) < 150
    if match == "contrast":
        assert np.array_equal(region, rib_img)  # exactly the moved rib
    else:
        assert (region & muscle).sum() >= 5  # the range accepts the muscle under it


def test_unknown_grow_match_or_a_bad_ring_is_refused():
    with pytest.raises(ValueError, match="grow_match"):
        PropagationStrategy(grow_match="histogram")
    for ring in (0, -2, 1.5):
        with pytest.raises(ValueError, match="grow_ring"):
            PropagationStrategy(grow_ring=ring)
    assert PropagationStrategy(grow_ring=2.0).grow_ring == 2.0  # a whole number given as float
