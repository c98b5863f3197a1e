"""Slice planes: 2D views of a volume oriented as 3D Slicer's slice views show them.

`plane_for(volume, orientation)` picks, for the slice normal, the image rows and the image columns,
the array axis whose direction is closest to the view's anatomical axis, and whether to flip it, so
that a slice "grid" (the voxels of one slice) looks as in Slicer (vtkMRMLSliceNode conventions):

=========  ===========================  ==========================
view       rows (top -> bottom)         columns (left -> right)
=========  ===========================  ==========================
axial      anterior -> posterior        patient right -> left
coronal    superior -> inferior         patient right -> left
sagittal   superior -> inferior         anterior -> posterior
=========  ===========================  ==========================

The slice index is the array index along ``plane.axis`` (never flipped). The "model image" is the
grid resampled to square pixels of size min(row spacing, column spacing) (the grid itself when the
spacings agree within 1 %); pixel centres are at integers, and the image and the grid cover the same
extent (edges at -0.5 and n - 0.5). SAM's (x, y) = (column, row) of the model image: the swap from
(row, column) happens only in `SlicePlane.voxel_to_xy` / `SlicePlane.xy_to_voxel`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

ORIENTATIONS = ("axial", "coronal", "sagittal")

# In-plane spacings closer than this (relative) count as square: the model image is the grid.
SQUARE_TOLERANCE = 0.01

# RAS unit vectors of the patient axes: index 0 = right-left (x), 1 = anterior-posterior (y),
# 2 = superior-inferior (z).
_RL, _AP, _SI = 0, 1, 2

# orientation -> (normal axis, (row patient axis, row target sign), (col patient axis, col sign)),
# the target being the RAS direction in which the row/column index grows (down / to the right).
_VIEWS = {
    "axial": (_SI, (_AP, -1.0), (_RL, -1.0)),  # rows -> posterior (-y), columns -> left (-x)
    "coronal": (_AP, (_SI, -1.0), (_RL, -1.0)),  # rows -> inferior (-z), columns -> left (-x)
    "sagittal": (_RL, (_SI, -1.0), (_AP, -1.0)),  # rows -> inferior (-z), columns -> posterior
}


@dataclass(frozen=True)
class SlicePlane:
    """How one volume is cut into oriented 2D slices and resampled to square-pixel model images.

    Attributes:
        orientation: "axial" | "coronal" | "sagittal".
        axis: array axis held fixed (0 = K, 1 = J, 2 = I); slice index = array index along it.
        row_axis, col_axis: array axes running down the rows / along the columns of a grid.
        row_flip, col_flip: whether the grid reverses that array axis.
        num_slices: number of slices (length of `axis`).
        grid_shape: (rows, cols) of a grid (one slice on the voxel grid).
        image_shape: (H, W) of the square-pixel model image.
        grid_spacing: mm between grid rows and between grid columns.
    """

    orientation: str
    axis: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    num_slices: int
    grid_shape: tuple[int, int]
    image_shape: tuple[int, int]
    grid_spacing: tuple[float, float]

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """(K, J, I) of the volume this plane cuts."""
        shape = [0, 0, 0]
        shape[self.axis] = self.num_slices
        shape[self.row_axis] = self.grid_shape[0]
        shape[self.col_axis] = self.grid_shape[1]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def is_resampled(self) -> bool:
        """True when the model image differs from the grid (non-square in-plane spacing)."""
        return self.image_shape != self.grid_shape

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """mm per model-image pixel (row, col): square up to rounding of the image size."""
        return (
            self.grid_spacing[0] * self.grid_shape[0] / self.image_shape[0],
            self.grid_spacing[1] * self.grid_shape[1] / self.image_shape[1],
        )

    # -- grids --------------------------------------------------------------------------------

    def grid(self, array3d: np.ndarray, index: int) -> np.ndarray:
        """Slice `index` of a (K, J, I) array as an oriented (rows, cols) grid: a view, no copy."""
        array3d = np.asarray(array3d)
        if array3d.shape != self.volume_shape:
            raise ValueError(
                f"array shape {array3d.shape} is not the plane's volume shape {self.volume_shape}"
            )
        index = self._check_index(index)
        cut: list = [slice(None)] * 3
        cut[self.axis] = index
        view = array3d[tuple(cut)]  # remaining axes in increasing order
        if self.row_axis > self.col_axis:
            view = view.T
        if self.row_flip:
            view = view[::-1, :]
        if self.col_flip:
            view = view[:, ::-1]
        return view

    def set_grid(self, array3d: np.ndarray, index: int, grid2d: np.ndarray) -> None:
        """Write an oriented (rows, cols) grid back into slice `index` of `array3d`, in place."""
        grid2d = np.asarray(grid2d)
        if grid2d.shape != self.grid_shape:
            raise ValueError(f"grid shape {grid2d.shape} is not the plane's {self.grid_shape}")
        if not isinstance(array3d, np.ndarray):
            raise TypeError("set_grid writes in place: array3d must be a numpy array")
        self.grid(array3d, index)[...] = grid2d

    def stack(self, grids: dict, dtype=None) -> np.ndarray:
        """A (K, J, I) array holding `grids` ({slice index: (rows, cols)}); zero elsewhere.

        `dtype` defaults to the grids' common type (bool when there are none).
        """
        if dtype is None:
            dtype = np.result_type(*grids.values()) if grids else np.bool_
        out = np.zeros(self.volume_shape, dtype=dtype)
        for index, grid2d in grids.items():
            self.set_grid(out, index, grid2d)
        return out

    # -- model images -------------------------------------------------------------------------

    def to_image(self, grid2d: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a (rows, cols) grid to the (H, W) square-pixel model image.

        Returns `grid2d` itself when the plane is not resampled. `order` 0 is nearest neighbour
        (exact for labels of any dtype), 1 linear, 3 cubic; values keep their dtype and range
        (integers are rounded and clipped, bool is thresholded at 0.5).
        """
        return self._resample(np.asarray(grid2d), self.grid_shape, self.image_shape, order)

    def to_grid(self, image2d: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample an (H, W) model image (or mask) back onto exactly the (rows, cols) grid."""
        return self._resample(np.asarray(image2d), self.image_shape, self.grid_shape, order)

    # -- coordinates --------------------------------------------------------------------------

    def voxel_to_xy(self, kji: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel coordinates (N, 3) (k, j, i) -> (slice indices (N,), model-image (x, y) (N, 2)).

        Continuous: the slice index is not rounded; callers decide which slice a point is on.
        """
        kji = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        rows, cols = self.grid_shape
        r = kji[:, self.row_axis]
        c = kji[:, self.col_axis]
        if self.row_flip:
            r = (rows - 1) - r
        if self.col_flip:
            c = (cols - 1) - c
        y = (r + 0.5) * (self.image_shape[0] / rows) - 0.5
        x = (c + 0.5) * (self.image_shape[1] / cols) - 0.5
        # the (row, col) -> (x, y) swap: SAM's x is the column, y the row
        return kji[:, self.axis].copy(), np.stack([x, y], axis=1)

    def xy_to_voxel(self, index, xy: np.ndarray) -> np.ndarray:
        """Slice index (scalar or (N,)) and model-image (x, y) (N, 2) -> (k, j, i) (N, 3) float."""
        xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        rows, cols = self.grid_shape
        # the (x, y) -> (row, col) swap: SAM's x is the column, y the row
        x, y = xy[:, 0], xy[:, 1]
        r = (y + 0.5) * (rows / self.image_shape[0]) - 0.5
        c = (x + 0.5) * (cols / self.image_shape[1]) - 0.5
        if self.row_flip:
            r = (rows - 1) - r
        if self.col_flip:
            c = (cols - 1) - c
        kji = np.empty((xy.shape[0], 3), dtype=np.float64)
        kji[:, self.axis] = np.broadcast_to(np.asarray(index, dtype=np.float64), (xy.shape[0],))
        kji[:, self.row_axis] = r
        kji[:, self.col_axis] = c
        return kji

    # -- helpers ------------------------------------------------------------------------------

    def _check_index(self, index) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"slice index must be an integer, got {index!r}")
        if not 0 <= index < self.num_slices:
            raise IndexError(
                f"slice index {index} is outside 0..{self.num_slices - 1} ({self.orientation})"
            )
        return int(index)

    def _resample(self, data: np.ndarray, in_shape, out_shape, order: int) -> np.ndarray:
        if data.shape != tuple(in_shape):
            raise ValueError(f"expected a {tuple(in_shape)} array, got {data.shape}")
        if tuple(in_shape) == tuple(out_shape):
            return data
        return resample_2d(data, out_shape, order)


