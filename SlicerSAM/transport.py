"""What travels between the inference server and its clients: masks, volumes, prompts. No pickles.

- **Masks** (``{slice index: (rows, cols) bool}`` on one plane's slice grids) travel as JSON: per
  slice the bounding box of its mask and the bits inside it, packed (``numpy.packbits``, 8 pixels
  a byte) and base64-encoded. A kidney on 20 slices of 512 x 512 is a few kilobytes.
- **Volumes** travel as a file's bytes (NIfTI, NRRD: read by the engine's reader) or as raw
  array bytes with a small JSON header (dtype, shape (K, J, I), the 4x4 IJK-to-RAS matrix) that
  the receiver checks before it allocates anything.
- **Prompts** travel in the prompt-file JSON (docs/prompts.md): points, a box, a frame.
"""

from __future__ import annotations

import base64
import json
from typing import Dict, Mapping, Tuple

import numpy as np

from SlicerSAM.errors import PromptError, VolumeError

__all__ = [
    "ARRAY_DTYPES",
    "decode_array_header",
    "decode_masks",
    "encode_array",
    "encode_masks",
]

# the voxel types an array upload may have (what scanners and Slicer volumes hold)
ARRAY_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def encode_masks(masks: Mapping[int, np.ndarray]) -> dict:
    """``{"slices": {index: {"bbox": [r0, c0, r1, c1] (inclusive), "bits": base64}},
    "grid": [rows, cols]}`` for ``masks`` {index: (rows, cols) bool}; empty masks are left out."""
    out: Dict[str, dict] = {}
    grid = None
    for index, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        grid = list(mask.shape)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        bits = np.packbits(mask[r0 : r1 + 1, c0 : c1 + 1].ravel())
        out[str(int(index))] = {
            "bbox": [r0, c0, r1, c1],
            "bits": base64.b64encode(bits.tobytes()).decode("ascii"),
        }
    return {"grid": grid, "slices": out}


def decode_masks(data: Mapping) -> Dict[int, np.ndarray]:
    """The inverse of :func:`encode_masks`: {index: (rows, cols) bool}."""
    try:
        rows, cols = (int(n) for n in data["grid"]) if data.get("grid") else (0, 0)
        out = {}
        for key, entry in data["slices"].items():
            r0, c0, r1, c1 = (int(v) for v in entry["bbox"])
            h, w = r1 - r0 + 1, c1 - c0 + 1
            if not (0 <= r0 <= r1 < rows and 0 <= c0 <= c1 < cols):
                raise ValueError(f"slice {key}: box {entry['bbox']} outside the grid")
            bits = np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8)
            block = np.unpackbits(bits, count=h * w).astype(bool).reshape(h, w)
            mask = np.zeros((rows, cols), dtype=bool)
            mask[r0 : r1 + 1, c0 : c1 + 1] = block
            out[int(key)] = mask
        return out
    except (KeyError, TypeError, ValueError) as exc:
        raise PromptError(f"malformed masks: {exc}") from exc


def encode_array(array: np.ndarray, ijk_to_ras: np.ndarray) -> Tuple[dict, bytes]:
    """(header, bytes) of a (K, J, I) voxel array and its 4x4 IJK-to-RAS matrix."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        array = array.astype(np.float32)
    header = {
        "dtype": array.dtype.newbyteorder("<").str,
        "shape": [int(n) for n in array.shape],
        "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64).reshape(16).tolist(),
    }
    return header, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_array_header(
    text: str, max_voxels: int
) -> Tuple[np.dtype, Tuple[int, int, int], np.ndarray]:
    """(dtype, shape (K, J, I), 4x4 IJK-to-RAS) from an array upload's JSON header, checked
    (a known dtype, three positive sizes within ``max_voxels``, a finite invertible matrix)
    before any voxel is read."""
    try:
        header = json.loads(text)
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(n) for n in header["shape"])
        matrix = np.asarray(header["ijk_to_ras"], dtype=np.float64).reshape(4, 4)
    except (KeyError, TypeError, ValueError) as exc:
        raise VolumeError(f"malformed array header: {exc}") from exc
    if dtype.newbyteorder("=").name not in ARRAY_DTYPES:
        raise VolumeError(f"voxel type {dtype} is not one of {', '.join(ARRAY_DTYPES)}")
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"a volume is (K, J, I) with three sizes >= 1, got {list(shape)}")
    voxels = int(np.prod(shape))
    if voxels > max_voxels:
        raise VolumeError(f"{voxels} voxels is more than this server takes ({max_voxels})")
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise VolumeError("the IJK-to-RAS matrix must be finite and invertible")
    return dtype, shape, matrix
