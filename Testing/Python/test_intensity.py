"""Tests of SlicerSAM.intensity: presets, parsing, percentile bounds and the uint8 mapping."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import awkward_volume

from SlicerSAM import intensity
from SlicerSAM.intensity import PRESETS, IntensityMapping, parse_intensity
from SlicerSAM.volume import Volume


def test_presets_are_level_width_pairs():
    assert PRESETS == {
        "abdomen": (40, 400),
        "lung": (-600, 1500),
        "bone": (400, 1800),
        "brain": (40, 80),
        "mediastinum": (50, 350),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abdomen", IntensityMapping("window", 40, 400)),
        (" Lung ", IntensityMapping("window", -600, 1500)),
        ("40,400", IntensityMapping("window", 40, 400)),
        ("-600, 1500", IntensityMapping("window", -600, 1500)),
        ("window:50,350", IntensityMapping("window", 50, 350)),
        ("mr", IntensityMapping("percentile")),
        ("percentile", IntensityMapping("percentile", low_percentile=0.5, high_percentile=99.5)),
        ("percentile:1,99", IntensityMapping("percentile", low_percentile=1, high_percentile=99)),
    ],
)
def test_parse_intensity_accepts_every_documented_form(text, expected):
    assert parse_intensity(text) == expected


def test_parse_intensity_passes_a_mapping_through():
    mapping = IntensityMapping("window", 10, 20)
    assert parse_intensity(mapping) is mapping


@pytest.mark.parametrize("text", ["liver", "40", "40,400,3", "a,b", "", "percentile:99"])
def test_unknown_text_lists_the_valid_forms(text):
    with pytest.raises(ValueError, match=r"abdomen.*LEVEL,WIDTH.*mr.*percentile:LOW,HIGH"):
        parse_intensity(text)


@pytest.mark.parametrize("text", ["40,0", "40,-10", "percentile:99,1", "percentile:-1,50"])
def test_invalid_numbers_are_rejected(text):
    with pytest.raises(ValueError, match=r"invalid intensity.*use a preset"):
        parse_intensity(text)


def test_window_maps_linearly_and_clips():
    mapping = parse_intensity("40,400")
    bounds = mapping.bounds(None)  # a window does not look at the volume
    assert bounds == (-160.0, 240.0)
    image = np.array([[-1000, -160, 41], [240, 3000, 140]], dtype=np.int16)
    out = mapping.apply(image, bounds)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 128], [255, 255, 191]])


def test_percentile_bounds_cover_the_whole_volume_and_are_cached(monkeypatch):
    volume = awkward_volume()
    mapping = parse_intensity("percentile:1,99")
    lo, hi = mapping.bounds(volume)
    expected = np.percentile(volume.array, [1, 99])
    assert (lo, hi) == pytest.approx(tuple(expected))
    calls = []
    real = np.percentile
    monkeypatch.setattr(
        intensity.np, "percentile", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert mapping.bounds(Volume(volume.array, volume.ijk_to_ras)) == (lo, hi)  # same digest
    assert calls == []
    parse_intensity("mr").bounds(volume)
    assert calls == [1]
    out = mapping.apply(volume.array[:, 3], (lo, hi))
    assert out.min() == 0 and out.max() == 255


def test_constant_image_maps_without_dividing_by_zero():
    volume = Volume(np.full((2, 3, 4), 7.0), np.eye(4))
    mapping = parse_intensity("mr")
    bounds = mapping.bounds(volume)
    assert bounds == (7.0, 7.0)
    np.testing.assert_array_equal(mapping.apply(volume.array[0], bounds), 0)


def test_signature_is_stable_and_distinguishes_mappings():
    assert parse_intensity("abdomen").signature() == "window:L40:W400"
    assert parse_intensity("40,400").signature() == parse_intensity("abdomen").signature()
    assert parse_intensity("mr").signature() == "percentile:0.5-99.5"
    signatures = {parse_intensity(t).signature() for t in ["abdomen", "lung", "mr", "40.5,400"]}
    assert len(signatures) == 4


def test_mapping_validates_its_fields():
    with pytest.raises(ValueError, match="width must be > 0"):
        IntensityMapping(width=0)
    with pytest.raises(ValueError, match="unknown intensity kind"):
        IntensityMapping(kind="gamma")
    with pytest.raises(ValueError, match="finite"):
        IntensityMapping(level=float("nan"))