def resample_2d(data: np.ndarray, out_shape, order: int = 1) -> np.ndarray:
    """Resample a 2D array to `out_shape` covering the same extent (pixel centres at (n + 0.5) * s).

    Output pixel y samples input row ``(y + 0.5) * in / out - 0.5`` (edges replicated); order 0 is
    an exact nearest-neighbour gather, higher orders use scipy.ndimage with the dtype kept.
    """
    out_shape = tuple(int(n) for n in out_shape)
    scale = [n_in / n_out for n_in, n_out in zip(data.shape, out_shape)]
    if order == 0:
        rows = _nearest(out_shape[0], scale[0], data.shape[0])
        cols = _nearest(out_shape[1], scale[1], data.shape[1])
        return data[np.ix_(rows, cols)]
    from scipy import ndimage

    work = np.float64 if data.dtype == np.float64 else np.float32
    result = ndimage.affine_transform(
        data.astype(work, copy=False),
        matrix=np.array(scale),  # diagonal: a separable zoom
        offset=[0.5 * s - 0.5 for s in scale],
        output_shape=out_shape,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )
    if data.dtype == np.bool_:
        return result > 0.5
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(result), info.min, info.max).astype(data.dtype)
    return result.astype(data.dtype, copy=False)


def _nearest(n_out: int, scale: float, n_in: int) -> np.ndarray:
    """Input index nearest to each output pixel centre (floor((o + 0.5) * scale))."""
    index = np.floor((np.arange(n_out) + 0.5) * scale).astype(np.intp)
    return np.clip(index, 0, n_in - 1)


