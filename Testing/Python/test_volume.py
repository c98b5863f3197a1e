"""Tests of SlicerSAM.volume: the Volume type, LPS/RAS, and load_volume for every format."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import awkward_volume, dicom_like_volume, rotation, write_dicom_series

from SlicerSAM.errors import VolumeError
from SlicerSAM.volume import Volume, flip_lps_ras, load_volume


def _ijk_grid(shape_kji, step=3):
    """(N, 3) (i, j, k) integer voxel positions sampled over a (K, J, I) grid."""
    k, j, i = np.meshgrid(*[np.arange(0, n, step) for n in shape_kji], indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)


def _write_nifti(path, array_kji, affine, dtype=None):
    """Write with nibabel directly (independent of SlicerSAM.outputs)."""
    image = nib.Nifti1Image(np.asarray(array_kji).transpose(2, 1, 0), affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    nib.save(image, str(path))


def _sitk_image(volume):
    """A SimpleITK image of `volume`, geometry converted to LPS by hand (not via flip_lps_ras)."""
    image = sitk.GetImageFromArray(volume.array)
    linear = volume.ijk_to_ras[:3, :3] * np.array([[-1.0], [-1.0], [1.0]])
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin((volume.ijk_to_ras[:3, 3] * [-1.0, -1.0, 1.0]).tolist())
    return image


# --- Volume -------------------------------------------------------------------------------------


def test_volume_spacing_shape_and_coordinates_follow_the_matrix():
    volume = awkward_volume()
    assert volume.shape == (36, 12, 32)
    np.testing.assert_allclose(volume.spacing, (0.8, 5.0, 0.7))
    kji = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [35.0, 11.0, 31.0]])
    ras = volume.kji_to_ras(kji)
    expected = (volume.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(ras, expected)
    np.testing.assert_allclose(volume.ras_to_kji(ras), kji, atol=1e-9)
    np.testing.assert_allclose(volume.kji_to_ras(kji[1]), expected[1])  # (3,) in, (3,) out
    np.testing.assert_allclose(volume.origin, volume.ijk_to_ras[:3, 3])
    np.testing.assert_allclose(np.linalg.norm(volume.axis_directions, axis=1), 1.0)


def test_digest_is_memoised_and_changes_with_data_dtype_and_geometry():
    volume = awkward_volume()
    first = volume.digest()
    assert volume._digest == first and volume.digest() == first and len(first) == 64
    assert Volume(volume.array.copy(), volume.ijk_to_ras).digest() == first
    changed = volume.array.copy()
    changed[0, 0, 0] += 1
    assert volume.with_array(changed).digest() != first
    assert volume.with_array(volume.array.astype(np.int32)).digest() != first
    shifted = volume.ijk_to_ras.copy()
    shifted[0, 3] += 0.5
    assert Volume(volume.array, shifted).digest() != first
    # a non-contiguous array hashes like its contiguous copy
    view = np.asarray(volume.array.transpose(2, 1, 0).copy()).transpose(2, 1, 0)
    assert not view.flags["C_CONTIGUOUS"]
    assert Volume(view, volume.ijk_to_ras).digest() == first


def test_with_array_keeps_the_grid_and_rejects_another_shape():
    volume = awkward_volume()
    labels = volume.with_array(np.zeros(volume.shape, dtype=np.uint8))
    np.testing.assert_array_equal(labels.ijk_to_ras, volume.ijk_to_ras)
    with pytest.raises(VolumeError, match=r"does not match the volume grid"):
        volume.with_array(np.zeros((3, 4, 5)))


def test_volume_matrix_is_a_read_only_copy():
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    volume = Volume(np.zeros((2, 3, 4)), matrix)
    matrix[0, 0] = 5.0
    assert volume.ijk_to_ras[0, 0] == 2.0
    with pytest.raises(ValueError):
        volume.ijk_to_ras[0, 0] = 3.0


@pytest.mark.parametrize(
    ("array", "matrix", "message"),
    [
        (np.zeros((4, 5)), np.eye(4), "3D"),
        (np.zeros((0, 5, 5)), np.eye(4), "empty"),
        (np.zeros((2, 5, 5)), np.full((4, 4), np.nan), "non-finite"),
        (np.zeros((2, 5, 5)), np.diag([1.0, 0.0, 1.0, 1.0]), "not invertible"),
        (np.zeros((2, 5, 5)), np.eye(3), "4x4"),
    ],
)
def test_volume_construction_is_validated(array, matrix, message):
    with pytest.raises(VolumeError, match=message):
        Volume.from_array(array, matrix)


def test_from_array_rejects_non_finite_values():
    array = np.zeros((2, 3, 4), dtype=np.float32)
    array[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match=r"1 NaN"):
        Volume.from_array(array, np.eye(4))


def test_flip_lps_ras_negates_x_and_y_and_is_its_own_inverse():
    matrix = awkward_volume().ijk_to_ras
    flipped = flip_lps_ras(matrix)
    np.testing.assert_allclose(flipped[:2], -matrix[:2])
    np.testing.assert_allclose(flipped[2:], matrix[2:])
    np.testing.assert_allclose(flip_lps_ras(flipped), matrix)


# --- NIfTI ----------------------------------------------------------------------------------


def test_nifti_with_oblique_flipped_affine_round_trips(tmp_path):
    volume = awkward_volume()
    path = tmp_path / "awkward.nii.gz"
    _write_nifti(path, volume.array, volume.ijk_to_ras)
    loaded = load_volume(path)
    assert loaded.shape == volume.shape and loaded.array.dtype == np.int16
    np.testing.assert_array_equal(loaded.array, volume.array)
    # independent check: nibabel's own affine applied to (i, j, k)
    affine = nib.load(str(path)).affine
    ijk = _ijk_grid(loaded.shape)
    expected = (affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    np.testing.assert_allclose(loaded.kji_to_ras(ijk[:, ::-1]), expected, atol=1e-6)
    np.testing.assert_allclose(loaded.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)  # float32 header


def test_nifti_integral_rescale_keeps_integers_and_other_rescale_gives_floats(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) * 100
    image = nib.Nifti1Image(raw.transpose(2, 1, 0), np.eye(4))
    image.header.set_slope_inter(1, -1024)
    nib.save(image, str(tmp_path / "int.nii"))
    loaded = load_volume(tmp_path / "int.nii")
    assert np.issubdtype(loaded.array.dtype, np.signedinteger)
    np.testing.assert_array_equal(loaded.array, raw.astype(np.int64) - 1024)
    image.header.set_slope_inter(0.5, 1.25)
    nib.save(image, str(tmp_path / "float.nii"))
    loaded = load_volume(tmp_path / "float.nii")
    assert loaded.array.dtype.kind == "f"
    np.testing.assert_allclose(loaded.array, raw * 0.5 + 1.25)


def test_nifti_4d_needs_a_timepoint(tmp_path):
    data = np.stack([np.full((4, 3, 2), t, dtype=np.int16) for t in range(5)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "series.nii.gz"))
    with pytest.raises(VolumeError, match=r"5 timepoints.*timepoint=N") as error:
        load_volume(tmp_path / "series.nii.gz")
    assert "--timepoint" in str(error.value)
    assert load_volume(tmp_path / "series.nii.gz", timepoint=3).array.max() == 3
    with pytest.raises(VolumeError, match="out of range"):
        load_volume(tmp_path / "series.nii.gz", timepoint=5)


def test_nifti_single_timepoint_4d_loads_as_3d(tmp_path):
    data = np.ones((4, 3, 2, 1), dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "one.nii"))
    assert load_volume(tmp_path / "one.nii").shape == (2, 3, 4)


def test_nifti_vector_needs_a_component(tmp_path):
    data = np.zeros((4, 3, 2, 1, 3), dtype=np.float32)
    data[..., 0, 2] = 7.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "rgb.nii"))
    with pytest.raises(VolumeError, match=r"3 components.*component=N"):
        load_volume(tmp_path / "rgb.nii")
    assert load_volume(tmp_path / "rgb.nii", component=2).array.max() == 7.0


def test_timepoint_on_3d_data_is_an_error(tmp_path):
    _write_nifti(tmp_path / "v.nii", np.zeros((2, 3, 4), np.int16), np.eye(4))
    assert load_volume(tmp_path / "v.nii", timepoint=0).shape == (2, 3, 4)
    with pytest.raises(VolumeError, match="single 3D volume"):
        load_volume(tmp_path / "v.nii", timepoint=1)


def test_2d_nifti_says_a_volume_is_needed(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.int16), np.eye(4)), str(tmp_path / "slice.nii"))
    with pytest.raises(VolumeError, match=r"2D data.*3D volume"):
        load_volume(tmp_path / "slice.nii")


def test_non_finite_values_are_rejected(tmp_path):
    data = np.zeros((2, 3, 4), dtype=np.float32)
    data[0, 1, 2] = np.inf
    _write_nifti(tmp_path / "inf.nii", data, np.eye(4))
    with pytest.raises(VolumeError, match=r"1 infinite"):
        load_volume(tmp_path / "inf.nii")


def test_empty_nifti_is_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((0, 3, 4), np.int16), np.eye(4)), str(tmp_path / "e.nii"))
    with pytest.raises(VolumeError, match=r"no voxels|empty"):
        load_volume(tmp_path / "e.nii")


def test_missing_unknown_and_corrupt_files_have_clear_errors(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        load_volume(tmp_path / "nothing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match=r"notes\.txt: unknown image format.*NIfTI.*DICOM"):
        load_volume(tmp_path / "notes.txt")
    with gzip.open(tmp_path / "broken.nii.gz", "wb") as stream:
        stream.write(b"not a nifti header at all")
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz could not be read"):
        load_volume(tmp_path / "broken.nii.gz")
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(VolumeError, match=r"broken\.nrrd could not be read.*supported"):
        load_volume(tmp_path / "broken.nrrd")


# --- NRRD / MetaImage -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_give_the_same_ras_geometry_as_nifti(tmp_path, suffix):
    volume = awkward_volume()
    _write_nifti(tmp_path / "v.nii.gz", volume.array, volume.ijk_to_ras)
    sitk.WriteImage(_sitk_image(volume), str(tmp_path / f"v{suffix}"))
    from_nifti = load_volume(tmp_path / "v.nii.gz")
    from_itk = load_volume(tmp_path / f"v{suffix}")
    assert from_itk.array.dtype == np.int16
    np.testing.assert_array_equal(from_itk.array, from_nifti.array)
    np.testing.assert_allclose(from_itk.ijk_to_ras, from_nifti.ijk_to_ras, atol=1e-4)


def test_itk_2d_4d_and_vector_images(tmp_path):
    sitk.WriteImage(sitk.Image([5, 6], sitk.sitkInt16), str(tmp_path / "flat.mha"))
    with pytest.raises(VolumeError, match=r"2D data"):
        load_volume(tmp_path / "flat.mha")
    series = sitk.GetImageFromArray(
        np.arange(3)[:, None, None, None] * np.ones((3, 2, 3, 4)), isVector=False
    )
    sitk.WriteImage(series, str(tmp_path / "series.mha"))
    with pytest.raises(VolumeError, match=r"3 timepoints"):
        load_volume(tmp_path / "series.mha")
    assert load_volume(tmp_path / "series.mha", timepoint=2).array.max() == 2
    rgb = sitk.GetImageFromArray(np.ones((2, 3, 4, 3), np.uint8) * [1, 2, 3], isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeError, match=r"3 components per voxel"):
        load_volume(tmp_path / "rgb.nrrd")
    assert load_volume(tmp_path / "rgb.nrrd", component=1).array.max() == 2


# --- DICOM (synthetic series) -------------------------------------------------------------------


def test_dicom_series_round_trips_oblique_geometry(tmp_path):
    volume = awkward_volume()
    write_dicom_series(tmp_path / "ct", volume)
    loaded = load_volume(tmp_path / "ct")
    np.testing.assert_array_equal(loaded.array, volume.array)
    np.testing.assert_allclose(loaded.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    # a single file of the series loads the whole series
    single = load_volume(tmp_path / "ct" / "slice005.dcm")
    np.testing.assert_array_equal(single.array, volume.array)


def test_folder_with_several_series_lists_them(tmp_path):
    volume = dicom_like_volume(shape=(4, 8, 8))
    write_dicom_series(tmp_path, volume, series_uid="1.2.3.4", description="Axial A", prefix="a")
    other = dicom_like_volume(shape=(3, 8, 8), seed=1)
    write_dicom_series(tmp_path, other, series_uid="1.2.3.5", description="Axial B", prefix="b")
    with pytest.raises(VolumeError) as error:
        load_volume(tmp_path)
    message = str(error.value)
    for expected in ("2 DICOM series", "--series", "1.2.3.4", "1.2.3.5", "Axial A", "Axial B"):
        assert expected in message
    assert "(4 files)" in message and "(3 files)" in message
    np.testing.assert_array_equal(load_volume(tmp_path, series="1.2.3.5").array, other.array)
    with pytest.raises(VolumeError, match=r"series '9\.9' is not in"):
        load_volume(tmp_path, series="9.9")


def test_missing_slice_is_reported_with_the_gap(tmp_path):
    paths = write_dicom_series(tmp_path, dicom_like_volume(shape=(6, 8, 8)))
    paths[3].unlink()
    with pytest.raises(VolumeError, match=r"missing slices.*slice002\.dcm.*slice004\.dcm.*5 mm"):
        load_volume(tmp_path)


def test_mixed_orientations_are_rejected(tmp_path):
    volume = dicom_like_volume(shape=(4, 8, 8))
    write_dicom_series(tmp_path, volume, series_uid="1.2.3.4")
    tilted = Volume(volume.array[:1], volume.ijk_to_ras.copy())
    matrix = tilted.ijk_to_ras.copy()
    matrix[:3, :3] = rotation((0, 0, 1), 30) @ matrix[:3, :3]
    matrix[2, 3] += 100.0
    write_dicom_series(tmp_path, Volume(tilted.array, matrix), series_uid="1.2.3.4", prefix="x")
    with pytest.raises(VolumeError, match=r"mixes slice orientations"):
        load_volume(tmp_path)


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(VolumeError, match=r"no DICOM series found"):
        load_volume(tmp_path)


# --- real data (../shared) ----------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_nifti_ct(shared_data):
    volume = load_volume(shared_data / "ct-abdomen-3mm" / "ct.nii.gz")
    assert volume.shape == (30, 101, 122)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0))
    affine = nib.load(str(shared_data / "ct-abdomen-3mm" / "ct.nii.gz")).affine
    np.testing.assert_allclose(volume.ijk_to_ras, affine)


@pytest.mark.shared_data
def test_real_dicom_matches_simpleitk_and_slice_positions(shared_data):
    import pydicom

    folder = shared_data / "ct-dicom-512"
    volume = load_volume(folder)
    assert volume.shape == (20, 512, 512)
    np.testing.assert_allclose(volume.spacing, (2.0, 0.9765625, 0.9765625))

    # SimpleITK's own reader, converted to RAS by hand
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    ijk_to_lps = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(volume.ijk_to_ras, np.diag([-1, -1, 1, 1]) @ ijk_to_lps)

    # slice order by position, rescale applied: each file's pixels sit at its own position
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(str(path))
        lps = np.array([float(v) for v in dataset.ImagePositionPatient])
        k, j, i = volume.ras_to_kji(lps * [-1, -1, 1])
        assert abs(j) < 1e-6 and abs(i) < 1e-6 and abs(k - round(k)) < 1e-6
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[int(round(k))], hu)
    z = volume.kji_to_ras(np.array([[0, 0, 0], [19, 0, 0]]))[:, 2]
    assert z[1] > z[0]  # k runs superior
