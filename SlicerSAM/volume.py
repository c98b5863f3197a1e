"""Volumes (a (K, J, I) array plus its IJK-to-RAS matrix) and reading them from disk.

A `Volume` is the engine's only image type. ``array`` is indexed ``[k, j, i]`` (slowest axis first,
as ``slicer.util.arrayFromVolume`` gives it) and ``ijk_to_ras`` maps homogeneous ``(i, j, k, 1)``
(note: i first) to RAS millimetres, as ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` does.

`load_volume` reads NIfTI (nibabel), NRRD and MetaImage (SimpleITK) files and DICOM series folders
(SimpleITK + GDCM). ITK, NRRD and DICOM describe geometry in LPS; the conversion to RAS happens here
(`flip_lps_ras`) and in `SlicerSAM.outputs`, nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from SlicerSAM.errors import VolumeError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding one "
    "DICOM series"
)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Largest deviation of one slice-to-slice distance from the series' median distance, as a fraction
# of that median: far above the rounding of positions written by scanners (~1e-4), far below one
# missing slice (a 100 % deviation).
SLICE_SPACING_TOLERANCE = 0.05
# Largest difference between two ImageOrientationPatient direction cosines treated as equal.
ORIENTATION_TOLERANCE = 1e-3


def flip_lps_ras(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 matrix mapping to LPS into one mapping to RAS, or back (it is its own inverse).

    The only LPS <-> RAS conversion in the engine: it negates the first two rows (x and y), so
    ``flip_lps_ras(ijk_to_lps)`` is ``ijk_to_ras`` and ``flip_lps_ras(ijk_to_ras)`` is
    ``ijk_to_lps``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {matrix.shape}")
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image: ``array`` (K, J, I) and the 4x4 ``ijk_to_ras`` matrix of its voxel grid.

    The array is not copied; do not modify it after calling `digest` (the digest is memoised).
    Construction checks that the array is 3D and non-empty and that the matrix is a finite,
    invertible affine transform; `from_array` also rejects non-finite voxel values.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    _digest: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise VolumeError(
                f"a volume needs a 3D (K, J, I) array, got {array.ndim}D data of shape "
                f"{array.shape}"
            )
        if array.size == 0:
            raise VolumeError(f"the volume is empty (shape {array.shape})")
        matrix = np.array(self.ijk_to_ras, dtype=np.float64)  # a private copy
        if matrix.shape != (4, 4):
            raise VolumeError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
        if not np.all(np.isfinite(matrix)):
            raise VolumeError(f"ijk_to_ras holds non-finite values:\n{matrix}")
        if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
            raise VolumeError(f"ijk_to_ras is not affine (last row {matrix[3]}, not 0 0 0 1)")
        linear = matrix[:3, :3]
        scale = float(np.abs(linear).max())
        if scale == 0.0 or abs(np.linalg.det(linear / scale)) < 1e-9:
            raise VolumeError(
                f"ijk_to_ras is not invertible (zero spacing or degenerate axes):\n{matrix}"
            )
        matrix.flags.writeable = False
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "ijk_to_ras", matrix)

    @classmethod
    def from_array(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """A volume from an array (K, J, I) and its 4x4 IJK-to-RAS matrix, validating both.

        Raises `VolumeError` for anything but a non-empty 3D array of finite values or for a matrix
        that is not a finite, invertible affine transform.
        """
        volume = cls(np.asarray(array), ijk_to_ras)
        _check_finite(volume.array, "the array")
        return volume

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (k, j, i), array order: norms of the matrix columns 2, 1, 0."""
        norms = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return (float(norms[2]), float(norms[1]), float(norms[0]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, J, I)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def axis_directions(self) -> np.ndarray:
        """(3, 3): row a is the RAS unit vector along array axis a (0 = k, 1 = j, 2 = i)."""
        columns = self.ijk_to_ras[:3, :3] / np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return columns[:, ::-1].T.copy()

    def kji_to_ras(self, kji: np.ndarray) -> np.ndarray:
        """Voxel coordinates (N, 3) (k, j, i) -> RAS mm (N, 3). A (3,) input gives a (3,) result."""
        kji = np.asarray(kji, dtype=np.float64)
        points = np.atleast_2d(kji)
        ras = points[:, ::-1] @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]
        return ras.reshape(kji.shape)

    def ras_to_kji(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm (N, 3) -> continuous voxel coordinates (N, 3) (k, j, i), centres at integers."""
        ras = np.asarray(ras, dtype=np.float64)
        points = np.atleast_2d(ras)
        ijk = np.linalg.solve(self.ijk_to_ras[:3, :3], (points - self.ijk_to_ras[:3, 3]).T).T
        return ijk[:, ::-1].reshape(ras.shape)

    def digest(self) -> str:
        """sha256 (hex) of the array's bytes, dtype, shape and the matrix; computed once."""
        if self._digest is None:
            sha = hashlib.sha256()
            sha.update(f"{self.array.dtype.str}|{self.array.shape}|".encode())
            sha.update(self.ijk_to_ras.tobytes())
            if self.array.flags["C_CONTIGUOUS"]:
                sha.update(memoryview(self.array.reshape(-1)).cast("B"))
            else:  # slice by slice: no full second copy of a non-contiguous volume
                for k in range(self.array.shape[0]):
                    sha.update(
                        memoryview(np.ascontiguousarray(self.array[k]).reshape(-1)).cast("B")
                    )
            object.__setattr__(self, "_digest", sha.hexdigest())
        return self._digest  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid (e.g. a label map of this image); the shape must match."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise VolumeError(
                f"array shape {array.shape} does not match the volume grid {self.array.shape} "
                "(K, J, I)"
            )
        return Volume(array, self.ijk_to_ras)