def patient_axes(ijk_to_ras: np.ndarray) -> tuple[int, int, int]:
    """Array axes (0 = K, 1 = J, 2 = I) closest to the right-left, anterior-posterior and
    superior-inferior directions: the permutation maximising the summed |cosine| (ties go to the
    first permutation in lexicographic order, so oblique volumes get one consistent assignment)."""
    linear = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    directions = (linear / np.linalg.norm(linear, axis=0))[:, ::-1]  # column a = array axis a
    cosines = np.abs(directions)  # [patient axis, array axis]
    best: Optional[tuple] = None
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(cosines[p, perm[p]] for p in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    return best  # type: ignore[return-value]


def plane_for(volume, orientation: str = "axial") -> SlicePlane:
    """The `SlicePlane` of `volume` (a `SlicerSAM.volume.Volume`) for a Slicer view orientation."""
    key = str(orientation).strip().lower()
    if key not in _VIEWS:
        raise ValueError(
            f"unknown orientation {orientation!r}; use one of {', '.join(ORIENTATIONS)}"
        )
    linear = volume.ijk_to_ras[:3, :3]
    directions = (linear / np.linalg.norm(linear, axis=0))[:, ::-1]  # column a = array axis a
    axis_of = patient_axes(volume.ijk_to_ras)
    normal, (row_patient, row_sign), (col_patient, col_sign) = _VIEWS[key]
    axis = axis_of[normal]
    row_axis = axis_of[row_patient]
    col_axis = axis_of[col_patient]
    row_flip = bool(directions[row_patient, row_axis] * row_sign < 0)
    col_flip = bool(directions[col_patient, col_axis] * col_sign < 0)
    shape = volume.shape
    spacing = volume.spacing
    grid_shape = (int(shape[row_axis]), int(shape[col_axis]))
    grid_spacing = (float(spacing[row_axis]), float(spacing[col_axis]))
    return SlicePlane(
        orientation=key,
        axis=int(axis),
        row_axis=int(row_axis),
        col_axis=int(col_axis),
        row_flip=row_flip,
        col_flip=col_flip,
        num_slices=int(shape[axis]),
        grid_shape=grid_shape,
        image_shape=_image_shape(grid_shape, grid_spacing),
        grid_spacing=grid_spacing,
    )


def _image_shape(grid_shape: tuple, grid_spacing: tuple) -> tuple[int, int]:
    row_mm, col_mm = grid_spacing
    if abs(row_mm - col_mm) <= SQUARE_TOLERANCE * max(row_mm, col_mm):
        return tuple(grid_shape)  # type: ignore[return-value]
    pixel = min(row_mm, col_mm)
    return (
        max(1, int(round(grid_shape[0] * row_mm / pixel))),
        max(1, int(round(grid_shape[1] * col_mm / pixel))),
    )
