"""Writing label maps and Slicer segmentations on the exact grid of the source volume.

- `write_labelmap`: NIfTI (.nii, .nii.gz; nibabel, the volume's affine) or NRRD (.nrrd; pynrrd,
  LPS space directions), smallest unsigned integer type that holds the labels.
- `write_segmentation`: a Slicer ``.seg.nrrd`` (slicerio) with segment names, colours and values;
  `write_overlapping_segmentation` one with segments that may overlap (one layer per overlap).
- `atomic_output`: every file is written to a temporary name in the target folder and moved into
  place with ``os.replace``, so a failure never leaves a partial file; an existing file is kept
  unless ``overwrite`` is set. `check_output_path` lets a caller fail before any computation.

Labels are (K, J, I) arrays like `Volume.array`; LPS <-> RAS goes through
`SlicerSAM.volume.flip_lps_ras` (the engine's single conversion).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from SlicerSAM.errors import OutputError
from SlicerSAM.volume import Volume, flip_lps_ras

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nrrd")


def check_output_path(
    path: PathLike, overwrite: bool = False, suffixes: Optional[Sequence[str]] = None
) -> Path:
    """Fail early (OutputError) when `path` cannot be written; returns it as a Path.

    Checks: an existing file without `overwrite`, a folder at `path`, a parent that exists but is
    not a writable folder, and (when `suffixes` is given) the file extension. A missing parent
    folder is fine: it is created when the file is written.
    """
    path = Path(path)
    if suffixes is not None and not path.name.lower().endswith(tuple(suffixes)):
        raise OutputError(f"{path}: unsupported output extension; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no write permission in {parent}")
    return path


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path next to `path`; moved onto `path` on success.

    The temporary name ends with the same extension(s) (writers pick the format from it). An
    exception inside the block removes the temporary file and leaves `path` as it was.
    """
    path = check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _full_suffix(path.name)
    stem = path.name[: len(path.name) - len(suffix)]
    temporary = path.with_name(f".{stem}.tmp-{secrets.token_hex(6)}{suffix}")
    try:
        yield temporary
        if not temporary.exists():
            raise OutputError(f"nothing was written for {path}")
        if path.exists() and not overwrite:  # created by someone else meanwhile
            raise OutputError(f"{path} appeared while writing; not overwritten")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    logger.info("wrote %s", path)


def write_labelmap(
    path: PathLike,
    labels: np.ndarray,
    volume_or_geometry: Union[Volume, np.ndarray],
    overwrite: bool = False,
) -> Path:
    """Write a (K, J, I) label array on the grid of a `Volume` (or a 4x4 IJK-to-RAS matrix).

    NIfTI (.nii, .nii.gz) gets the exact affine as sform and qform (code 1, scanner); NRRD (.nrrd)
    gets LPS space directions and origin. The data type is uint8, uint16 or uint32, the smallest
    that holds the largest label. Raises OutputError for a shape that is not the volume's, negative
    or non-integer labels, an unsupported extension or an existing file without `overwrite`.
    """
    path = check_output_path(path, overwrite, LABELMAP_SUFFIXES)
    ijk_to_ras = _geometry(volume_or_geometry)
    data = _label_array(labels, volume_or_geometry)
    with atomic_output(path, overwrite) as temporary:
        if path.name.lower().endswith(".nrrd"):
            _write_nrrd(temporary, data, ijk_to_ras)
        else:
            _write_nifti(temporary, data, ijk_to_ras)
    return path


def write_segmentation(
    path: PathLike,
    labels: np.ndarray,
    volume: Union[Volume, np.ndarray],
    segments: Sequence[tuple],
    overwrite: bool = False,
) -> Path:
    """Write a Slicer segmentation (.seg.nrrd) of a (K, J, I) label array.

    Args:
        path: output file, normally ending in ``.seg.nrrd`` (Slicer picks the reader by it).
        labels: (K, J, I) integer labels, 0 = background.
        volume: the source `Volume` (or its 4x4 IJK-to-RAS matrix): the file uses its exact grid.
        segments: ``(value, name, (r, g, b))`` per label value, colours in 0..1; every non-zero
            value in `labels` needs one.
        overwrite: replace an existing file.

    Raises:
        OutputError: as `write_labelmap`, plus duplicate or missing segment values, empty or
            multi-line names, colours outside 0..1.
    """

    path = check_output_path(path, overwrite, SEGMENTATION_SUFFIXES)
    if not path.name.lower().endswith(".seg.nrrd"):
        logger.warning("%s: Slicer opens segmentations by the '.seg.nrrd' extension", path)
    ijk_to_ras = _geometry(volume)
    data = _label_array(labels, volume)
    entries = _segment_entries(segments, data)
    return _write_seg_nrrd(path, data, ijk_to_ras, entries, overwrite)


