"""Result files: JSON and CSV writers and PNG plots (matplotlib, Agg backend).

Writers are atomic (a temporary file in the target folder, then `os.replace`), so an interrupted
run never leaves a half-written result. Non-finite numbers (NaN, +-inf, e.g. the ``inf`` HD95 of a
missed structure, see `SlicerSAM.metrics`) become ``null`` in JSON and an empty cell in CSV; numpy
scalars and arrays become plain numbers and lists.

matplotlib is imported inside the plotting functions with the non-interactive Agg backend, so
importing this module costs nothing and works headless (servers, CI, Slicer's Python).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from SlicerSAM.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = [
    "to_jsonable",
    "write_json",
    "write_csv",
    "plot_structure_dice",
    "plot_slice_dice",
    "overlay_montage",
]


# ----------------------------------------------------------------------------------------------
# Writers


def to_jsonable(value: Any) -> Any:
    """`value` as plain JSON types: NaN/inf -> None, numpy -> Python, tuples/sets -> lists.

    Dict keys become strings (JSON object keys are strings; ``{3: ...}`` reads back as ``"3"``),
    paths become strings, dataclass instances become dicts.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):  # complex, datetime and other numpy scalars
        return to_jsonable(value.item())
    if isinstance(value, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def _json_key(key: Any) -> str:
    if isinstance(key, (np.generic,)):
        key = key.item()
    return key if isinstance(key, str) else str(key)


@functools.lru_cache(maxsize=1)
def _umask_mode() -> int:
    """0o666 minus the process umask: what open() would give a new file (mkstemp gives 0o600).

    Read once: os.umask can only be read by setting it, which is process-wide.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_text(path: str | Path, text: str, overwrite: bool) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc}") from exc
        raise
    return path


def write_json(path: str | Path, data: Any, *, overwrite: bool = True, indent: int = 2) -> Path:
    """Write `data` as JSON, atomically; NaN/inf become ``null``, numpy values plain numbers.

    Args:
        path: output file; missing parent folders are created.
        data: dicts, lists, numbers, strings, numpy scalars/arrays, paths, dataclasses.
        overwrite: replace an existing file (False raises `OutputError` instead).
        indent: JSON indentation.

    Returns:
        The path written.
    """
    # allow_nan=False: a non-finite number that escaped to_jsonable is a bug, not "NaN" in a file
    text = json.dumps(to_jsonable(data), indent=indent, allow_nan=False) + "\n"
    path = _atomic_write_text(path, text, overwrite)
    logger.info("wrote %s", path)
    return path


def _csv_cell(value: Any) -> Any:
    value = to_jsonable(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def write_csv(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a table (e.g. one row per structure) as CSV, atomically.

    Args:
        path: output file; missing parent folders are created.
        rows: one mapping per row.
        columns: column order; default: the union of the rows' keys in first-seen order.
            A row lacking a column gets an empty cell.
        overwrite: replace an existing file (False raises `OutputError` instead).

    Returns:
        The path written. NaN/inf/None are written as empty cells, lists and dicts as JSON text.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    path = _atomic_write_text(path, buffer.getvalue(), overwrite)
    logger.info("wrote %s (%d rows)", path, len(rows))
    return path


# ----------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or an error naming the package to install."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
        raise OutputError("plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save and close a figure (atomically: temp PNG in the same folder, then os.replace)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot_structure_dice(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    metric: str = "dice",
    title: str | None = None,
) -> Path:
    """Horizontal bar chart of one metric per structure, sorted best first.

    Args:
        results: structure name -> metrics dict (as `SlicerSAM.metrics.evaluate_labels` returns).
        path: output PNG.
        metric: the key to plot (``"dice"``, ``"iou"``, ``"nsd"``; values in [0, 1]).
        title: figure title; default names the metric and its mean.

    Returns:
        The path written. Structures whose value is missing or not finite are listed as "n/a".
    """
    plt = _pyplot()
    items = [(str(name), _finite(m.get(metric))) for name, m in results.items()]
    items.sort(key=lambda nv: (nv[1] is None, -(nv[1] or 0.0), nv[0]))
    values = [v for _, v in items if v is not None]
    mean = float(np.mean(values)) if values else float("nan")
    height = max(2.5, 0.35 * len(items) + 1.3)
    fig, ax = plt.subplots(figsize=(7.0, height))
    # top to bottom = best to worst
    y = np.arange(len(items))[::-1]
    bars = [v if v is not None else 0.0 for _, v in items]
    colors = [plt.cm.RdYlGn(v) if v is not None else "lightgray" for _, v in items]
    ax.barh(y, bars, color=colors, edgecolor="black", linewidth=0.4)
    for yi, (_, v) in zip(y, items):
        ax.text(
            (v if v is not None else 0.0) + 0.01,
            yi,
            f"{v:.3f}" if v is not None else "n/a",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y)
    ax.set_yticklabels([name for name, _ in items], fontsize=8)
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel(metric)
    if values:
        ax.axvline(mean, color="tab:blue", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"{metric} per structure (n={len(items)}, mean {mean:.3f})")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_slice_dice(
    per_slice: Mapping[str, Mapping[int, float]],
    path: str | Path,
    axis_name: str = "slice",
    *,
    title: str | None = None,
) -> Path:
    """Dice against slice index, one line per structure.

    Args:
        per_slice: structure name -> {slice index: Dice} (`SlicerSAM.metrics.per_slice_dice`);
            JSON-loaded string keys are accepted.
        path: output PNG.
        axis_name: what the indices are, for the x label (e.g. ``"axial slice (k)"``).
        title: figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    for name, curve in per_slice.items():
        points = sorted((int(k), _finite(v)) for k, v in curve.items())
        points = [(k, v) for k, v in points if v is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=str(name))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(axis_name)
    ax.set_ylabel("Dice")
    ax.set_title(title or f"Dice per slice along {axis_name}")
    ax.grid(alpha=0.3)
    if per_slice:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def _as_slices(data, indices: Sequence[int] | None) -> list[np.ndarray]:
    """2D slices from a (K, J, I) array (taking `indices` along axis 0) or a list of 2D arrays."""
    if isinstance(data, np.ndarray) and data.ndim == 3:
        if indices is None:
            raise ValueError("slices must be chosen before taking them from a 3D array")
        return [np.asarray(data[int(k)]) for k in indices]
    slices = [np.asarray(s) for s in data]
    if any(s.ndim != 2 for s in slices):
        raise ValueError("expected a (K, J, I) array or a list of 2D slices")
    return slices if indices is None else [slices[int(k)] for k in indices]


def _pick_slices(reference, predicted, count: int, n: int) -> list[int]:
    """`count` indices evenly spread over the slices that show a structure (or over all)."""
    shown = []
    for k in range(n):
        ref = np.asarray(reference[k]) if reference is not None else None
        pred = np.asarray(predicted[k]) if predicted is not None else None
        if (ref is not None and ref.any()) or (pred is not None and pred.any()):
            shown.append(k)
    candidates = shown or list(range(n))
    if len(candidates) <= count:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, count + 2)[1:-1]  # skip the thin end slices
    return sorted({candidates[int(round(p))] for p in picks})


