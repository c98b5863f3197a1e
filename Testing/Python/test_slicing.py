"""Tests of SlicerSAM.slicing: Slicer-like slice orientation, square-pixel images, coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import (
    MARKER_LABEL,
    awkward_volume,
    dicom_like_volume,
    make_ijk_to_ras,
    nifti_like_volume,
    rotation,
    synthetic_labels,
)

from SlicerSAM.slicing import ORIENTATIONS, patient_axes, plane_for, resample_2d
from SlicerSAM.volume import Volume

# RAS component and sign in which the grid's row / column index grows, per Slicer view
EXPECTED_DIRECTIONS = {
    "axial": ((1, -1), (0, -1)),  # rows -> posterior, columns -> patient left
    "coronal": ((2, -1), (0, -1)),  # rows -> inferior, columns -> patient left
    "sagittal": ((2, -1), (1, -1)),  # rows -> inferior, columns -> posterior
}
NORMAL_COMPONENT = {"axial": 2, "coronal": 1, "sagittal": 0}


def _ras_grids(volume, plane, index):
    """RAS coordinates (rows, cols, 3) of the voxel centres of one oriented slice."""
    ras = volume.kji_to_ras(np.indices(volume.shape).reshape(3, -1).T).reshape(*volume.shape, 3)
    return np.stack([plane.grid(ras[..., c], index) for c in range(3)], axis=-1)


def test_awkward_volume_planes_pick_the_documented_axes_and_flips():
    volume = awkward_volume()
    axial, coronal, sagittal = (plane_for(volume, o) for o in ORIENTATIONS)
    assert (axial.axis, axial.row_axis, axial.col_axis) == (1, 0, 2)
    assert (axial.row_flip, axial.col_flip) == (True, True)
    assert (coronal.axis, coronal.row_axis, coronal.col_axis) == (0, 1, 2)
    assert (coronal.row_flip, coronal.col_flip) == (False, True)
    assert (sagittal.axis, sagittal.row_axis, sagittal.col_axis) == (2, 1, 0)
    assert (sagittal.row_flip, sagittal.col_flip) == (False, True)
    assert axial.num_slices == 12 and axial.grid_shape == (36, 32)
    assert axial.grid_spacing == (0.8, 0.7)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("factory", [awkward_volume, dicom_like_volume, nifti_like_volume])
def test_grid_rows_and_columns_run_as_in_slicer_views(factory, orientation):
    volume = factory()
    plane = plane_for(volume, orientation)
    ras = _ras_grids(volume, plane, plane.num_slices // 2)
    (row_c, row_sign), (col_c, col_sign) = EXPECTED_DIRECTIONS[orientation]
    down = np.diff(ras, axis=0).mean(axis=(0, 1))
    right = np.diff(ras, axis=1).mean(axis=(0, 1))
    assert np.sign(down[row_c]) == row_sign and abs(down[row_c]) > 0.9 * np.linalg.norm(down)
    assert np.sign(right[col_c]) == col_sign and abs(right[col_c]) > 0.9 * np.linalg.norm(right)
    # successive slices move mostly along the view's normal
    next_slice = _ras_grids(volume, plane, plane.num_slices // 2 + 1) - ras
    step = next_slice.mean(axis=(0, 1))
    assert abs(step[NORMAL_COMPONENT[orientation]]) > 0.9 * np.linalg.norm(step)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_marker_anterior_right_superior_appears_top_left(orientation):
    # the marker sits towards right, anterior and superior: in every Slicer view that is the
    # upper-left quadrant (axial: anterior = top, right = left; coronal/sagittal: superior = top,
    # right / anterior = left)
    volume = awkward_volume()
    labels = synthetic_labels(volume)
    plane = plane_for(volume, orientation)
    hits = [np.argwhere(plane.grid(labels, i) == MARKER_LABEL) for i in range(plane.num_slices)]
    rows, cols = np.concatenate([h for h in hits if len(h)]).mean(axis=0)
    assert rows < plane.grid_shape[0] / 2 and cols < plane.grid_shape[1] / 2


def test_sagittal_of_anisotropic_volume_is_not_squashed():
    volume = awkward_volume()  # sagittal rows 5 mm, columns 0.8 mm
    plane = plane_for(volume, "sagittal")
    rows, cols = plane.grid_shape
    height, width = plane.image_shape
    assert plane.is_resampled and width == cols
    assert height / width == pytest.approx((rows * 5.0) / (cols * 0.8), rel=0.02)
    assert plane.pixel_spacing == pytest.approx((0.8, 0.8), rel=0.02)
    image = plane.to_image(plane.grid(volume.array, 3))
    assert image.shape == (height, width) and image.dtype == volume.array.dtype


def test_square_grids_are_used_as_is_and_grids_are_views():
    volume = dicom_like_volume()  # LPS-aligned CT: the axial view shows the array as stored
    plane = plane_for(volume, "axial")
    assert (plane.axis, plane.row_flip, plane.col_flip) == (0, False, False)
    assert not plane.is_resampled
    grid = plane.grid(volume.array, 4)
    assert grid.base is not None and np.shares_memory(grid, volume.array)
    np.testing.assert_array_equal(grid, volume.array[4])
    assert plane.to_image(grid) is grid and plane.to_grid(grid) is grid
    nifti = plane_for(nifti_like_volume(), "axial")  # RAS+ NIfTI: both axes flipped
    assert (nifti.row_flip, nifti.col_flip) == (True, True)
    awkward = awkward_volume()
    for orientation in ORIENTATIONS:  # transposed and flipped, still views
        view = plane_for(awkward, orientation).grid(awkward.array, 2)
        assert np.shares_memory(view, awkward.array)


def test_spacings_within_one_percent_count_as_square():
    volume = Volume(np.zeros((4, 10, 10)), make_ijk_to_ras(np.eye(3)[::-1], (3.0, 1.0, 1.009), 0))
    assert not plane_for(volume, "axial").is_resampled
    volume = Volume(np.zeros((4, 10, 10)), make_ijk_to_ras(np.eye(3)[::-1], (3.0, 1.0, 1.02), 0))
    assert plane_for(volume, "axial").image_shape == (10, 10)  # rounds to the same size
    assert plane_for(volume, "axial").is_resampled is False


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_voxel_to_xy_and_back_round_trips(orientation):
    volume = awkward_volume()
    plane = plane_for(volume, orientation)
    rng = np.random.default_rng(0)
    kji = rng.uniform(0, np.array(volume.shape) - 1, size=(50, 3))
    indices, xy = plane.voxel_to_xy(kji)
    np.testing.assert_allclose(indices, kji[:, plane.axis])
    np.testing.assert_allclose(plane.xy_to_voxel(indices, xy), kji, atol=1e-9)
    assert np.all(xy >= -0.5) and np.all(xy <= np.array(plane.image_shape[::-1]) - 0.5)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_xy_follows_to_image_resampling(orientation):
    # a grid holding its own (row, col) coordinates, resampled linearly, must read back at each
    # pixel the grid position xy_to_voxel gives for that pixel (x = column, y = row)
    volume = awkward_volume()
    plane = plane_for(volume, orientation)
    rows, cols = np.indices(plane.grid_shape).astype(np.float64)
    height, width = plane.image_shape
    y, x = np.mgrid[0:height, 0:width]
    xy = np.stack([x.ravel(), y.ravel()], axis=1).astype(float)
    kji = plane.xy_to_voxel(0, xy)
    r = kji[:, plane.row_axis]
    c = kji[:, plane.col_axis]
    if plane.row_flip:
        r = plane.grid_shape[0] - 1 - r
    if plane.col_flip:
        c = plane.grid_shape[1] - 1 - c
    # between the outermost voxel centres (beyond them the edge value is replicated)
    inside = (r >= 0) & (r <= plane.grid_shape[0] - 1) & (c >= 0) & (c <= plane.grid_shape[1] - 1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(plane.to_image(rows).ravel()[inside], r[inside], atol=1e-5)
    np.testing.assert_allclose(plane.to_image(cols).ravel()[inside], c[inside], atol=1e-5)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_mask_to_image_and_back_round_trips(orientation):
    volume = awkward_volume()
    plane = plane_for(volume, orientation)
    labels = synthetic_labels(volume)
    index = int(np.argmax([(plane.grid(labels, i) > 0).sum() for i in range(plane.num_slices)]))
    mask = plane.grid(labels, index) > 0
    image = plane.to_image(mask, order=0)
    assert image.shape == plane.image_shape and image.dtype == np.bool_
    np.testing.assert_array_equal(plane.to_grid(image, order=0), mask)
    smooth = plane.to_grid(plane.to_image(mask, order=1), order=1)
    assert smooth.dtype == np.bool_ and (smooth != mask).mean() < 0.02
    lab = plane.grid(labels, index)
    np.testing.assert_array_equal(plane.to_grid(plane.to_image(lab, order=0), order=0), lab)


def test_set_grid_and_stack_round_trip():
    volume = awkward_volume()
    labels = synthetic_labels(volume)
    for orientation in ORIENTATIONS:
        plane = plane_for(volume, orientation)
        assert plane.volume_shape == volume.shape
        grids = {i: plane.grid(labels, i).copy() for i in range(plane.num_slices)}
        np.testing.assert_array_equal(plane.stack(grids, np.uint8), labels)
        partial = plane.stack({2: grids[2]})
        assert partial.dtype == np.uint8 and partial.sum() == grids[2].sum()
        rebuilt = np.zeros_like(labels)
        for index, grid in grids.items():
            plane.set_grid(rebuilt, index, grid)
        np.testing.assert_array_equal(rebuilt, labels)
    assert plane_for(volume).stack({}).dtype == np.bool_


def test_bad_indices_shapes_and_orientations_are_errors():
    volume = awkward_volume()
    plane = plane_for(volume, "axial")
    with pytest.raises(IndexError):
        plane.grid(volume.array, plane.num_slices)
    with pytest.raises(IndexError):
        plane.grid(volume.array, -1)
    with pytest.raises(ValueError, match="volume shape"):
        plane.grid(volume.array[:, :3], 0)
    with pytest.raises(ValueError, match="grid shape"):
        plane.set_grid(volume.array.copy(), 0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="axial, coronal, sagittal"):
        plane_for(volume, "oblique")
    assert plane_for(volume, " Axial ").orientation == "axial"


def test_oblique_45_degree_volume_gets_one_consistent_assignment():
    directions = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    volume = Volume(
        np.zeros((5, 6, 7)),
        make_ijk_to_ras(directions @ rotation((0, 0, 1), 45).T, (2.0, 1.0, 1.0), (0, 0, 0)),
    )
    axes = patient_axes(volume.ijk_to_ras)
    assert sorted(axes) == [0, 1, 2] and axes[2] == 0
    planes = [plane_for(volume, o) for o in ORIENTATIONS]
    for plane in planes:
        assert sorted((plane.axis, plane.row_axis, plane.col_axis)) == [0, 1, 2]
    assert planes[0].axis == 0 and planes[1].axis != planes[2].axis


def test_resample_2d_keeps_dtype_and_range():
    grid = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = resample_2d(grid, (6, 4), order=3)
    assert out.dtype == np.uint8 and out.min() >= 0 and out.max() <= 255
    labels = np.array([[0, 70000], [3, 1]], dtype=np.uint32)
    assert set(np.unique(resample_2d(labels, (5, 5), order=0))) == {0, 1, 3, 70000}