def write_overlapping_segmentation(
    path: PathLike,
    masks: Sequence[np.ndarray],
    volume: Union[Volume, np.ndarray],
    segments: Sequence[tuple],
    overwrite: bool = False,
) -> Path:
    """Write segments that may overlap (candidates of one slice) as a layered ``.seg.nrrd``.

    Each (K, J, I) bool mask becomes one segment; masks go to the first layer where they overlap
    no other (Slicer's own layout for overlapping segments), so a file of disjoint masks has one
    layer. ``segments``: ``(name, (r, g, b))`` per mask, colours in 0..1. Checks and atomic
    writing as `write_segmentation`.
    """

    path = check_output_path(path, overwrite, SEGMENTATION_SUFFIXES)
    if len(masks) != len(segments):
        raise OutputError(f"{len(masks)} masks for {len(segments)} segment names and colours")
    if not masks:
        raise OutputError("no segments to write")
    ijk_to_ras = _geometry(volume)
    layers: list = []  # (K, J, I) label arrays
    entries = []
    for number, (mask, (name, color)) in enumerate(zip(masks, segments)):
        mask = np.asarray(mask, dtype=bool)
        _label_array(mask, volume)  # shape checks
        layer = next((i for i, lab in enumerate(layers) if not lab[mask].any()), len(layers))
        if layer == len(layers):
            layers.append(np.zeros(mask.shape, dtype=np.uint16))
        value = int(layers[layer].max()) + 1
        layers[layer][mask] = value
        entry = _segment_entries([(value, name, color)], np.zeros(0, dtype=np.uint8))[0]
        entry.update(id=f"Segment_{number + 1}", layer=layer)
        entries.append(entry)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise OutputError("segment names must be distinct")
    data = np.stack(layers, axis=-1) if len(layers) > 1 else layers[0]
    return _write_seg_nrrd(path, data, ijk_to_ras, entries, overwrite)


def _write_seg_nrrd(path: Path, data: np.ndarray, ijk_to_ras, entries, overwrite: bool) -> Path:
    """Write (K, J, I) labels, or (K, J, I, layers), with their segment entries (slicerio)."""
    import slicerio

    # slicerio/pynrrd index voxels in Fortran order: [i, j, k(, layer)]
    voxels = data.transpose(2, 1, 0, 3) if data.ndim == 4 else data.transpose(2, 1, 0)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": flip_lps_ras(ijk_to_ras),
        "segments": entries,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_output(path, overwrite) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation)
    return path


def read_segmentation(path: PathLike):
    """A Slicer segmentation (.seg.nrrd) as ``(labels, segments, ijk_to_ras)``.

    ``labels``: (K, J, I) integer array on the segmentation's own grid (its extent, which Slicer
    may crop to the segments' bounding box: ``ijk_to_ras`` says where it lies); ``segments``:
    ``[(value, name, (r, g, b))]``. Segments on separate layers that overlap cannot be one label
    array: an OutputError says so.
    """
    import slicerio

    path = Path(path)
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # pynrrd raises its own errors for malformed headers
        raise OutputError(f"cannot read the segmentation {path}: {exc}") from exc
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:  # one layer per segment group: merge, refusing overlaps
        if np.count_nonzero(voxels, axis=3).max(initial=0) > 1:
            raise OutputError(f"{path}: its segments overlap; read it as separate layers")
        voxels = voxels.sum(axis=3)
    labels = voxels.transpose(2, 1, 0)  # [i, j, k] -> (K, J, I)
    ijk_to_ras = flip_lps_ras(np.asarray(segmentation["ijkToLPS"], dtype=np.float64))
    segments = [
        (int(s["labelValue"]), str(s["name"]), tuple(float(c) for c in s.get("color", (1, 1, 1))))
        for s in segmentation["segments"]
    ]
    return labels, segments, ijk_to_ras


