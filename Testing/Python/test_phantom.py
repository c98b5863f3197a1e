"""The synthetic CT phantom: determinism, geometry, intensities and anatomy in RAS."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SlicerSAM.phantom import LABELS, NOMINAL_HU, make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0)


def _centroid_ras(phantom, name):
    value = {n: v for v, n in phantom.names.items()}[name]
    kji = np.argwhere(phantom.labels.array == value).mean(axis=0)
    return phantom.image.kji_to_ras(kji)


def test_same_seed_gives_identical_arrays_other_seed_differs(phantom):
    again = make_phantom(seed=0)
    assert np.array_equal(again.image.array, phantom.image.array)
    assert np.array_equal(again.labels.array, phantom.labels.array)
    assert again.image.digest() == phantom.image.digest()
    other = make_phantom(seed=1)
    assert not np.array_equal(other.image.array, phantom.image.array)
    assert set(np.unique(other.labels.array)) == set(np.unique(phantom.labels.array))


def test_types_names_and_description(phantom):
    assert phantom.image.array.dtype == np.int16
    assert phantom.labels.array.dtype == np.uint8
    assert phantom.image.shape == phantom.labels.shape == (40, 192, 192)
    assert np.array_equal(phantom.labels.ijk_to_ras, phantom.image.ijk_to_ras)
    assert phantom.names == LABELS
    assert set(phantom.names.values()) == {
        "liver",
        "spleen",
        "left kidney",
        "right kidney",
        "aorta",
        "vertebra",
    }
    assert set(np.unique(phantom.labels.array)) == {0, *LABELS}
    assert "SYNTHETIC" in phantom.description
    assert phantom.nominal_hu == NOMINAL_HU


def test_geometry_is_anisotropic_rotated_and_offset(phantom):
    volume = phantom.image
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.8))
    directions = volume.ijk_to_ras[:3, :3] / np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)
    # not a signed permutation: the in-plane axes are rotated ~10 degrees about S
    assert np.abs(directions).max(axis=0).min() < 0.99
    assert np.allclose(directions[:, 2], [0.0, 0.0, 1.0])  # k runs superior
    assert np.linalg.det(directions) == pytest.approx(1.0)
    # stored like a DICOM axial series: i towards the patient's left (RAS -x), j posterior (-y)
    assert directions[0, 0] < -0.9 and directions[1, 1] < -0.9
    assert np.linalg.norm(volume.origin) > 10.0


def test_intensities_are_ct_like(phantom):
    image = phantom.image.array
    assert image.min() >= -1024 and image.max() <= 3071
    assert image[0, 0, 0] == -1000  # air in the corner, noise only inside the body
    erode = np.ones((1, 3, 3), bool)  # interior: away from the partial-volume blur at edges
    for value, name in phantom.names.items():
        interior = ndimage.binary_erosion(phantom.labels.array == value, erode)
        values = image[interior].astype(np.float64)
        assert abs(values.mean() - NOMINAL_HU[name]) < 3.0, name
        assert 8.0 < values.std() < 16.0, name  # the noise, SD ~12 HU


def test_structures_have_sane_sizes_and_lie_inside_the_body(phantom):
    labels = phantom.labels.array
    image = phantom.image.array
    voxel_ml = float(np.prod(phantom.labels.spacing)) / 1000.0
    volumes_ml = {name: (labels == v).sum() * voxel_ml for v, name in phantom.names.items()}
    assert 100.0 < volumes_ml["liver"] < 300.0
    assert 8.0 < volumes_ml["spleen"] < 40.0
    for name in ("right kidney", "left kidney"):
        assert 6.0 < volumes_ml[name] < 30.0
    assert 5.0 < volumes_ml["aorta"] < 20.0
    assert 20.0 < volumes_ml["vertebra"] < 80.0
    assert volumes_ml["liver"] == max(volumes_ml.values())
    # the body: everything not air, filled in-plane (gas in bowel loops is inside it)
    body = ndimage.binary_fill_holes(image > -500, np.ones((1, 3, 3), bool))
    assert np.all(body[labels > 0])
    # the body does not touch the in-plane edges of the field of view
    assert not body[:, [0, -1], :].any() and not body[:, :, [0, -1]].any()
    # the liver changes size across slices
    area = (labels == 1).sum(axis=(1, 2))
    assert area.max() > 4 * np.median(area[area > 0][:5])


def test_anatomy_in_ras(phantom):
    liver, spleen = _centroid_ras(phantom, "liver"), _centroid_ras(phantom, "spleen")
    right, left = _centroid_ras(phantom, "right kidney"), _centroid_ras(phantom, "left kidney")
    aorta, vertebra = _centroid_ras(phantom, "aorta"), _centroid_ras(phantom, "vertebra")
    # RAS: +x is the patient's right, +y anterior, +z superior
    assert liver[0] > vertebra[0] + 10 and liver[0] > 0
    assert spleen[0] < vertebra[0] - 10 and spleen[0] < 0
    assert right[0] > vertebra[0] + 10 > vertebra[0] - 10 > left[0]
    assert right[2] < left[2]  # the right kidney sits lower, under the liver
    assert aorta[1] > vertebra[1] and aorta[0] < vertebra[0]  # anterior-left of the vertebra
    assert vertebra[1] < min(liver[1], aorta[1])  # the vertebra is posterior
    for kidney in (right, left):
        assert kidney[1] < liver[1]  # kidneys are posterior (retroperitoneal)
