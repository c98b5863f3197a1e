"""Small synthetic volumes with awkward geometry, for tests of every engine module.

All factories return a `SlicerSAM.volume.Volume` (array (K, J, I), int16 "HU") holding the same
content, placed by physical position so it looks the same whatever the grid:

- background 0 HU with Gaussian noise (sigma 10, seeded);
- label 1, "blob": 200 HU ellipsoid at the centre of the volume's RAS bounding box, semi-axes 0.3 x
  the box's extent along R, A and S;
- label 2, "marker": 600 HU ellipsoid centred at +0.25 x extent towards right, anterior and
  superior from the centre (semi-axes 0.12 x extent): it breaks the mirror symmetries, so a flipped
  or transposed view shows up.

`synthetic_labels(volume)` gives those labels (uint8) on any grid.

`awkward_volume()` is the one to test geometry with: array axis 0 runs anterior (0.8 mm), axis 1
inferior (5 mm, so the axial slice axis is array axis 1), axis 2 towards patient right (0.7 mm),
all tilted by 8 degrees, non-zero origin; every Slicer view flips at least one axis and none is
square. `dicom_like_volume()` is the usual LPS-aligned CT (no flips in the axial view),
`nifti_like_volume()` the RAS+-aligned NIfTI layout of ``ct-abdomen-3mm`` (axial view flips rows and
columns). `write_dicom_series()` writes any right-handed volume as a DICOM series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from SlicerSAM.volume import Volume, flip_lps_ras

BLOB_HU = 200
MARKER_HU = 600
BLOB_LABEL = 1
MARKER_LABEL = 2


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """(3, 3) rotation matrix by `degrees` about `axis` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def make_ijk_to_ras(
    axis_directions: Sequence[Sequence[float]],
    spacing: Sequence[float],
    origin: Sequence[float],
) -> np.ndarray:
    """4x4 IJK-to-RAS matrix from per-array-axis directions and spacings, all in (k, j, i) order.

    `axis_directions[a]` is the RAS direction of array axis a (normalised here), `spacing[a]` its
    voxel size in mm, `origin` the RAS position of voxel (0, 0, 0).
    """
    directions = np.asarray(axis_directions, dtype=np.float64)
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    matrix = np.eye(4)
    for a in range(3):
        matrix[:3, 2 - a] = directions[a] * float(spacing[a])  # array axis a = matrix column 2 - a
    matrix[:3, 3] = origin
    return matrix


def bounding_box_ras(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(low corner, high corner) RAS of the voxel centres' bounding box."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape], indexing="ij"))
    ras = volume.kji_to_ras(corners.reshape(3, -1).T)
    return ras.min(axis=0), ras.max(axis=0)


def ellipsoid_mask(
    volume: Volume, center_ras: Sequence[float], radii_mm: Sequence[float]
) -> np.ndarray:
    """Bool (K, J, I): voxel centres inside the RAS-axis-aligned ellipsoid."""
    kji = np.indices(volume.shape).reshape(3, -1).T
    ras = volume.kji_to_ras(kji)
    inside = (((ras - np.asarray(center_ras)) / np.asarray(radii_mm, dtype=np.float64)) ** 2).sum(1)
    return (inside <= 1.0).reshape(volume.shape)


def synthetic_labels(volume: Volume) -> np.ndarray:
    """uint8 (K, J, I): 1 = blob, 2 = marker (module docstring), 0 elsewhere, on `volume`'s grid."""
    low, high = bounding_box_ras(volume)
    center = (low + high) / 2
    extent = high - low
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[ellipsoid_mask(volume, center, 0.3 * extent)] = BLOB_LABEL
    labels[ellipsoid_mask(volume, center + 0.25 * extent, 0.12 * extent)] = MARKER_LABEL
    return labels


def phantom_volume(ijk_to_ras: np.ndarray, shape: Sequence[int], seed: int = 0) -> Volume:
    """A volume of the synthetic content (module docstring) on any grid, int16 HU."""
    geometry = Volume(np.zeros(tuple(shape), dtype=np.int16), ijk_to_ras)
    labels = synthetic_labels(geometry)
    noise = np.random.default_rng(seed).normal(0.0, 10.0, size=geometry.shape)
    values = np.choose(labels, [0, BLOB_HU, MARKER_HU]) + noise
    return geometry.with_array(np.rint(values).astype(np.int16))


def awkward_volume(
    shape: Sequence[int] = (36, 12, 32),
    spacing: Sequence[float] = (0.8, 5.0, 0.7),
    tilt_degrees: float = 8.0,
    origin: Sequence[float] = (31.5, -12.25, 87.0),
    seed: int = 0,
) -> Volume:
    """Oblique, anisotropic, flipped, permuted: array axes (k, j, i) run towards anterior,
    inferior and patient right (before an oblique tilt of `tilt_degrees`); spacing in (k, j, i).

    Slicer views on it (`SlicerSAM.slicing.plane_for`): axial cuts array axis 1 (rows = axis 0
    flipped, columns = axis 2 flipped); coronal cuts axis 0 (rows = axis 1, columns = axis 2
    flipped); sagittal cuts axis 2 (rows = axis 1, columns = axis 0 flipped).
    """
    directions = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    directions = directions @ rotation((1.0, 2.0, 3.0), tilt_degrees).T
    return phantom_volume(make_ijk_to_ras(directions, spacing, origin), shape, seed)


def dicom_like_volume(
    shape: Sequence[int] = (16, 40, 48),
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    origin: Sequence[float] = (19.0, 15.0, -60.0),
    seed: int = 0,
) -> Volume:
    """Axis-aligned CT as DICOM stores it: i -> patient left, j -> posterior, k -> superior."""
    directions = [[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]
    return phantom_volume(make_ijk_to_ras(directions, spacing, origin), shape, seed)


def nifti_like_volume(
    shape: Sequence[int] = (10, 34, 40),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    origin: Sequence[float] = (-60.0, -50.0, 20.0),
    seed: int = 0,
) -> Volume:
    """Axis-aligned RAS+ layout of ct-abdomen-3mm: i -> right, j -> anterior, k -> superior."""
    directions = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    return phantom_volume(make_ijk_to_ras(directions, spacing, origin), shape, seed)


def write_dicom_series(
    folder,
    volume: Volume,
    series_uid: Optional[str] = None,
    description: str = "synthetic",
    study_uid: Optional[str] = None,
    first_instance: int = 1,
    prefix: str = "slice",
) -> list[Path]:
    """Write `volume` (right-handed, orthogonal axes) as a CT DICOM series, one file per k.

    Each file holds one (J, I) slice; re-reading the folder gives back the same grid. Returns the
    file paths (``{prefix}{k:03d}.dcm``). UIDs default to ones derived from `description`.
    """
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid(entropy_srcs=["series", description])
    study_uid = study_uid or generate_uid(entropy_srcs=["study", description])
    ijk_to_lps = flip_lps_ras(volume.ijk_to_ras)
    spacing_ijk = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing_ijk
    orientation = "\\".join(f"{v:.10g}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(volume.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array[k]))
        image.SetSpacing((float(spacing_ijk[0]), float(spacing_ijk[1])))
        position = ijk_to_lps[:3, :3] @ np.array([0.0, 0.0, k]) + ijk_to_lps[:3, 3]
        tags = {
            "0008|0060": "CT",  # CT keeps ImagePositionPatient and the slice geometry
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": generate_uid(entropy_srcs=[series_uid, str(k)]),
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0008|103e": description,
            "0020|0013": str(first_instance + k),
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{spacing_ijk[2]:.10g}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    return paths
