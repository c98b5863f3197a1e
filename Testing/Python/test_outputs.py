"""Tests of SlicerSAM.outputs: label maps, Slicer .seg.nrrd files and atomic, no-clobber writes."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
import slicerio
from synthetic import awkward_volume, nifti_like_volume, synthetic_labels

from SlicerSAM.errors import OutputError
from SlicerSAM.outputs import (
    atomic_output,
    check_output_path,
    write_labelmap,
    write_segmentation,
)
from SlicerSAM.volume import load_volume

SEGMENTS = [(1, "blob", (0.9, 0.2, 0.1)), (2, "marker: bright", (0.0, 0.5, 1.0))]


def _lps(matrix):
    """RAS -> LPS by hand (independent of SlicerSAM.volume.flip_lps_ras)."""
    out = np.array(matrix, dtype=float)
    out[:2] *= -1
    return out


@pytest.fixture(scope="module")
def awkward():
    volume = awkward_volume()
    return volume, synthetic_labels(volume)


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd"])
def test_labelmap_round_trips_on_the_exact_grid(tmp_path, awkward, name):
    volume, labels = awkward
    path = write_labelmap(tmp_path / name, labels, volume)
    loaded = load_volume(path)
    assert loaded.array.dtype == np.uint8
    np.testing.assert_array_equal(loaded.array, labels)
    np.testing.assert_allclose(loaded.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left


def test_nifti_labelmap_header_and_wide_labels(tmp_path, awkward):
    volume, labels = awkward
    write_labelmap(tmp_path / "wide.nii.gz", labels.astype(np.int64) * 400, volume)
    image = nib.load(str(tmp_path / "wide.nii.gz"))
    assert image.get_data_dtype() == np.uint16
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.affine, volume.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(
        np.asanyarray(image.dataobj).transpose(2, 1, 0), labels.astype(np.int64) * 400
    )


def test_nrrd_labelmap_uses_lps_space_directions(tmp_path, awkward):
    volume, labels = awkward
    write_labelmap(tmp_path / "labels.nrrd", labels, volume.ijk_to_ras)  # a bare matrix works
    data, header = nrrd.read(str(tmp_path / "labels.nrrd"))
    assert header["space"] == "left-posterior-superior"
    lps = _lps(volume.ijk_to_ras)
    np.testing.assert_allclose(header["space directions"], lps[:3, :3].T)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3])
    np.testing.assert_array_equal(data, labels.transpose(2, 1, 0))


@pytest.mark.parametrize("factory", [awkward_volume, nifti_like_volume])
def test_segmentation_round_trips_through_slicerio(tmp_path, factory):
    volume = factory()
    labels = synthetic_labels(volume)
    path = write_segmentation(tmp_path / "out.seg.nrrd", labels, volume, SEGMENTS)
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], _lps(volume.ijk_to_ras), atol=1e-9)
    np.testing.assert_array_equal(segmentation["voxels"].transpose(2, 1, 0), labels)
    read = {s["labelValue"]: (s["name"], tuple(s["color"])) for s in segmentation["segments"]}
    assert read == {value: (name, color) for value, name, color in SEGMENTS}
    _, header = nrrd.read(str(path))
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segment0_Layer"] == "0"


def test_segmentation_requires_a_segment_per_label_and_valid_segments(tmp_path, awkward):
    volume, labels = awkward
    path = tmp_path / "out.seg.nrrd"
    with pytest.raises(OutputError, match=r"label values \[2\] have no segment"):
        write_segmentation(path, labels, volume, SEGMENTS[:1])
    with pytest.raises(OutputError, match="more than one segment"):
        write_segmentation(path, labels, volume, SEGMENTS + [(1, "again", (0, 0, 0))])
    with pytest.raises(OutputError, match="colour"):
        write_segmentation(path, labels, volume, [(1, "a", (0, 0, 255)), SEGMENTS[1]])
    with pytest.raises(OutputError, match="invalid name"):
        write_segmentation(path, labels, volume, [(1, "two\nlines", (0, 0, 1)), SEGMENTS[1]])
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_labels_must_fit_the_grid_and_be_non_negative_integers(tmp_path, awkward):
    volume, labels = awkward
    with pytest.raises(OutputError, match="does not match the volume grid"):
        write_labelmap(tmp_path / "a.nii.gz", labels[:, :3], volume)
    with pytest.raises(OutputError, match=">= 0"):
        write_labelmap(tmp_path / "a.nii.gz", labels.astype(np.int16) - 1, volume)
    with pytest.raises(OutputError, match="integers"):
        write_labelmap(tmp_path / "a.nii.gz", labels + 0.5, volume)
    with pytest.raises(OutputError, match="extension"):
        write_labelmap(tmp_path / "a.png", labels, volume)
    write_labelmap(tmp_path / "bool.nii.gz", labels > 0, volume)
    assert load_volume(tmp_path / "bool.nii.gz").array.dtype == np.uint8


def test_existing_file_is_kept_without_overwrite(tmp_path, awkward):
    volume, labels = awkward
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists.*overwrite"):
        check_output_path(path)
    with pytest.raises(OutputError, match="already exists"):
        write_labelmap(path, labels, volume)
    segmentation = tmp_path / "labels.seg.nrrd"
    segmentation.write_bytes(b"precious too")
    with pytest.raises(OutputError, match="already exists"):
        write_segmentation(segmentation, labels, volume, SEGMENTS)
    assert path.read_bytes() == b"precious" and segmentation.read_bytes() == b"precious too"
    write_labelmap(path, labels, volume, overwrite=True)
    np.testing.assert_array_equal(load_volume(path).array, labels)


def test_exception_while_writing_leaves_nothing(tmp_path):
    path = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(path) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith(".nii.gz")
            temporary.write_bytes(b"half a file")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path, overwrite=True) as temporary:
            temporary.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_atomic_output_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "deeper" / "result.seg.nrrd"
    check_output_path(path)  # a missing folder is fine
    with atomic_output(path) as temporary:
        assert temporary.name.endswith(".seg.nrrd")
        temporary.write_text("v1")
    assert path.read_text() == "v1"
    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text("v2")
    assert path.read_text() == "v2" and len(list(path.parent.iterdir())) == 1
    with pytest.raises(OutputError, match="nothing was written"):
        with atomic_output(tmp_path / "empty.nii"):
            pass


def test_check_output_path_rejects_folders_and_wrong_extensions(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match=r"\.seg\.nrrd"):
        check_output_path(tmp_path / "x.nii", suffixes=(".seg.nrrd",))
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_path(tmp_path / "file" / "x.nii")
