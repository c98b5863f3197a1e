"""Command-line interface: `python -m SlicerSAM COMMAND` (segment, propagate, everything, evaluate,
benchmark, models, serve, demo).

Every sub-command validates its inputs and output paths before any model work, prints a clear
one-line error and exits with status 2 on bad input (1 on an unexpected failure), and writes its
outputs atomically (nothing partial is left behind on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from SlicerSAM.benchmark import read_label_names
from SlicerSAM.box_search import POINT_PROMPTS
from SlicerSAM.console import print_table, progress_bar
from SlicerSAM.errors import Cancelled, SlicerSAMError
from SlicerSAM.protocols import PROTOCOLS_TEXT

log = logging.getLogger("SlicerSAM")

ORIENTATIONS = ("axial", "coronal", "sagittal")


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="model name (see `models`)")
    p.add_argument("--checkpoint", help="local checkpoint file to use instead of the model zoo")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="allow downloading the model's official checkpoint (verified by sha256, cached)",
    )
    p.add_argument(
        "--backend",
        help="image encoder runtime: torch, openvino, onnxruntime or auto (default: "
        "$SLICERSAM_BACKEND, else auto: the fastest one here whose masks agree with torch fp32, "
        "from a calibration on first use; GPUs run torch)",
    )
    p.add_argument(
        "--precision",
        help="image encoder precision: fp32 (exact), bf16, fp16 or auto (default: "
        "$SLICERSAM_PRECISION, else auto: a reduced precision only where the hardware has it and "
        "the masks agree with fp32)",
    )
    p.add_argument(
        "--onnx",
        metavar="DIR",
        help="for --backend openvino/onnxruntime: a folder written by export-onnx for this model "
        "(default: exported once into the user cache)",
    )
    p.add_argument(
        "--point-prompts",
        choices=POINT_PROMPTS,
        default="auto",
        help="what clicks given without a box become: 'box', the box around them that the "
        "model is surest of; 'model', the model's own point prompts; 'auto' (default), 'box' "
        "for models trained with boxes only (LiteMedSAM, MedSAM)",
    )


def _add_slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--axis",
        choices=ORIENTATIONS,
        help="slicing orientation (default: the prompts', else axial)",
    )
    p.add_argument(
        "--window",
        default="abdomen",
        help="intensity mapping: a preset (abdomen, lung, bone, brain, mediastinum), 'L,W' "
        "(level,width in HU, e.g. 40,400), 'mr' (same as 'percentile': the volume's 0.5-99.5 %% "
        "percentiles) or 'percentile:LOW,HIGH' (other percentiles, e.g. percentile:1,99)",
    )
    p.add_argument(
        "--cache-dir",
        help="keep image embeddings in this folder: a later run on the same volume, model, axis "
        "and window reads them instead of encoding again",
    )


def _embedding_cache(args):
    """The embedding cache of ``--cache-dir`` (None: the segmenter's in-memory default)."""
    from SlicerSAM.cache import EmbeddingCache

    directory = getattr(args, "cache_dir", None)
    return EmbeddingCache(disk_dir=directory) if directory else None


def _add_volume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", help="SeriesInstanceUID when a DICOM folder holds several series")
    p.add_argument("--timepoint", type=int, help="index along the 4th axis of 4D data")
    p.add_argument("--component", type=int, help="component of multi-component (vector) data")


def _load_image(args, path: str | None = None):
    """The image volume of a command, honouring --series/--timepoint/--component."""
    from SlicerSAM.volume import load_volume

    return load_volume(
        path or args.image,
        series=getattr(args, "series", None),
        timepoint=getattr(args, "timepoint", None),
        component=getattr(args, "component", None),
    )


def _check_model(args) -> None:
    """Refuse, before any work, a model or device this run cannot have: an unknown model name,
    a device that is not there, weights that are neither on disk nor allowed to download."""
    from sam_core.device import select_device
    from sam_core.zoo import get_spec, resolve_checkpoint
    from SlicerSAM.backends import candidates, requested

    device = select_device(args.device)
    get_spec(args.model)
    if hasattr(args, "backend"):  # a backend that is not installed or cannot run here
        candidates(*requested(args.backend, args.precision), device)
    onnx = getattr(args, "onnx", None)
    if onnx and not (Path(onnx) / "encoder.onnx").is_file():
        raise SlicerSAMError(
            f"--onnx {onnx}: no encoder.onnx there; give the folder written by "
            f"`python -m SlicerSAM export-onnx --model {args.model} --output DIR`"
        )
    if not getattr(args, "download", False):
        resolve_checkpoint(args.model, args.checkpoint, allow_download=False)


def _load_model(args):
    from sam_core.zoo import load_model
    from SlicerSAM.backends import request_runtime

    progress = progress_bar("download", unit="B") if getattr(args, "download", False) else None
    sam = load_model(
        args.model,
        args.checkpoint,
        device=args.device,
        allow_download=getattr(args, "download", False),
        progress=progress,
    )
    request_runtime(sam, args.backend, args.precision, args.onnx)
    return sam


def _ms(value, digits: int) -> str:
    """A timing for the summary line; "-" when nothing was timed (all embeddings cached)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _timing_block(segmenter, wall_s: float) -> dict:
    from SlicerSAM.benchmark import peak_rss_mb

    timing = dict(segmenter.timing())
    timing["runtime"] = segmenter.runtime.name
    timing["wall_s"] = round(wall_s, 3)
    timing["peak_rss_mb"] = peak_rss_mb()
    return timing


def _write_mask_output(path: str, labels, volume, segments, overwrite: bool) -> None:
    from SlicerSAM.outputs import write_labelmap, write_segmentation

    if path.endswith(".seg.nrrd"):
        write_segmentation(path, labels, volume, segments, overwrite=overwrite)
    else:
        write_labelmap(path, labels, volume, overwrite=overwrite)


MASK_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def _check_outputs(paths: Sequence[tuple], overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written: (path, suffixes) pairs, a path
    None when not asked for. A missing output folder is created when the file is written; the
    user is told so now."""
    from SlicerSAM.outputs import check_output_path

    for path, suffixes in paths:
        if path:
            check_output_path(path, overwrite, suffixes)
    for path, _ in paths:
        if path and not Path(path).parent.exists():
            print(f"note: {Path(path).parent} does not exist; it is created for {path}")


# ----------------------------------------------------------------------------------------------
# Sub-commands
# ----------------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from sam_core.zoo import DEFAULT_MODEL, MODEL_SPECS, describe_availability

    for name, spec in MODEL_SPECS.items():
        mark = "*" if name == DEFAULT_MODEL else " "
        size = f"{spec.size_bytes / 1e6:8.1f} MB" if spec.size_bytes else "       ? MB"
        print(f"{mark} {name:<14} {size}  {describe_availability(spec):<34} {spec.description}")
    print("\n* default. Download a model with e.g. `segment ... --model sam_vit_b --download`.")
    return 0


def cmd_export_onnx(args) -> int:
    """`export-onnx`: encoder.onnx + decoder.onnx (SAM's signature) + model.json into --output,
    checked against PyTorch with onnxruntime before the folder appears."""
    import shutil
    import tempfile

    from sam_core.zoo import get_spec, resolve_checkpoint
    from SlicerSAM.backends import check_export
    from SlicerSAM.segmenter import _model_identity

    output = Path(args.output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not args.overwrite:
            raise SlicerSAMError(f"{output} exists: choose another --output or add --overwrite")
        if not output.is_dir():
            raise SlicerSAMError(f"{output} is a file, not a folder")
    for module, extra in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        try:
            __import__(module)
        except ImportError:
            raise SlicerSAMError(
                f"export-onnx needs {module}: pip install 'slicersam[{extra}]'"
            ) from None
    get_spec(args.model)
    if not args.download:
        resolve_checkpoint(args.model, args.checkpoint, allow_download=False)
    from sam_core.onnx_export import export_model, model_metadata
    from sam_core.zoo import load_model

    sam = load_model(args.model, args.checkpoint, device="cpu", allow_download=args.download)
    name, sha = _model_identity(sam)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        export_model(sam, staging, model_metadata(sam, args.model, sha))
        check = check_export(sam, staging)
        ok = check["box_dice_min"] >= 0.99 and check["click_dice_min"] >= 0.95
        print(
            f"onnxruntime vs PyTorch on {check['prompts']} structures of the bundled CT: "
            f"embeddings max |diff| {check['embedding_max_abs']:.2e}; box masks Dice mean "
            f"{check['box_dice_mean']:.4f} min {check['box_dice_min']:.4f}; click masks Dice "
            f"mean {check['click_dice_mean']:.4f} min {check['click_dice_min']:.4f}"
        )
        if not ok:
            raise SlicerSAMError(
                "the exported graphs do not reproduce PyTorch's masks: not written"
            )
        if output.exists():
            shutil.rmtree(output)  # a folder: a file was refused above
        staging.replace(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"wrote {output}/encoder.onnx, decoder.onnx and model.json ({name}, {sha[:12]})")
    return 0


def cmd_runtimes(args) -> int:
    """`runtimes`: the image encoder runtimes this machine has, the calibration that ``auto``
    uses (run now if there is none, or with --recalibrate) and what it picks."""
    from sam_core.runtimes import cpu_text
    from SlicerSAM import backends
    from SlicerSAM.segmenter import _model_identity

    _check_model(args)
    sam = _load_model(args)
    choice = backends.choose_runtime(
        sam,
        _model_identity(sam),
        onnx_dir=args.onnx,
        threads=backends.default_threads(),
        recalibrate=args.recalibrate,
    )
    print(f"CPU: {cpu_text()}")
    if choice.calibration:
        print(f"{'runtime':18s} {'ms/slice':>9s}  masks vs torch fp32 (box prompts, bundled CT)")
        for name, row in sorted(choice.calibration.items(), key=lambda kv: kv[1]["ms_per_slice"]):
            verdict = "agrees" if row["agrees"] else "differs"
            print(
                f"{name:18s} {row['ms_per_slice']:9.1f}  Dice mean {row['dice_mean']:.4f} "
                f"min {row['dice_min']:.4f} over {row.get('prompts', '?')} prompts: {verdict}"
            )
    print(choice.reason)
    return 0


def _read_prompts(path: str):
    """Prompts from Slicer markups (.mrk.json) or a SlicerSAM prompt JSON file."""
    from SlicerSAM.markups import read_markups
    from SlicerSAM.prompts import load_prompt_file

    if str(path).endswith(".mrk.json"):
        return read_markups(path)
    return load_prompt_file(path)


def _session(args, volume, orientation: str):
    """The InteractiveSession of a segment/propagate command (the model loads on first use)."""
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.session import InteractiveSession

    return InteractiveSession(
        volume,
        lambda: _load_model(args),  # loaded when the first slice is segmented
        orientation=orientation,
        intensity=parse_intensity(args.window),
        device=args.device,
        cache=_embedding_cache(args),
        checkpoint=args.checkpoint,
        point_prompts=args.point_prompts,
    )


def cmd_segment(args, propagate_default: bool = False) -> int:
    """`segment` and `propagate`: the prompts (and key slices of --mask) go to one
    InteractiveSession, as the Slicer module's do; its result is written."""
    import numpy as np

    from SlicerSAM.reports import write_json

    _check_outputs([(args.output, MASK_SUFFIXES), (args.json, (".json",))], args.overwrite)
    t0 = time.perf_counter()
    volume = _load_image(args)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if prompts is not None and args.slice is not None:
        from dataclasses import replace

        prompts = replace(prompts, index=args.slice)
    args.axis = args.axis or getattr(prompts, "orientation", None) or "axial"
    session = _session(args, volume, args.axis)
    if prompts is not None:
        session.plan(prompts)  # every prompt checked before the model loads
    keys = _mask_keys(args, volume, session) if getattr(args, "mask", None) else []
    _check_model(args)
    results = session.set_prompts(prompts) if prompts is not None else {}
    stop_reasons = {}
    if args.propagate or propagate_default:
        prop = session.propagate(progress=progress_bar("propagate"))
        stop_reasons = prop.stop_reasons
        print(f"propagation: {prop.summary()}")
    grids = session.result()
    mask = session.plane.stack(grids, dtype=np.uint8)
    segments = [(1, args.name, (0.85, 0.35, 0.25))]
    _write_mask_output(args.output, mask, volume, segments, args.overwrite)
    wall = time.perf_counter() - t0
    segmenter = session.segmenter
    info = {
        "image": str(args.image),
        "prompts": None if args.prompts is None else str(args.prompts),
        "mask": getattr(args, "mask", None),
        "model": segmenter.model_name,
        "device": str(segmenter.device),
        "axis": args.axis,
        "window": args.window,
        "point_prompts": segmenter.point_prompts,
        "key_slices": sorted(int(k) for k in session.keys),
        "mask_key_slices": keys,
        # per prompted slice: the model's confidence, and the box its mask came from (the
        # searched one when clicks were turned into a box)
        "prompted": {
            str(index): {
                "predicted_iou": float(result.iou[result.best]),
                "box_xyxy": None
                if result.boxes_xyxy is None
                else [round(float(v), 2) for v in result.boxes_xyxy[result.best]],
                "searched_box": bool(result.searched),
            }
            for index, result in sorted(results.items())
        },
        "roi_slice_range": None if session.roi is None else list(session.roi.slice_range),
        "slices_segmented": sorted(int(k) for k, v in grids.items() if v.any()),
        "stop_reasons": stop_reasons,
        "voxels": int(mask.sum()),
        "output": str(args.output),
        "timing": _timing_block(segmenter, wall),
    }
    if args.json:
        write_json(args.json, info, overwrite=args.overwrite)
    print(
        f"{info['voxels']} voxels on {len(info['slices_segmented'])} slice(s) -> {args.output} "
        f"({info['model']} on {info['device']}, {wall:.1f} s)"
    )
    return 0


def _candidates_json_path(output: str) -> str:
    """candidates.seg.nrrd -> candidates.json (the records beside the segmentation)."""
    name = Path(output).name
    for suffix in (".seg.nrrd", ".nrrd"):
        if name.lower().endswith(suffix):
            return str(Path(output).with_name(name[: -len(suffix)] + ".json"))
    return output + ".json"


def cmd_everything(args) -> int:
    """`everything`: every mask the model finds on one slice, one segment each, largest first,
    with their confidences in the names and in a JSON beside the segmentation."""
    import numpy as np

    from SlicerSAM.everything import CANDIDATE_COLOURS, candidate_name, check_slice
    from SlicerSAM.outputs import write_overlapping_segmentation
    from SlicerSAM.reports import write_json

    json_path = args.json or _candidates_json_path(args.output)
    _check_outputs([(args.output, (".seg.nrrd",)), (json_path, (".json",))], args.overwrite)
    for name in ("points_per_side",):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SlicerSAMError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    t0 = time.perf_counter()
    volume = _load_image(args)
    args.axis = args.axis or "axial"
    session = _session(args, volume, args.axis)
    index = check_slice(session.plane, volume, args.slice)  # before the model loads
    _check_model(args)
    candidates = session.segment_everything(
        index,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        prompt=args.prompt,
    )
    if not candidates:
        raise SlicerSAMError(
            f"no mask on {args.axis} slice {index} passed the filters: nothing was written "
            "(lower --pred-iou-thresh or --stability-thresh)"
        )
    plane = session.plane
    spacing = plane.grid_spacing
    masks, segments, records = [], [], []
    for number, c in enumerate(candidates, 1):
        name = candidate_name(number, c)
        volume_mask = plane.stack({index: c.mask}, dtype=bool)
        centroid = volume.kji_to_ras(np.argwhere(volume_mask).mean(axis=0)[None])[0]
        masks.append(volume_mask)
        segments.append((name, CANDIDATE_COLOURS[(number - 1) % len(CANDIDATE_COLOURS)]))
        records.append(
            {
                "segment": number,
                "name": name,
                "area_voxels": c.area,
                "area_mm2": round(c.area * float(spacing[0]) * float(spacing[1]), 2),
                "predicted_iou": round(c.predicted_iou, 4),
                "stability_score": round(c.stability_score, 4),
                "centroid_ras": [round(float(v), 2) for v in centroid],
            }
        )
    write_overlapping_segmentation(args.output, masks, volume, segments, args.overwrite)
    segmenter = session.segmenter
    info = {
        "image": str(args.image),
        "axis": args.axis,
        "slice": index,
        "window": args.window,
        "model": segmenter.model_name,
        "device": str(segmenter.device),
        "candidates": records,
        "output": str(args.output),
        "timing": _timing_block(segmenter, time.perf_counter() - t0),
    }
    write_json(json_path, info, overwrite=args.overwrite)
    print(
        f"{len(candidates)} candidates on {args.axis} slice {index} -> {args.output} "
        f"(records: {json_path}; {segmenter.model_name} on {segmenter.device}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return 0


def cmd_propagate(args) -> int:
    if not args.prompts and not args.mask:
        raise SlicerSAMError("propagate needs --prompts FILE, --mask LABELMAP, or both")
    return cmd_segment(args, propagate_default=True)


def _mask_keys(args, volume, session) -> list:
    """Key slices from --mask (an accepted or corrected segment), added to the session as they
    are; returns their indices."""
    import numpy as np

    from SlicerSAM.volume import load_volume

    seed = load_volume(args.mask)
    if seed.shape != volume.shape:
        raise SlicerSAMError(
            f"{args.mask}: grid {seed.shape} differs from the image's {volume.shape} (K, J, I)"
        )
    plane = session.plane
    seed_mask = np.asarray(seed.array) == args.label if args.label else np.asarray(seed.array) > 0
    present = [i for i in range(plane.num_slices) if plane.grid(seed_mask, i).any()]
    if args.slices:
        keys = [int(s) for s in args.slices.split(",")]
        missing = [k for k in keys if k not in present]
        if missing:
            raise SlicerSAMError(f"key slice(s) {missing} are empty in {args.mask}")
    else:
        keys = present
    if not keys:
        raise SlicerSAMError(f"{args.mask} holds no voxels to propagate from")
    for k in keys:
        session.add_mask(k, np.array(plane.grid(seed_mask, k)))
    return keys


def cmd_evaluate(args) -> int:
    import numpy as np

    from SlicerSAM.metrics import evaluate_labels
    from SlicerSAM.reports import plot_structure_dice, write_csv, write_json
    from SlicerSAM.volume import load_volume

    _check_outputs([(args.json, (".json",)), (args.csv, (".csv",))], args.overwrite)
    names = read_label_names(args.labels)
    wanted = _chosen_labels(args, names)
    pred = load_volume(args.prediction)
    ref = load_volume(args.reference)
    if pred.shape != ref.shape or not np.allclose(pred.ijk_to_ras, ref.ijk_to_ras, atol=1e-3):
        raise SlicerSAMError(
            f"{args.prediction} and {args.reference} are not on the same grid "
            f"({pred.shape} vs {ref.shape}); resample the prediction first"
        )
    pred_labels, ref_labels = np.asarray(pred.array), np.asarray(ref.array)
    # Only structures present in the prediction or the reference: a label file may name
    # a hundred classes, and "both empty" would report a meaningless perfect score.
    present = sorted(int(v) for v in np.union1d(np.unique(pred_labels), np.unique(ref_labels)))
    labels = [v for v in present if v != 0]
    if wanted is not None:
        absent = [v for v in wanted if v not in present]
        if absent:
            raise SlicerSAMError(
                f"label value(s) {absent} are in neither {args.prediction} nor {args.reference}"
            )
        labels = wanted
    results = evaluate_labels(
        pred_labels,
        ref_labels,
        ref.spacing,
        names or {},
        tolerance_mm=args.tolerance,
        labels=labels,
    )
    print_table(results)
    if args.json:
        write_json(args.json, {"structures": results}, overwrite=args.overwrite)
    if args.csv:
        rows = [{"structure": k, **v} for k, v in results.items()]
        write_csv(args.csv, rows, overwrite=args.overwrite)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_structure_dice(results, Path(args.plots) / "structure_dice.png")
    return 0


def _chosen_labels(args, names) -> list | None:
    """The label values `evaluate` is restricted to (--structures NAME ..., --label N ...), or
    None for every structure present; a name not in --labels is an error naming the choices."""
    chosen = list(args.label_values or [])
    if args.structures:
        if not names:
            raise SlicerSAMError("--structures needs --labels (a JSON {label value: name})")
        by_name = {name: value for value, name in names.items()}
        unknown = [name for name in args.structures if name not in by_name]
        if unknown:
            raise SlicerSAMError(
                f"unknown structure(s) {', '.join(unknown)}; {args.labels} names: "
                f"{', '.join(sorted(by_name))}"
            )
        chosen += [by_name[name] for name in args.structures]
    return sorted(set(chosen)) if chosen else None


def cmd_benchmark(args) -> int:
    from SlicerSAM import benchmark
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.protocols import parse_protocol

    args.axis = args.axis or "axial"
    parse_protocol(args.protocol)
    intensity = parse_intensity(args.window)
    names = read_label_names(args.labels)
    if args.ray is not None and not args.dataset:
        raise SlicerSAMError("--ray runs the cases of a --dataset; give --dataset DIR")
    if args.dataset:
        if not args.output:
            raise SlicerSAMError("--dataset needs --output DIR for per-case results and summary")
        if args.ray is not None:
            _check_ray()
        summary = benchmark.run_dataset(
            args.dataset,
            args.output,
            args.protocol,
            model=args.model,
            checkpoint=args.checkpoint,
            device=args.device,
            orientation=args.axis,
            intensity=intensity,
            min_voxels=args.min_voxels,
            jitter=args.jitter,
            seed=args.seed,
            workers=args.workers,
            ray_address=args.ray,
            label_names=names,
            point_prompts=args.point_prompts,
            progress=progress_bar("cases", unit="case"),
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "structures"}, indent=1))
        return 0
    if not (args.image and args.reference):
        raise SlicerSAMError("benchmark needs IMAGE and REFERENCE, or --dataset DIR")
    _check_outputs(
        [(args.json, (".json",)), (args.csv, (".csv",)), (args.output, MASK_SUFFIXES)],
        args.overwrite,
    )
    from SlicerSAM.volume import load_volume

    image = _load_image(args)
    reference = load_volume(args.reference)
    if reference.shape != image.shape:
        raise SlicerSAMError(
            f"{args.reference}: grid {reference.shape} differs from {args.image}'s {image.shape}"
        )
    _check_model(args)
    model = _load_model(args)
    result = benchmark.run_benchmark(
        image,
        reference,
        args.protocol,
        label_names=names,
        model=model,
        device=args.device,
        orientation=args.axis,
        intensity=intensity,
        min_voxels=args.min_voxels,
        jitter=args.jitter,
        seed=args.seed,
        progress=progress_bar(args.protocol, unit="structure"),
        cache=_embedding_cache(args),
        point_prompts=args.point_prompts,
    )
    benchmark.write_benchmark_outputs(
        result,
        image,
        reference,
        json_path=args.json,
        csv_path=args.csv,
        plots_dir=args.plots,
        labels_path=args.output,
        overwrite=args.overwrite,
    )
    print_table(result["structures"])
    t = result["timing"]
    before = result.get("mean_dice_before")
    print(
        f"\n{result['protocol']}: mean Dice {result['mean_dice']:.3f}"
        + ("" if before is None else f" ({before:.3f} before the correction)")
        + f", mean IoU {result['mean_iou']:.3f} over {len(result['structures'])} structures, "
        f"{result['leaks']} leak(s) | "
        f"{result['model']} on {result['device']} ({result['runtime']}) | "
        f"{t['slices_encoded']} slices encoded, "
        f"{_ms(t['encode_ms_per_slice'], 0)} ms/slice encode, "
        f"{_ms(t['decode_ms_per_prompt'], 1)} ms/prompt decode, {t['wall_s']:.1f} s"
    )
    return 0


def cmd_serve(args) -> int:
    """`serve`: the inference server (SlicerSAM/server.py) until Ctrl-C."""
    import os

    from SlicerSAM.server import ServerSettings, serve

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise SlicerSAMError(
            f"serve needs {exc.name}: pip install 'slicersam[server]' (FastAPI and uvicorn)"
        ) from None
    _check_model(args)
    settings = ServerSettings(
        model=args.model,
        checkpoint=args.checkpoint,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        onnx_dir=args.onnx,
        token=args.token or os.environ.get("SLICERSAM_TOKEN") or None,
        max_upload_mb=args.max_upload_mb,
        max_voxels=args.max_voxels,
        max_sessions=args.max_sessions,
        idle_seconds=args.idle_minutes * 60.0,
        cache_mb=args.cache_mb,
        data_root=args.data_root,
    )
    if args.data_root and not Path(args.data_root).is_dir():
        raise SlicerSAMError(f"--data-root {args.data_root} is not a folder")
    if args.ray is not None:
        from SlicerSAM.ray_cluster import deploy

        _check_ray()
        deploy(
            settings,
            host=args.host,
            port=args.port,
            address=args.ray,
            workers=args.workers,
            replicas=args.replicas,
        )
        return 0
    serve(settings, host=args.host, port=args.port)
    return 0


def _check_ray() -> None:
    """Ray (with Serve) is there, before any work."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise SlicerSAMError("--ray needs Ray: pip install 'slicersam[ray]'") from None


def cmd_demo(args) -> int:
    from SlicerSAM.demo import run_demo

    return run_demo(args)


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m SlicerSAM",
        description="Segment Anything (LiteMedSAM, MedSAM, SAM) for CT and MRI volumes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list the available models and where their weights are")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "runtimes",
        help="the image encoder runtimes here, auto's calibration (made once per model and "
        "machine) and what it picks",
    )
    p.add_argument("--recalibrate", action="store_true", help="forget this machine's calibration")
    _add_model_args(p)
    p.set_defaults(func=cmd_runtimes)

    p = sub.add_parser(
        "export-onnx",
        help="write the image encoder and SAM's prompt-to-mask graph as ONNX (checked with "
        "onnxruntime against PyTorch before the folder is written)",
    )
    p.add_argument("--output", required=True, help="folder to write (encoder.onnx, decoder.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--model", default="litemedsam", help="model name (see `models`)")
    p.add_argument("--checkpoint", help="local checkpoint file to use instead of the model zoo")
    p.add_argument("--download", action="store_true", help="allow downloading the checkpoint")
    p.set_defaults(func=cmd_export_onnx)

    for name, helptext in (
        ("segment", "segment one slice from prompts (optionally propagate through the volume)"),
        ("propagate", "propagate from prompts or from key slices of an existing label map"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("image", help="volume: NIfTI, NRRD, MetaImage or a DICOM folder")
        p.add_argument(
            "--prompts",
            required=(name == "segment"),
            help="Slicer markups (.mrk.json: point lists, ROI) or a SlicerSAM prompt JSON "
            "(docs/prompts.md)",
        )
        if name == "segment":
            p.add_argument("--propagate", action="store_true", help="propagate from the key slice")
        else:
            p.set_defaults(propagate=True)
            p.add_argument(
                "--mask",
                help="label map on the image grid whose slices are key slices (with --prompts: "
                "both are key slices)",
            )
            p.add_argument("--label", type=int, default=0, help="label value in --mask (0 = any)")
            p.add_argument("--slices", help="comma-separated key slice indices in --mask")
        p.add_argument("--slice", type=int, help="slice index when the prompts do not fix it")
        p.add_argument(
            "--output", required=True, help="output .seg.nrrd or label map (.nii.gz, .nrrd)"
        )
        p.add_argument("--json", help="write run information (timing, slices) to this JSON file")
        p.add_argument("--name", default="SAM segment", help="segment name in the .seg.nrrd")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        _add_model_args(p)
        _add_slice_args(p)
        _add_volume_args(p)
        p.set_defaults(func=cmd_segment if name == "segment" else cmd_propagate)

    p = sub.add_parser(
        "everything",
        help="every mask the model finds on one slice, one segment each (segment everything)",
    )
    p.add_argument("image", help="volume: NIfTI, NRRD, MetaImage or a DICOM folder")
    p.add_argument("--slice", type=int, required=True, help="slice index along --axis")
    p.add_argument("--output", required=True, help="output .seg.nrrd (one segment per mask)")
    p.add_argument(
        "--json", help="candidate records (default: the output's name with .json, beside it)"
    )
    p.add_argument("--points-per-side", type=int, help="prompt grid size (default: the model's)")
    p.add_argument(
        "--prompt",
        choices=("points", "boxes", "search"),
        help="what each grid point prompts: a point (SAM), boxes of several sizes, or a click "
        "made a box by the click search (default: points for SAM, search for box-trained models)",
    )
    p.add_argument(
        "--pred-iou-thresh",
        type=float,
        help="keep masks above this predicted IoU (default: the model's)",
    )
    p.add_argument(
        "--stability-thresh",
        type=float,
        help="keep masks at least this stable (default: the model's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_model_args(p)
    _add_slice_args(p)
    _add_volume_args(p)
    p.set_defaults(func=cmd_everything)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, NSD of a label map against a reference")
    p.add_argument("prediction", help="predicted label map (NIfTI, NRRD, .seg.nrrd, ...)")
    p.add_argument("reference", help="reference label map on the same grid")
    p.add_argument("--labels", help="JSON {label value: name}")
    p.add_argument(
        "--structures",
        nargs="+",
        metavar="NAME",
        help="evaluate only these structures (names from --labels)",
    )
    p.add_argument(
        "--label",
        nargs="+",
        type=int,
        dest="label_values",
        metavar="N",
        help="evaluate only these label values",
    )
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--csv", help="write the metrics to this CSV file (one row per structure)")
    p.add_argument("--plots", help="folder for PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("benchmark", help="run a prompt protocol against reference labels")
    p.add_argument("image", nargs="?", help="volume to segment (or use --dataset)")
    p.add_argument("reference", nargs="?", help="reference label map on the image grid")
    p.add_argument("--protocol", required=True, help=PROTOCOLS_TEXT)
    p.add_argument("--dataset", help="nnU-Net/MSD folder (imagesTr/, labelsTr/): every case")
    p.add_argument("--workers", type=int, default=1, help="processes for --dataset")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the --dataset cases as Ray tasks: alone, on a Ray instance started here; "
        "'auto' joins this machine's cluster; 'ray://host:10001' a remote one",
    )
    p.add_argument("--labels", help="JSON {label value: name} (or the dataset's dataset.json)")
    p.add_argument("--min-voxels", type=int, default=200, help="skip smaller structures")
    p.add_argument("--jitter", type=float, default=0.0, help="box jitter in pixels (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    p.add_argument("--json", help="write the results (per structure, means, timing) as JSON")
    p.add_argument("--csv", help="write one row per structure as CSV")
    p.add_argument("--plots", help="folder for PNG plots")
    p.add_argument("--output", help="predicted label map (or the results folder with --dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_model_args(p)
    _add_slice_args(p)
    _add_volume_args(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser(
        "serve",
        help="run the inference server (HTTP, FastAPI) for the Slicer module and other clients",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--token",
        help="a secret clients must send (Authorization: Bearer TOKEN); needed for any host "
        "but loopback; default: $SLICERSAM_TOKEN",
    )
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload (MB)")
    p.add_argument("--max-voxels", type=int, default=600 * 512 * 512, help="largest volume")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions held at once")
    p.add_argument(
        "--idle-minutes", type=float, default=30.0, help="a session idle this long is closed"
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=2048.0,
        help="memory for slice embeddings, shared by all sessions",
    )
    p.add_argument(
        "--data-root", help="clients may open volumes by path under this folder (default: none)"
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="deploy on Ray Serve: alone, on a Ray instance started here; 'auto' joins this "
        "machine's cluster; 'ray://host:10001' a remote one",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="with --ray: session workers (one GPU each)"
    )
    p.add_argument("--replicas", type=int, default=1, help="with --ray: HTTP ingress replicas")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        help="segment the bundled sample CT (or --image/--labels, or --phantom) with the default "
        "model and report Dice/IoU per structure against its reference labels",
    )
    p.add_argument("--image", help="another volume instead of the bundled sample CT")
    p.add_argument("--labels", help="reference label map for --image")
    p.add_argument(
        "--phantom",
        action="store_true",
        help="the engine's synthetic CT-like phantom instead of the bundled sample CT",
    )
    p.add_argument("--names", help="JSON {label value: name} for --labels")
    p.add_argument("--output", default="slicersam-demo", help="output folder (a run sub-folder)")
    p.add_argument(
        "--protocol", default="box-propagate", help="prompt protocol (" + PROTOCOLS_TEXT + ")"
    )
    p.add_argument("--min-voxels", type=int, default=200)
    _add_model_args(p)
    _add_slice_args(p)
    _add_volume_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (SlicerSAMError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("\ncancelled: nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # on a line of its own: a progress bar may hold the current one
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        from sam_core.errors import CheckpointError

        if isinstance(exc, CheckpointError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