def load_volume(
    path: PathLike,
    *,
    series: Optional[str] = None,
    timepoint: Optional[int] = None,
    component: Optional[int] = None,
) -> Volume:
    """Read a 3D volume from a NIfTI, NRRD or MetaImage file or a DICOM series folder.

    Args:
        path: the image file, or a folder of DICOM files (a single DICOM file loads its series).
        series: SeriesInstanceUID to load when a DICOM folder holds several series.
        timepoint: index along the 4th axis of 4D data (time series), required when it is > 1.
        component: index of the component of multi-component (vector, RGB) data.

    Returns:
        The volume; integer data keeps its dtype (CT Hounsfield units stay int16), DICOM and NIfTI
        rescale slope/intercept are applied.

    Raises:
        VolumeError: missing or unreadable file, unknown format, 2D, 4D or multi-component data
            without a selection, empty data, non-finite values, or an unusable DICOM series
            (several series, missing slices, mixed orientations). The message says how to fix it.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path} does not exist")
    name = path.name.lower()
    if path.is_dir():
        volume = _load_dicom(path, series, timepoint, component)
    elif name.endswith(NIFTI_SUFFIXES):
        volume = _load_nifti(path, timepoint, component)
    elif name.endswith(ITK_SUFFIXES):
        volume = _load_itk_file(path, timepoint, component)
    elif name.endswith(DICOM_SUFFIXES) or _looks_like_dicom(path):
        volume = _load_dicom(path.parent, series, timepoint, component, member=path)
    else:
        raise VolumeError(f"{path}: unknown image format; supported: {SUPPORTED_FORMATS}")
    _check_finite(volume.array, str(path))
    logger.info(
        "loaded %s: shape (K, J, I) %s, spacing %s mm, %s",
        path,
        volume.shape,
        tuple(round(s, 4) for s in volume.spacing),
        volume.array.dtype,
    )
    return volume


# ---------------------------------------------------------------------------------------------
# checks shared by the readers


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.issubdtype(array.dtype, np.inexact):
        return
    # min/max propagate NaN and expose inf without a full-size boolean temporary
    if np.isfinite(array.min()) and np.isfinite(array.max()):
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    raise VolumeError(
        f"{what} holds non-finite voxel values ({nan} NaN, {inf} infinite of {array.size}); "
        "replace them (e.g. with the background value) before segmenting"
    )


def _two_d_error(path: Path, shape: tuple) -> VolumeError:
    return VolumeError(
        f"{path} holds 2D data (shape {tuple(shape)}); SlicerSAM needs a 3D volume "
        f"({SUPPORTED_FORMATS})"
    )


def _select(
    path: Path, what: str, count: int, value: Optional[int], keyword: str, shape3d: tuple
) -> int:
    """Check the index `value` chosen along an extra axis of `count` entries (timepoints, ...)."""
    if count == 1 and value in (None, 0):
        return 0
    if value is None:
        raise VolumeError(
            f"{path} holds {count} {what} of {shape3d[0]}x{shape3d[1]}x{shape3d[2]} voxels; a "
            f"single 3D volume is needed: pick one with {keyword}=N (0 <= N < {count}), e.g. "
            f"load_volume(path, {keyword}=0) or --{keyword} 0 on the command line"
        )
    if not 0 <= int(value) < count:
        raise VolumeError(f"{path}: {keyword}={value} is out of range: it holds {count} {what}")
    return int(value)


def _no_extra_axis(path: Path, value: Optional[int], keyword: str) -> None:
    if value not in (None, 0):
        raise VolumeError(f"{path} holds a single 3D volume; {keyword}={value} does not apply")


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# NIfTI (nibabel)


def _load_nifti(path: Path, timepoint: Optional[int], component: Optional[int]) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
    except Exception as error:  # nibabel raises many types for corrupt/truncated files
        raise VolumeError(
            f"{path} could not be read as NIfTI ({type(error).__name__}: {error}); supported: "
            f"{SUPPORTED_FORMATS}"
        ) from error
    if len(shape) < 3:
        raise _two_d_error(path, shape)
    if any(n == 0 for n in shape):
        raise VolumeError(f"{path} holds no voxels (shape {shape})")
    # NIfTI axes: 0-2 space, 3 time, 4 vector components (intent vector)
    index: tuple = (slice(None),) * 3
    if len(shape) >= 4:
        index += (_select(path, "timepoints (4th axis)", shape[3], timepoint, "timepoint", shape),)
    else:
        _no_extra_axis(path, timepoint, "timepoint")
    if len(shape) >= 5:
        index += (_select(path, "components (5th axis)", shape[4], component, "component", shape),)
    else:
        _no_extra_axis(path, component, "component")
    if len(shape) > 5:
        if any(n != 1 for n in shape[5:]):
            raise VolumeError(f"{path} holds {len(shape)}D data of shape {shape}; not supported")
        index += (0,) * (len(shape) - 5)
    try:
        data = _nifti_data(image, index)
    except Exception as error:
        raise VolumeError(f"{path}: the voxel data could not be read ({error})") from error
    # nibabel gives [i, j, k] (Fortran order on disk): the transpose is a C-order view, no copy
    return Volume(data.transpose(2, 1, 0), image.affine)


def _nifti_data(image, index: tuple) -> np.ndarray:
    """The voxels of `image` at `index`, scaled like nibabel, keeping integer types if possible."""
    proxy = image.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if not hasattr(proxy, "get_unscaled"):
        return np.asanyarray(proxy)[index]
    raw = np.asanyarray(proxy.get_unscaled())[index]
    if slope == 1.0 and inter == 0.0:
        return raw
    if np.issubdtype(raw.dtype, np.integer) and slope.is_integer() and inter.is_integer():
        # integral rescaling of integer data (e.g. uint16 + intercept -1024) stays integer
        info = np.iinfo(raw.dtype)
        ends = [info.min * slope + inter, info.max * slope + inter]
        lo, hi = int(min(ends)), int(max(ends))
        out = np.promote_types(np.min_scalar_type(lo), np.min_scalar_type(hi))
        if out.kind in "iu" and out.itemsize <= 4:
            # wide enough for raw * slope as well as for the result
            work = out
            for value in (info.min * int(slope), info.max * int(slope)):
                work = np.promote_types(work, np.min_scalar_type(value))
            scaled = raw.astype(work)
            if slope != 1.0:
                scaled *= int(slope)
            scaled += int(inter)
            return scaled.astype(out, copy=False)
    return np.asanyarray(proxy)[index]


# ---------------------------------------------------------------------------------------------
# SimpleITK (NRRD, MetaImage, DICOM)


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as error:  # pragma: no cover - SimpleITK is a dependency
        raise VolumeError(
            "reading NRRD, MetaImage and DICOM needs SimpleITK (pip install SimpleITK)"
        ) from error
    return sitk


def _load_itk_file(path: Path, timepoint: Optional[int], component: Optional[int]) -> Volume:
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise VolumeError(
            f"{path} could not be read ({reason}); supported: {SUPPORTED_FORMATS}"
        ) from error
    return _volume_from_sitk(image, path, timepoint, component)


def _volume_from_sitk(image, path: Path, timepoint: Optional[int], component: Optional[int]):
    sitk = _sitk()
    size = tuple(int(n) for n in image.GetSize())
    if image.GetDimension() == 2:
        raise _two_d_error(path, size[::-1])
    if image.GetDimension() not in (3, 4):
        raise VolumeError(
            f"{path} holds {image.GetDimension()}D data of size {size}; not supported"
        )
    if any(n == 0 for n in size):
        raise VolumeError(f"{path} holds no voxels (size {size})")
    if image.GetDimension() == 4:
        t = _select(path, "timepoints (4th axis)", size[3], timepoint, "timepoint", size[:3])
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, t])
    else:
        _no_extra_axis(path, timepoint, "timepoint")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        c = _select(path, "components per voxel", components, component, "component", size[:3])
        image = sitk.VectorIndexSelectionCast(image, c)
    else:
        _no_extra_axis(path, component, "component")
    array = sitk.GetArrayFromImage(image)  # [k, j, i]
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return Volume(array, flip_lps_ras(ijk_to_lps))


def _load_dicom(
    folder: Path,
    series: Optional[str],
    timepoint: Optional[int],
    component: Optional[int],
    member: Optional[Path] = None,
) -> Volume:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise VolumeError(f"{folder}: the DICOM folder could not be scanned ({error})") from error
    if not series_ids:
        raise VolumeError(
            f"no DICOM series found in {folder}; give a folder of DICOM files or an image file: "
            f"{SUPPORTED_FORMATS}"
        )
    files_of = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series_ids}
    if series is None and member is not None:
        owners = [uid for uid, names in files_of.items() if _same_file(member, names)]
        if owners:
            series = owners[0]
    if series is None:
        if len(series_ids) > 1:
            raise VolumeError(_several_series_message(folder, files_of))
        series = series_ids[0]
    elif series not in files_of:
        raise VolumeError(
            f"series {series!r} is not in {folder}. " + _several_series_message(folder, files_of)
        )
    files = _sorted_slices(folder, files_of[series])
    reader.SetFileNames([str(name) for name in files])
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(
            f"{folder}: DICOM series {series!r} could not be read ({error})"
        ) from error
    return _volume_from_sitk(image, folder, timepoint, component)


def _same_file(member: Path, names: list) -> bool:
    try:
        return any(Path(name).samefile(member) for name in names)
    except OSError:
        return False


def _several_series_message(folder: Path, files_of: dict) -> str:
    lines = [f"{folder} holds {len(files_of)} DICOM series; choose one with --series UID:"]
    for uid, names in files_of.items():
        description, modality = _dicom_tags(names[0], ("0008|103e", "0008|0060"))
        label = uid if uid else "(no SeriesInstanceUID)"
        lines.append(f"  {label}  {modality or '?'} '{description}'  ({len(names)} files)")
    lines.append("(Python: load_volume(folder, series=UID))")
    return "\n".join(lines)


def _dicom_tags(filename: str, tags: tuple) -> tuple:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(filename))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return tuple("" for _ in tags)
    keys = set(reader.GetMetaDataKeys())
    return tuple(reader.GetMetaData(tag).strip() if tag in keys else "" for tag in tags)


def _sorted_slices(folder: Path, names: list) -> list:
    """The files of one series sorted along the slice normal, after checking geometry.

    Raises VolumeError for mixed orientations, duplicate positions or missing slices; single
    (e.g. multi-frame) files and files without position tags are left to GDCM's order.
    """
    if len(names) < 2:
        return names
    geometry = []
    for name in names:
        position, orientation = _dicom_tags(name, ("0020|0032", "0020|0037"))
        try:
            ipp = np.array([float(v) for v in position.split("\\")], dtype=np.float64)
            iop = np.array([float(v) for v in orientation.split("\\")], dtype=np.float64)
        except ValueError:
            logger.warning("%s: no usable ImagePositionPatient/Orientation; GDCM order kept", name)
            return names
        if ipp.shape != (3,) or iop.shape != (6,):
            return names
        geometry.append((name, ipp, iop))
    orientations = [iop for _, _, iop in geometry]
    reference = orientations[0]
    differing = [
        Path(name).name
        for name, _, iop in geometry
        if np.abs(iop - reference).max() > ORIENTATION_TOLERANCE
    ]
    if differing:
        raise VolumeError(
            f"{folder}: the series mixes slice orientations (ImageOrientationPatient "
            f"{np.round(reference, 4).tolist()} in {Path(geometry[0][0]).name}, different in "
            f"{len(differing)} files such as {differing[0]}); it is not one volume. Export "
            "each orientation (e.g. localizer vs. axial) as its own series"
        )
    normal = np.cross(reference[:3], reference[3:])
    along = np.array([ipp @ normal for _, ipp, _ in geometry])
    order = np.argsort(along, kind="stable")
    along = along[order]
    files = [geometry[i][0] for i in order]
    steps = np.diff(along)
    step = float(np.median(steps))
    if step <= 0:
        raise VolumeError(
            f"{folder}: several DICOM files share a slice position "
            f"({Path(files[0]).name}, {Path(files[1]).name}); the series is not one volume"
        )
    bad = np.flatnonzero(np.abs(steps - step) > SLICE_SPACING_TOLERANCE * step)
    if bad.size:
        b = int(bad[0])
        kind = "duplicate slice positions" if steps[b] < 0.5 * step else "missing slices"
        raise VolumeError(
            f"{folder}: {kind}: the slice spacing is {step:.4g} mm but {Path(files[b]).name} "
            f"(position {along[b]:.4g} mm) and {Path(files[b + 1]).name} (position "
            f"{along[b + 1]:.4g} mm) are {steps[b]:.4g} mm apart ({bad.size} irregular gap(s) "
            "in all). Re-export the complete series"
        )
    # gantry tilt: slices shifted in-plane from one to the next; ITK stacks them straight along
    # the normal, so positions would be off by that shear (Slicer corrects it with a transform)
    positions = np.array([geometry[i][1] for i in order])
    drift = positions[-1] - positions[0] - normal * (along[-1] - along[0])
    if np.linalg.norm(drift) > SLICE_SPACING_TOLERANCE * step:
        logger.warning(
            "%s: slices are sheared (gantry tilt?): in-plane drift %.3g mm over the series; the "
            "volume is stacked along the slice normal and ignores it",
            folder,
            float(np.linalg.norm(drift)),
        )
    return files