# ---------------------------------------------------------------------------------------------


def _full_suffix(name: str) -> str:
    """The extension including known double ones ('.nii.gz', '.seg.nrrd'): writers need it all."""
    for double in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(double) and len(name) > len(double):
            return name[-len(double) :]
    return os.path.splitext(name)[1]


def _existing_ancestor(folder: Path) -> Path:
    folder = folder if str(folder) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _geometry(volume_or_geometry) -> np.ndarray:
    if isinstance(volume_or_geometry, Volume):
        return volume_or_geometry.ijk_to_ras
    matrix = np.asarray(volume_or_geometry, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise OutputError("the output geometry must be a Volume or a finite 4x4 IJK-to-RAS matrix")
    return matrix


def _label_array(labels: np.ndarray, volume_or_geometry) -> np.ndarray:
    """Labels as the smallest unsigned integer array that holds them, after checking the grid."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise OutputError(f"labels must be a 3D (K, J, I) array, got shape {labels.shape}")
    if isinstance(volume_or_geometry, Volume) and labels.shape != volume_or_geometry.shape:
        raise OutputError(
            f"labels shape {labels.shape} does not match the volume grid {volume_or_geometry.shape}"
        )
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.mod(labels, 1) == 0):
            raise OutputError(f"labels must be integers, got {labels.dtype} with fractional values")
    lo = labels.min() if labels.size else 0
    hi = labels.max() if labels.size else 0
    if lo < 0:
        raise OutputError(f"labels must be >= 0 (0 = background), found {lo}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dtype).max:
            return labels.astype(dtype, copy=False)
    raise OutputError(f"label value {hi} is too large (at most {np.iinfo(np.uint32).max})")


def _write_nifti(path: Path, data: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data.transpose(2, 1, 0), ijk_to_ras)  # nibabel indexes [i, j, k]
    image.set_data_dtype(data.dtype)
    # sform holds the matrix exactly (float32); qform its rigid part, for readers that prefer it
    image.set_sform(ijk_to_ras, code=1)
    image.set_qform(ijk_to_ras, code=1)
    image.header.set_xyzt_units("mm")
    image.header["scl_slope"] = 1.0
    image.header["scl_inter"] = 0.0
    nib.save(image, str(path))


def _write_nrrd(path: Path, data: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    import nrrd

    ijk_to_lps = flip_lps_ras(ijk_to_ras)
    header = {
        "space": "left-posterior-superior",
        "space directions": ijk_to_lps[:3, :3].T,  # row n = the LPS step along array index n
        "space origin": ijk_to_lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), data.transpose(2, 1, 0), header, index_order="F")


def _segment_entries(segments: Sequence[tuple], data: np.ndarray) -> list:
    entries = []
    values_seen: set = set()
    names_seen: set = set()
    for number, segment in enumerate(segments):
        try:
            value, name, color = segment
            value = int(value)
            color = tuple(float(c) for c in color)
        except (TypeError, ValueError) as error:
            raise OutputError(
                f"segment {number}: expected (value, name, (r, g, b)), got {segment!r}"
            ) from error
        name = str(name)
        if value <= 0:
            raise OutputError(f"segment {name!r}: label value must be > 0, got {value}")
        if value in values_seen:
            raise OutputError(f"label value {value} is given to more than one segment")
        if not name.strip() or "\n" in name or "\r" in name:
            raise OutputError(f"segment {number}: invalid name {name!r} (empty or several lines)")
        if name in names_seen:
            raise OutputError(f"segment name {name!r} is used twice")
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise OutputError(f"segment {name!r}: colour must be (r, g, b) in 0..1, got {color}")
        values_seen.add(value)
        names_seen.add(name)
        entries.append(
            {
                "id": f"Segment_{value}",
                "labelValue": value,
                "layer": 0,
                "name": name,
                "color": list(color),
                "nameAutoGenerated": False,
                "colorAutoGenerated": False,
            }
        )
    present = set(np.unique(data).tolist()) - {0}
    missing = sorted(present - values_seen)
    if missing:
        raise OutputError(f"label values {missing} have no segment (value, name, colour)")
    return entries