def _draw_contours(ax, labels2d: np.ndarray, color, linestyle: str) -> bool:
    """Contours of every label of a 2D label map; True if anything was drawn."""
    drawn = False
    for value in np.unique(labels2d):
        if value == 0:
            continue
        mask = (labels2d == value).astype(np.float32)
        # pad so structures touching the edge still get a closed contour
        padded = np.pad(mask, 1)
        rows, cols = np.arange(-1, mask.shape[0] + 1), np.arange(-1, mask.shape[1] + 1)
        ax.contour(
            cols, rows, padded, levels=[0.5], colors=[color], linestyles=linestyle, linewidths=1.2
        )
        drawn = True
    return drawn


def overlay_montage(
    image,
    reference,
    predicted,
    path: str | Path,
    slices: Sequence[int] | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    *,
    max_slices: int = 6,
    title: str | None = None,
    aspect: float = 1.0,
    slice_labels: Sequence[str] | None = None,
) -> Path:
    """A montage of a few slices with reference contours (green, solid) and prediction contours
    (red, dashed).

    Slices are drawn as stored: for a (K, J, I) array, slice k is shown with rows = J and
    columns = I. To show a view oriented as Slicer shows it, pass lists of 2D grids taken with
    `SlicePlane.grid` instead.

    Args:
        image: (K, J, I) array or a list of 2D slices (intensities, e.g. HU).
        reference: reference label map(s) of the same layout, or None.
        predicted: predicted label map(s) of the same layout, or None.
        path: output PNG.
        slices: indices to show (along axis 0, or into the lists); default: up to `max_slices`
            evenly spread over the slices where either label map has foreground.
        window: (low, high) display window in image units (default: abdomen, 40 / 400 HU).
        max_slices: the most slices chosen automatically.
        title: figure title; default says what the contours are.
        aspect: pixel height / width (row spacing / column spacing) for anisotropic grids.
        slice_labels: caption per shown slice; default ``"slice <index>"``.

    Returns:
        The path written.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    n = image.shape[0] if isinstance(image, np.ndarray) and image.ndim == 3 else len(image)
    if slices is None:
        slices = _pick_slices(reference, predicted, max_slices, n)
    slices = [int(k) for k in slices]
    if not slices:
        raise ValueError("no slices to show")
    images = _as_slices(image, slices)
    refs = _as_slices(reference, slices) if reference is not None else [None] * len(slices)
    preds = _as_slices(predicted, slices) if predicted is not None else [None] * len(slices)
    lo, hi = float(window[0]), float(window[1])

    ncols = min(3, len(slices))
    nrows = int(math.ceil(len(slices) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.6 * nrows + 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n_shown, (ax, img, ref, pred) in enumerate(zip(axes.ravel(), images, refs, preds)):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if ref is not None:
            _draw_contours(ax, np.asarray(ref), "lime", "solid")
        if pred is not None:
            _draw_contours(ax, np.asarray(pred), "red", "dashed")
        caption = slice_labels[n_shown] if slice_labels is not None else f"slice {slices[n_shown]}"
        ax.set_title(caption, fontsize=9)
    handles = [
        Line2D([0], [0], color="lime", linestyle="solid", linewidth=2, label="reference"),
        Line2D([0], [0], color="red", linestyle="dashed", linewidth=2, label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(
        title or "Reference (green, solid) vs prediction (red, dashed) contours", fontsize=11
    )
    # explicit spacing: tight_layout let fixed-aspect rows overlap and hide the lower captions
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.08, wspace=0.05, hspace=0.18)
    return _save(fig, path)
