"""Benchmarks: run a prompt protocol over a volume with reference labels, or over a dataset.

:func:`run_benchmark` is the single entry point for one volume (``python -m SlicerSAM benchmark``
and the demo call it): simulated prompts from the reference (:mod:`SlicerSAM.protocols`,
docs/protocols.md) for every structure with at least ``min_voxels`` voxels, one
:class:`~SlicerSAM.segmenter.Segmenter` (one embedding cache) shared by all structures so that
each slice is encoded at most once, per-structure metrics and timings.

:func:`run_dataset` runs every case of an nnU-Net / Medical Segmentation Decathlon folder
(``imagesTr/<case>_0000.nii.gz`` or ``imagesTr/<case>.nii.gz``, ``labelsTr/<case>.nii.gz``,
optional ``dataset.json`` for label names) in worker processes, writes one JSON per case
atomically (``out_dir/cases/<case>.json``; a finished case is skipped when run again, so an
interrupted run resumes) and aggregates per structure (mean, std, n) into
``out_dir/summary.json``.

Metrics are computed per structure on that structure's own predicted mask (structures predicted
independently may overlap; the overlap does not count against either). The predicted label map
(``result["prediction"]``, (K, J, I) uint16) paints structures largest first, so small
structures stay visible where they overlap a large one.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from SlicerSAM.errors import Cancelled, SlicerSAMError

logger = logging.getLogger(__name__)

__all__ = [
    "is_leak",
    "peak_rss_mb",
    "read_label_names",
    "run_benchmark",
    "slices_beyond",
    "run_dataset",
    "write_benchmark_outputs",
    "list_cases",
]

METRICS = ("dice", "iou", "hd95_mm", "nsd")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (0.0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return round(peak / (2**20 if sys.platform == "darwin" else 1024.0), 1)


def _noop_progress(done: int, total: int, message: str = "") -> None:
    pass


def _never() -> bool:
    return False


def run_benchmark(
    image,
    reference,
    protocol: str,
    label_names: Optional[Mapping[int, str]] = None,
    model="litemedsam",
    device="auto",
    orientation: str = "axial",
    intensity=None,
    min_voxels: int = 200,
    jitter: float = 0.0,
    seed: int = 0,
    progress: Optional[Callable[[int, int, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    *,
    checkpoint=None,
    strategy=None,
    stop=None,
    cache=None,
    segmenter=None,
    tolerance_mm: float = 2.0,
    structures: Optional[Sequence] = None,
    point_prompts: str = "auto",
) -> dict:
    """Run one protocol for every structure of ``reference`` and evaluate it.

    Args:
        image: the :class:`~SlicerSAM.volume.Volume` to segment.
        reference: the reference label :class:`~SlicerSAM.volume.Volume` on the same grid.
        protocol: a name of :data:`SlicerSAM.protocols.PROTOCOLS` or an alias
            (docs/protocols.md).
        label_names: {label value: name}; None names every present label ``label_<value>``.
        model: a model name (``sam_core.zoo``) or a loaded ``Sam``.
        device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps".
        orientation: "axial" | "coronal" | "sagittal".
        intensity: an :class:`~SlicerSAM.intensity.IntensityMapping`; None: window L40/W400.
        min_voxels: structures with fewer reference voxels are skipped.
        jitter: box jitter in model-image pixels (uniform, seeded by ``seed`` and the label).
        seed: the jitter's seed.
        progress: ``progress(done, total, message)`` over structures.
        cancel: ``cancel() -> bool``; True raises :class:`~SlicerSAM.errors.Cancelled`.
        checkpoint: checkpoint file when ``model`` is a name.
        strategy, stop: propagation strategy and stop rules (None: the protocol's defaults).
        cache: an :class:`~SlicerSAM.cache.EmbeddingCache` to share across calls.
        segmenter: a ready segmenter for ``image`` (overrides model/device/intensity/cache).
        tolerance_mm: NSD tolerance.
        structures: label values to run (default: all with at least ``min_voxels`` voxels).
        point_prompts: what clicks become ("auto", "box", "model"; see
            :class:`~SlicerSAM.segmenter.Segmenter`); ignored with ``segmenter``.

    Returns:
        {"model", "device", "protocol", "axis", "window", "point_prompts", "jitter", "seed",
        "min_voxels",
        "structures": {name: {"label", "dice", "iou", "hd95_mm", "nsd", "voxels_reference",
        "voxels_predicted", "slices_reference", "slices_predicted", "slices_beyond", "leak",
        "dice_before" (click-correct: before the correction)}}, "mean_dice", "mean_iou",
        "leaks" (structures that leak: :func:`is_leak`), "mean_dice_before" (click-correct),
        "timing": {"slices_encoded", "encode_ms_per_slice", "decode_ms_per_prompt", "wall_s",
        "peak_rss_mb"}, "prediction": (K, J, I) uint16 label map}. Means are over structures
        (NaN-free; None when no structure qualifies).
    """
    from SlicerSAM import protocols as P
    from SlicerSAM.intensity import IntensityMapping
    from SlicerSAM.metrics import dice, hd95, iou, surface_dice

    t0 = time.perf_counter()
    progress = progress or _noop_progress
    cancel = cancel or _never
    proto = P.parse_protocol(protocol)
    if intensity is None:
        intensity = IntensityMapping(level=40.0, width=400.0)
    ref = np.asarray(reference.array)
    if tuple(ref.shape) != tuple(image.shape):
        raise SlicerSAMError(
            f"reference grid {tuple(ref.shape)} differs from the image's {tuple(image.shape)}"
        )
    if not np.issubdtype(ref.dtype, np.integer):
        if not np.all(np.equal(np.mod(ref, 1), 0)):
            raise SlicerSAMError("the reference must be a label map of integer values")
        ref = ref.astype(np.int64)
    chosen = P.select_structures(ref, label_names, min_voxels)
    if structures is not None:
        wanted = {int(v) for v in structures}
        chosen = [c for c in chosen if c[0] in wanted]
    if segmenter is None:
        from SlicerSAM.segmenter import Segmenter

        segmenter = Segmenter(
            image,
            model,
            orientation=orientation,
            intensity=intensity,
            device=device,
            cache=cache,
            checkpoint=checkpoint,
            point_prompts=point_prompts,
        )
    plane = segmenter.plane
    spacing = tuple(float(s) for s in image.spacing)
    stats_before = getattr(segmenter, "stats", None)

    rows: Dict[str, dict] = {}
    masks: Dict[int, np.ndarray] = {}
    total = max(len(chosen), 1)
    progress(0, total, "")
    for n, (label, name, voxels) in enumerate(chosen):
        if cancel():
            raise Cancelled("benchmark cancelled")
        ref_mask = ref == label
        rng = np.random.default_rng([int(seed), int(label)]) if jitter else None
        work = P.run_workflow(
            segmenter,
            ref_mask,
            proto,
            jitter=jitter,
            rng=rng,
            strategy=strategy,
            stop=stop,
            cancel=cancel,
        )
        pred = plane.stack(work.masks, dtype=bool)
        masks[label] = pred
        axis = plane.axis
        other = tuple(a for a in range(3) if a != axis)
        beyond = slices_beyond(pred, ref_mask, axis)
        rows[name] = {
            "label": int(label),
            "dice": dice(pred, ref_mask),
            "iou": iou(pred, ref_mask),
            "hd95_mm": hd95(pred, ref_mask, spacing),
            "nsd": surface_dice(pred, ref_mask, spacing, tolerance_mm),
            "voxels_reference": int(voxels),
            "voxels_predicted": int(pred.sum()),
            "slices_reference": int(np.count_nonzero(ref_mask.any(axis=other))),
            "slices_predicted": int(np.count_nonzero(pred.any(axis=other))),
            "slices_beyond": beyond,
            "leak": is_leak(int(pred.sum()), int(voxels), beyond),
        }
        if work.before is not None:
            rows[name]["dice_before"] = dice(plane.stack(work.before, dtype=bool), ref_mask)
        logger.info("%s %s: Dice %.3f", proto.name, name, rows[name]["dice"])
        progress(n + 1, total, name)

    prediction = np.zeros(ref.shape, dtype=np.uint16)
    for label in sorted(masks, key=lambda v: -int((ref == v).sum())):
        prediction[masks[label]] = label
    timing = _run_timing(segmenter, stats_before)
    timing["wall_s"] = round(time.perf_counter() - t0, 3)
    timing["peak_rss_mb"] = peak_rss_mb()
    dices = [r["dice"] for r in rows.values()]
    ious = [r["iou"] for r in rows.values()]
    before = [r["dice_before"] for r in rows.values() if "dice_before" in r]
    strategy_name = strategy if isinstance(strategy, str) or strategy is None else "custom"
    return {
        "model": getattr(segmenter, "model_name", str(model)),
        "device": str(getattr(segmenter, "device", device)),
        "runtime": getattr(getattr(segmenter, "runtime", None), "name", None),
        "protocol": proto.name,
        "axis": getattr(plane, "orientation", orientation),
        "window": intensity.describe(),
        "point_prompts": getattr(segmenter, "point_prompts", None),
        "strategy": strategy_name or "default",
        "jitter": float(jitter),
        "seed": int(seed),
        "min_voxels": int(min_voxels),
        "structures": rows,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "leaks": sum(1 for r in rows.values() if r["leak"]),
        **({"mean_dice_before": float(np.mean(before))} if before else {}),
        "timing": timing,
        "prediction": prediction,
    }


# A structure "leaks" when its prediction is more than twice its reference volume, or reaches
# more than LEAK_SLICES slices beyond the reference's first or last slice (issue: a radiologist
# abandons a tool that leaks on a kidney, whatever its mean Dice).
LEAK_VOLUME_FACTOR = 2.0
LEAK_SLICES = 2


def slices_beyond(pred: np.ndarray, ref: np.ndarray, axis: int) -> int:
    """How many slices (along array ``axis``) the prediction reaches past the reference's
    extent, on the farther side; 0 when it stays within (or either is empty)."""
    other = tuple(a for a in range(3) if a != axis)
    p = np.flatnonzero(np.asarray(pred).any(axis=other))
    r = np.flatnonzero(np.asarray(ref).any(axis=other))
    if p.size == 0 or r.size == 0:
        return 0
    return int(max(r[0] - p[0], p[-1] - r[-1], 0))


def is_leak(voxels_predicted: int, voxels_reference: int, beyond: int) -> bool:
    """The leak rule: volume over LEAK_VOLUME_FACTOR x the reference, or more than LEAK_SLICES
    slices beyond its extent."""
    return voxels_predicted > LEAK_VOLUME_FACTOR * voxels_reference or beyond > LEAK_SLICES


def _run_timing(segmenter, before) -> dict:
    """This run's encode/decode counts and mean times (a shared segmenter's totals minus what it
    had done before the run); the segmenter's own ``timing()`` when it keeps no stats."""
    after = getattr(segmenter, "stats", None)
    fields = ("slices_encoded", "encode_ms", "decodes", "decode_ms")
    if before is None or after is None or not all(hasattr(after, f) for f in fields):
        return dict(segmenter.timing()) if hasattr(segmenter, "timing") else {}
    encoded = after.slices_encoded - before.slices_encoded
    decodes = after.decodes - before.decodes
    encode_ms = after.encode_ms - before.encode_ms
    decode_ms = after.decode_ms - before.decode_ms
    return {
        "slices_encoded": int(encoded),
        "encode_ms_per_slice": round(encode_ms / encoded, 2) if encoded else None,
        "decode_ms_per_prompt": round(decode_ms / decodes, 2) if decodes else None,
        "decodes": int(decodes),
    }


def result_for_json(result: Mapping) -> dict:
    """The result without its arrays (what the JSON file holds)."""
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}


def write_benchmark_outputs(
    result: Mapping,
    image,
    reference,
    json_path=None,
    csv_path=None,
    plots_dir=None,
    labels_path=None,
    segmentation_path=None,
    segments=None,
    overwrite: bool = False,
) -> None:
    """Write what a benchmark produced; every path is optional.

    Args:
        result: :func:`run_benchmark`'s dict.
        image, reference: the volumes it ran on (geometry for the label map; the overlay).
        json_path: the result without the label map (non-finite numbers as null).
        csv_path: one row per structure.
        plots_dir: ``structure_dice.png`` and ``overlay.png`` (reference green, prediction red).
        labels_path: the predicted label map (NIfTI or NRRD) on the image's grid.
        segmentation_path: the same as a Slicer ``.seg.nrrd``; ``segments`` gives
            ``(value, name, (r, g, b))`` per label (default: the structure names, grey-blue).
        overwrite: replace existing files.
    """
    from SlicerSAM.outputs import write_labelmap, write_segmentation
    from SlicerSAM.reports import overlay_montage, plot_structure_dice, write_csv, write_json

    prediction = np.asarray(result["prediction"])
    if json_path:
        write_json(json_path, result_for_json(result), overwrite=overwrite)
    if csv_path:
        rows = [{"structure": k, **v} for k, v in result["structures"].items()]
        write_csv(csv_path, rows, overwrite=overwrite)
    if labels_path:
        write_labelmap(labels_path, prediction, image, overwrite=overwrite)
    if segmentation_path:
        if segments is None:
            segments = [
                (int(v["label"]), str(name), (0.45, 0.55, 0.75))
                for name, v in result["structures"].items()
            ]
        present = {int(v) for v in np.unique(prediction) if v}
        segments = [s for s in segments if int(s[0]) in present]
        write_segmentation(segmentation_path, prediction, image, segments, overwrite=overwrite)
    if plots_dir:
        from SlicerSAM.slicing import plane_for

        folder = Path(plots_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if result["structures"]:
            plot_structure_dice(
                result["structures"],
                folder / "structure_dice.png",
                title=f"{result['protocol']}: Dice per structure ({result['model']})",
            )
        plane = plane_for(image, result.get("axis", "axial"))
        ref = np.asarray(reference.array)
        keep = np.isin(ref, [v["label"] for v in result["structures"].values()])
        ref = np.where(keep, ref, 0)
        shown = [k for k in range(plane.num_slices) if plane.grid(ref, k).any()]
        if shown:
            picks = sorted({shown[int(round(i))] for i in np.linspace(0, len(shown) - 1, 6)})
            rs, cs = plane.grid_spacing
            overlay_montage(
                [np.asarray(plane.grid(image.array, k)) for k in picks],
                [np.asarray(plane.grid(ref, k)) for k in picks],
                [np.asarray(plane.grid(prediction, k)) for k in picks],
                folder / "overlay.png",
                slice_labels=[f"{plane.orientation} {k}" for k in picks],
                aspect=rs / cs,
                title=f"{result['protocol']}: reference (green) and prediction (red)",
            )


# ----------------------------------------------------------------------------------------------
# Dataset mode
# ----------------------------------------------------------------------------------------------
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _strip_suffix(name: str) -> Optional[str]:
    for suffix in _IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def list_cases(dataset_dir) -> List[tuple]:
    """[(case id, image path, label path)] of an nnU-Net / MSD folder, sorted by case id.

    Images are ``imagesTr/<case>_0000.<ext>`` (nnU-Net; only channel 0 is used) or
    ``imagesTr/<case>.<ext>`` (MSD); labels ``labelsTr/<case>.<ext>``. Cases without a label file
    are skipped with a warning; hidden files (MSD's ``._*``) are ignored.
    """
    root = Path(dataset_dir)
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise SlicerSAMError(f"{root}: expected imagesTr/ and labelsTr/ folders (nnU-Net / MSD)")
    label_files = {}
    for path in labels.iterdir():
        stem = _strip_suffix(path.name)
        if stem and not path.name.startswith("."):
            label_files[stem] = path
    cases = []
    for path in sorted(images.iterdir()):
        stem = _strip_suffix(path.name)
        if not stem or path.name.startswith("."):
            continue
        if stem.endswith("_0000"):
            case = stem[: -len("_0000")]
        elif len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            continue  # another channel of an nnU-Net case
        else:
            case = stem
        if case not in label_files:
            logger.warning("%s: no label file for case %s, skipped", root, case)
            continue
        cases.append((case, path, label_files[case]))
    if not cases:
        raise SlicerSAMError(f"{root}: no image/label pairs found in imagesTr/ and labelsTr/")
    return cases


def read_label_names(path) -> Optional[Dict[int, str]]:
    """Label names {value: name} from a JSON file: {value: name} (labels.json), or a dataset's
    dataset.json ("labels": MSD {"1": "liver"} or nnU-Net v2 {"liver": 1}); None without a path.
    Value 0 (background) is dropped."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SlicerSAMError(f"cannot read label names from {path}: {exc}") from exc
    if isinstance(data, dict) and "labels" in data and isinstance(data["labels"], dict):
        data = data["labels"]
        # MSD style is {"0": "background", "1": "liver"}; nnU-Net v2 is {"liver": 1}
        if all(isinstance(v, int) for v in data.values()):
            data = {v: k for k, v in data.items()}
    try:
        names = {int(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise SlicerSAMError(f"{path}: expected a JSON object {{label value: name}}") from exc
    names.pop(0, None)
    return names


def dataset_label_names(dataset_dir) -> Optional[Dict[int, str]]:
    """Label names from ``dataset.json`` (MSD {"1": "liver"} or nnU-Net v2 {"liver": 1})."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise SlicerSAMError(f"cannot read label names from {path}: {exc}") from exc
    if not isinstance(data, dict):
        return None
    names: Dict[int, str] = {}
    for key, value in data.items():
        if isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: name -> value
            names[int(value)] = str(key)
        elif isinstance(value, (list, tuple)):  # nnU-Net v2 region labels: not supported
            continue
        else:
            try:
                names[int(key)] = str(value)
            except ValueError:
                continue
    names.pop(0, None)
    return names or None


def _write_json_atomic(path: Path, data) -> None:
    from SlicerSAM.reports import write_json

    write_json(path, data, overwrite=True)


def _run_case(job: dict) -> dict:
    """Worker: one case -> its JSON file. Runs in a separate process (spawn) or inline."""
    data = _case_data(job)
    _write_json_atomic(Path(job["out_path"]), data)
    return {"case": job["case"], "mean_dice": data["mean_dice"]}


def _case_data(job: dict) -> dict:
    """One case's results, JSON-ready (a Ray task returns them; the driver writes the file)."""
    from SlicerSAM.volume import load_volume

    case = job["case"]
    t0 = time.perf_counter()
    image = load_volume(job["image"])
    reference = load_volume(job["label"])
    kwargs = dict(job["kwargs"])
    factory = kwargs.pop("segmenter_factory", None)
    if factory is not None:
        kwargs["segmenter"] = factory(image)
    result = run_benchmark(image, reference, job["protocol"], **kwargs)
    data = result_for_json(result)
    data["case"] = case
    data["image"] = str(job["image"])
    data["reference"] = str(job["label"])
    data["timing"]["case_wall_s"] = round(time.perf_counter() - t0, 3)
    return data


def _finished(path: Path, protocol: str) -> bool:
    """A case file that parses and belongs to this protocol: the case is done."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("protocol") == protocol and "structures" in data


def _stats(values: List[float]) -> dict:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    return {
        "mean": float(np.mean(finite)) if n else None,
        "std": float(np.std(finite, ddof=1)) if n > 1 else (0.0 if n == 1 else None),
        "n": n,
        "n_cases": len(values),
    }


def summarize_cases(case_results: Sequence[Mapping]) -> dict:
    """Per-structure {metric: {mean, std, n, n_cases}} over cases, plus case-level means.

    ``n`` counts finite values (an infinite HD95 of a missed structure is left out of its mean
    and std; ``n_cases`` says how many cases had the structure at all).
    """
    per: Dict[str, Dict[str, list]] = {}
    for data in case_results:
        for name, row in data["structures"].items():
            slot = per.setdefault(name, {m: [] for m in METRICS})
            for m in METRICS:
                v = row.get(m)
                slot[m].append(float("inf") if v is None and m == "hd95_mm" else v)
    structures = {name: {m: _stats(v) for m, v in slot.items()} for name, slot in per.items()}
    return {
        "cases": len(case_results),
        "structures": structures,
        "mean_dice": _stats([d.get("mean_dice") for d in case_results]),
        "mean_iou": _stats([d.get("mean_iou") for d in case_results]),
    }


def run_dataset(
    dataset_dir,
    out_dir,
    protocol: str,
    workers: int = 1,
    label_names: Optional[Mapping[int, str]] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    segmenter_factory: Optional[Callable] = None,
    ray_address: Optional[str] = None,
    **kwargs,
) -> dict:
    """Benchmark every case of an nnU-Net / MSD dataset folder; resumable.

    Args:
        dataset_dir: folder with imagesTr/, labelsTr/ and optionally dataset.json.
        out_dir: results folder: ``cases/<case>.json`` per case and ``summary.json``.
        protocol: as :func:`run_benchmark`.
        workers: processes (spawned; each loads its own model). 1 runs in this process.
        label_names: {value: name}; None reads dataset.json (else ``label_<value>``).
        progress: ``progress(done, total, message)`` over cases (skipped ones count as done).
        cancel: checked between cases (and inside a case when ``workers`` is 1).
        segmenter_factory: ``factory(image Volume) -> segmenter`` instead of building a
            Segmenter (tests; must be picklable for ``workers`` > 1 and Ray).
        ray_address: run the cases as Ray tasks instead of local processes
            (:func:`SlicerSAM.ray_cluster.run_cases`): "local" starts Ray on this machine,
            "auto" joins its cluster, "ray://host:port" a remote one; None: no Ray.
        **kwargs: passed to :func:`run_benchmark` (model, checkpoint, device, orientation,
            intensity, min_voxels, jitter, seed, strategy, stop, tolerance_mm, point_prompts).

    Returns:
        The summary (also written to ``out_dir/summary.json``): {"dataset", "protocol", "cases",
        "case_ids", "structures": {name: {metric: {mean, std, n, n_cases}}}, "mean_dice",
        "mean_iou", "skipped": cases already done, "wall_s"}.
    """
    from SlicerSAM import protocols as P

    t0 = time.perf_counter()
    proto = P.parse_protocol(protocol).name
    progress = progress or _noop_progress
    cancel = cancel or _never
    out = Path(out_dir)
    # everything a run needs is checked before the results folder is made
    cases = list_cases(dataset_dir)
    if label_names is None:
        label_names = dataset_label_names(dataset_dir)
    if out.exists() and not out.is_dir():
        raise SlicerSAMError(f"{out} is a file; --output needs a folder for the results")
    (out / "cases").mkdir(parents=True, exist_ok=True)
    kwargs = dict(kwargs)
    kwargs.pop("progress", None)
    if label_names is not None:
        kwargs["label_names"] = dict(label_names)
    if segmenter_factory is not None:
        kwargs["segmenter_factory"] = segmenter_factory
    jobs, skipped = [], []
    for case, image, label in cases:
        path = out / "cases" / f"{case}.json"
        if path.is_file() and _finished(path, proto):
            skipped.append(case)
            continue
        jobs.append(
            {
                "case": case,
                "image": str(image),
                "label": str(label),
                "out_path": str(path),
                "protocol": proto,
                "kwargs": kwargs,
            }
        )
    total = len(cases)
    done = len(skipped)
    progress(done, total, "resumed" if skipped else "")
    if jobs and ray_address is not None:
        from SlicerSAM.ray_cluster import run_cases

        finished = [done]

        def write(job, data):
            _write_json_atomic(Path(job["out_path"]), data)

        def advance(case):
            finished[0] += 1
            progress(finished[0], total, case)

        run_cases(jobs, _case_data, write, ray_address, advance, cancel)
    elif jobs and int(workers) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch/threads is unsafe
        with cf.ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
            futures = {pool.submit(_run_case, job): job["case"] for job in jobs}
            try:
                for fut in cf.as_completed(futures):
                    fut.result()
                    done += 1
                    progress(done, total, futures[fut])
                    if cancel():
                        raise Cancelled("dataset benchmark cancelled")
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    else:
        for job in jobs:
            if cancel():
                raise Cancelled("dataset benchmark cancelled")
            job = dict(job, kwargs=dict(job["kwargs"], cancel=cancel))
            _run_case(job)
            done += 1
            progress(done, total, job["case"])

    results = []
    for case, _, _ in cases:
        path = out / "cases" / f"{case}.json"
        results.append(json.loads(path.read_text(encoding="utf-8")))
    summary = summarize_cases(results)
    summary = {
        "dataset": str(dataset_dir),
        "protocol": proto,
        "case_ids": [c for c, _, _ in cases],
        "skipped": skipped,
        **summary,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    for key in ("model", "device", "axis", "window", "jitter", "seed", "min_voxels"):
        values = {str(r.get(key)) for r in results}
        if len(values) == 1:
            summary[key] = results[0].get(key)
    _write_json_atomic(out / "summary.json", summary)
    return summary
