"""Which encoder runtime the engine uses: asked for, or chosen per machine by a short calibration.

``--backend torch|openvino|onnxruntime|auto`` and ``--precision fp32|bf16|fp16|auto`` (CLI,
server, Slicer module settings, :class:`~SlicerSAM.segmenter.Segmenter`) name a
:class:`sam_core.runtimes.Runtime` for the image encoder. ``auto`` (the default) picks, per
machine and model:

1. the candidates: every installed backend that runs on the device (GPUs: torch only) at fp32
   and at each reduced precision the hardware has (:func:`sam_core.runtimes.hardware_precisions`);
2. a calibration on the bundled sample CT (``SlicerSAM/sample``: 3 axial slices, a box prompt per
   labelled structure on them, window 40/400): every candidate encodes the slices (interleaved
   rounds, median ms per slice) and its masks for the boxes are compared with torch fp32's;
3. the fastest candidate whose masks agree with fp32 (mean Dice >= AGREEMENT_MEAN and every
   prompt >= AGREEMENT_MIN), if it is at least MIN_GAIN (5 %) faster than torch fp32, else
   torch fp32 (always a candidate, so there is always an answer).

The outcome is cached in ``runtime-choice.json`` beside the model cache, keyed by the model and
its checkpoint sha256, the device, the CPU model, flags and logical CPUs, the encoder threads and
the library versions: another model, machine or library version calibrates again. OpenVINO and
onnxruntime run the encoder's ONNX graph, exported once per model into ``onnx/<model>-<sha>/``
there (or read from ``--onnx DIR``, a folder written by ``python -m SlicerSAM export-onnx``,
whose metadata must name the same model and checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sam_core.runtimes import (
    BACKENDS,
    PRECISIONS,
    Runtime,
    RuntimeUnavailable,
    check_runtime,
    cpu_description,
    hardware_precisions,
    installed,
    library_versions,
    load_encoder,
)

logger = logging.getLogger(__name__)

AGREEMENT_MEAN = 0.99  # mean Dice of a candidate's masks against torch fp32's
AGREEMENT_MIN = 0.95  # and the lowest Dice of any prompt
CALIBRATION_SLICES = 3
CALIBRATION_ROUNDS = 3  # timed rounds after one warm-up
CALIBRATION_WINDOW = "40,400"
# another runtime replaces torch fp32 only when it is this much faster (timing noise on a busy
# machine is a few per cent)
MIN_GAIN = 1.05
MIN_STRUCTURE_PIXELS = 30  # boxes of smaller structures are left out (too few pixels to compare)
CHOICE_FILE = "runtime-choice.json"
ENV_BACKEND = "SLICERSAM_BACKEND"
ENV_PRECISION = "SLICERSAM_PRECISION"
SAMPLE = Path(__file__).resolve().parent / "sample"


@dataclass
class Choice:
    """The encoder runtime a segmenter uses and why.

    ``encoder``: the callable for ``SamPredictor.encoder`` (None: the predictor's own torch
    path). ``reason``: one line for the user. ``calibration``: {runtime name: {"ms_per_slice",
    "dice_mean", "dice_min", "agrees"}} when a calibration decided (fresh or cached).
    """

    runtime: Runtime
    encoder: Optional[Callable] = None
    reason: str = ""
    calibration: Optional[Dict[str, Dict]] = field(default=None)


def default_home() -> Path:
    """Where choices and exported graphs are kept: beside the model cache
    (``sam_core.zoo.default_cache_dir()``'s parent, ``~/.cache/slicersam`` by default)."""
    from sam_core.zoo import default_cache_dir

    return default_cache_dir().parent


def default_threads() -> int:
    """The encoder threads a segmenter uses by default (``SamPredictor``'s): calibrations are
    kept per thread count."""
    from sam_core.optimize import env_num_threads

    return env_num_threads() or torch.get_num_threads()


def _parse(value, allowed: Sequence[str], what: str) -> str:
    text = "auto" if value is None else str(value).strip().lower()
    if text != "auto" and text not in allowed:
        raise RuntimeUnavailable(f"unknown {what} {value!r}: use auto or {', '.join(allowed)}")
    return text


def requested(backend=None, precision=None) -> Tuple[str, str]:
    """(backend, precision) as asked, ``$SLICERSAM_BACKEND`` / ``$SLICERSAM_PRECISION`` where an
    argument is None, else "auto"; unknown names are refused here, before any work."""
    backend = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    precision = precision if precision is not None else os.environ.get(ENV_PRECISION) or None
    return _parse(backend, BACKENDS, "backend"), _parse(precision, PRECISIONS, "precision")


def candidates(backend: str, precision: str, device: torch.device) -> List[Runtime]:
    """The runtimes ``auto`` chooses among on ``device`` (torch fp32 first when allowed).
    Refuses (RuntimeUnavailable) a named backend that is not installed or cannot run here."""
    backends = [backend] if backend != "auto" else [b for b in BACKENDS if installed(b)]
    if device.type != "cpu":
        if backend not in ("auto", "torch"):
            raise RuntimeUnavailable(
                f"backend {backend!r} runs on the CPU; on {device.type} use torch (or auto)"
            )
        backends = ["torch"]
    out = []
    for name in backends:
        have = hardware_precisions(name, device)
        wanted = have if precision == "auto" else [precision]
        for p in wanted:
            runtime = Runtime(name, p)
            check_runtime(runtime, device)  # names the missing library or precision
            out.append(runtime)
    return out


# ------------------------------------------------------------------------------ ONNX files
def onnx_encoder_path(sam, identity: Tuple[str, str], onnx_dir=None, home=None) -> Path:
    """The encoder.onnx for this model: ``onnx_dir``'s (checked against the model), else the one
    exported into ``<home>/onnx/<model>-<sha>/`` (exported now when missing)."""
    from sam_core.onnx_export import ENCODER_FILE, export_encoder, model_metadata

    name, sha = identity
    if onnx_dir is not None:
        path = Path(onnx_dir) / ENCODER_FILE
        if not path.is_file():
            raise RuntimeUnavailable(
                f"{path} does not exist: give the folder written by "
                f"`python -m SlicerSAM export-onnx --model {name} --output DIR`"
            )
        check_onnx_model(path, name, sha)
        return path
    folder = Path(home or default_home()) / "onnx" / f"{name}-{sha[:16]}"
    path = folder / ENCODER_FILE
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, suffix=".onnx.partial")
    os.close(handle)
    try:
        logger.info("exporting %s's encoder to ONNX (once): %s", name, path)
        export_encoder(sam, partial, model_metadata(sam, name, sha))
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


def check_onnx_model(path, name: str, sha: str) -> None:
    """RuntimeUnavailable unless ONNX file ``path`` was exported from model ``name`` with
    checkpoint ``sha`` (its ``slicersam.*`` metadata)."""
    from sam_core.onnx_export import read_metadata

    try:
        meta = read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds for a bad file
        raise RuntimeUnavailable(f"{path} is not a readable ONNX file: {exc}") from None
    if not meta:
        raise RuntimeUnavailable(
            f"{path} has no SlicerSAM metadata: export it with `python -m SlicerSAM export-onnx`"
        )
    if meta.get("model") != name or meta.get("checkpoint_sha256") != sha:
        raise RuntimeUnavailable(
            f"{path} was exported from model {meta.get('model')!r} (checkpoint "
            f"{str(meta.get('checkpoint_sha256'))[:12]}), not {name!r} (checkpoint {sha[:12]}): "
            "export this model, or drop --onnx"
        )


def build_encoder(sam, runtime: Runtime, identity, onnx_dir=None, home=None, threads=None):
    """The encoder callable of ``runtime`` for this model: None for torch fp32 on the CPU (the
    predictor's own path); on a GPU every precision, fp32 included, is an explicit
    TorchEncoder."""
    if runtime == Runtime("torch", "fp32") and next(sam.parameters()).device.type == "cpu":
        return None
    path = None
    if runtime.backend != "torch":
        path = onnx_encoder_path(sam, identity, onnx_dir, home)
    return load_encoder(sam, runtime, path, threads)


# ------------------------------------------------------------------------------ calibration
def calibration_case() -> List[Tuple[np.ndarray, np.ndarray]]:
    """[(model image (H, W, 3) uint8, boxes (n, 4) XYXY model-image pixels)] of the bundled
    sample CT: CALIBRATION_SLICES axial slices spread over the ones with the most structures,
    with one box per structure of >= MIN_STRUCTURE_PIXELS pixels."""
    from SlicerSAM.intensity import model_image, parse_intensity
    from SlicerSAM.mask_geometry import box_of_mask
    from SlicerSAM.slicing import plane_for
    from SlicerSAM.volume import load_volume

    volume = load_volume(SAMPLE / "ct.nii.gz")
    labels = np.asarray(load_volume(SAMPLE / "labels.nii.gz").array)
    mapping = parse_intensity(CALIBRATION_WINDOW)
    plane = plane_for(volume, "axial")
    counts = []
    for k in range(plane.num_slices):
        grid = np.asarray(plane.grid(labels, k))
        values, sizes = np.unique(grid[grid > 0], return_counts=True)
        counts.append(int(np.count_nonzero(sizes >= MIN_STRUCTURE_PIXELS)))
    busy = [k for k in np.argsort(counts)[::-1][: 3 * CALIBRATION_SLICES]]
    chosen = sorted(busy)[:: max(len(busy) // CALIBRATION_SLICES, 1)][:CALIBRATION_SLICES]
    case = []
    for k in chosen:
        grid = np.asarray(plane.grid(labels, k))
        boxes = []
        for value in np.unique(grid[grid > 0]):
            mask = grid == value
            if np.count_nonzero(mask) >= MIN_STRUCTURE_PIXELS:
                boxes.append(box_of_mask(plane, mask))
        if boxes:
            image = model_image(plane, volume, int(k), mapping)
            case.append((image, np.stack(boxes).astype(np.float32)))
    return case


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def calibrate(sam, runtimes: Sequence[Runtime], build, progress=None) -> Dict[str, Dict]:
    """Time each runtime's encoder on :func:`calibration_case` and compare its masks with
    torch fp32's. ``build(runtime)`` returns the encoder callable (None: the torch path).
    Returns {runtime name: {"ms_per_slice", "dice_mean", "dice_min", "agrees"}}."""
    from sam_core.predictor import SamPredictor

    case = calibration_case()
    images = [image for image, _ in case]
    predictor = SamPredictor(sam)
    reference = Runtime("torch", "fp32")
    order = [reference] + [r for r in runtimes if r != reference]
    encoders = {}
    for i, runtime in enumerate(order):
        if progress:
            progress(i, len(order) + CALIBRATION_ROUNDS, f"preparing {runtime.name}")
        encoders[runtime] = build(runtime)
    times = {r: [] for r in order}
    embeddings = {}
    for round_ in range(CALIBRATION_ROUNDS + 1):  # round 0 warms up (first-call allocations)
        if progress:
            progress(len(order) + round_, len(order) + CALIBRATION_ROUNDS, "timing encoders")
        for runtime in order if round_ % 2 == 0 else order[::-1]:
            predictor.encoder = encoders[runtime]
            start = time.perf_counter()
            embeddings[runtime] = [predictor.encode(image) for image in images]
            if round_:
                times[runtime].append((time.perf_counter() - start) * 1000.0 / len(images))
    masks = {}
    predictor.encoder = None
    for runtime in order:
        out = []
        for embedding, (_, boxes) in zip(embeddings[runtime], case):
            predictor.set_embedding(embedding)
            for box in boxes:
                out.append(predictor.predict(box=box, multimask_output=False)[0][0])
        masks[runtime] = out
    result = {}
    for runtime in order:
        dice = [_dice(a, b) for a, b in zip(masks[runtime], masks[reference])]
        mean, low = float(np.mean(dice)), float(np.min(dice))
        result[runtime.name] = {
            "ms_per_slice": round(statistics.median(times[runtime]), 1),
            "dice_mean": round(mean, 4),
            "dice_min": round(low, 4),
            "agrees": bool(mean >= AGREEMENT_MEAN and low >= AGREEMENT_MIN),
            "prompts": len(dice),
        }
    return result


def fastest_agreeing(calibration: Dict[str, Dict]) -> Runtime:
    """The fastest runtime of a calibration whose masks agree with fp32 (torch fp32 always
    does: it is the reference), unless torch fp32 is within MIN_GAIN of it: a tie within the
    calibration's noise keeps the exact path that needs no export and no second library."""
    agreeing = [(v["ms_per_slice"], name) for name, v in calibration.items() if v["agrees"]]
    fastest_ms, fastest = min(agreeing)
    reference = calibration.get(Runtime().name)
    if reference is not None and reference["ms_per_slice"] <= MIN_GAIN * fastest_ms:
        return Runtime()
    return Runtime.parse(fastest)


def choice_key(identity, device: torch.device, runtimes, threads) -> str:
    """What a calibration depends on: model, checkpoint, device, CPU, threads, libraries and
    the candidates; any change calibrates again."""
    text = json.dumps(
        {
            "model": identity[0],
            "checkpoint_sha256": identity[1],
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_description(),
            "threads": threads,
            "libraries": library_versions(),
            "candidates": sorted(r.name for r in runtimes),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _read_choices(path: Path) -> Dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def request_runtime(sam, backend=None, precision=None, onnx_dir=None) -> None:
    """Ask for an encoder runtime for every segmenter later made from ``sam`` (the CLI, the
    server and the Slicer Logic say it once when they load the model). Unknown names and
    backends that cannot run here are refused now."""
    backend, precision = requested(backend, precision)
    candidates(backend, precision, next(sam.parameters()).device)
    sam._slicersam_runtime_request = (backend, precision, onnx_dir)


def choose_runtime(
    sam,
    identity: Tuple[str, str],
    backend=None,
    precision=None,
    onnx_dir=None,
    threads: Optional[int] = None,
    home=None,
    progress=None,
    recalibrate: bool = False,
) -> Choice:
    """The encoder runtime for ``sam`` (identity: (model name, checkpoint sha256)) on its
    device: the one asked for, or ``auto``'s choice (module docstring; ``recalibrate``: forget
    the stored calibration first). Refuses, before any model work, a backend that is not
    installed or cannot run here."""
    asked = getattr(sam, "_slicersam_runtime_request", None)
    if asked is not None and backend is None and precision is None and onnx_dir is None:
        backend, precision, onnx_dir = asked
    backend, precision = requested(backend, precision)
    home = Path(home or default_home())
    # one choice (and one compiled encoder) per model and request, shared by its segmenters
    memo = sam.__dict__.setdefault("_slicersam_runtime_choices", {})
    memo_key = (backend, precision, str(onnx_dir), threads, str(home))
    if memo_key not in memo or recalibrate:
        memo[memo_key] = _choose(
            sam, identity, backend, precision, onnx_dir, threads, home, progress, recalibrate
        )
    return memo[memo_key]


def _choose(
    sam, identity, backend, precision, onnx_dir, threads, home, progress, recalibrate=False
) -> Choice:
    device = next(sam.parameters()).device
    options = candidates(backend, precision, device)

    def build(runtime):
        return build_encoder(sam, runtime, identity, onnx_dir, home, threads)

    if len(options) == 1:
        runtime = options[0]
        how = "asked for" if "auto" not in (backend, precision) else "the only candidate here"
        return Choice(runtime, build(runtime), f"encoder runtime {runtime.name} ({how})")
    path = home / CHOICE_FILE
    key = choice_key(identity, device, options, threads)
    stored = None if recalibrate else _read_choices(path).get(key)
    if stored is None:
        logger.warning(
            "calibrating the image encoder's runtimes (%s) once for this machine and model; "
            "the choice is kept in %s (--backend/--precision skip this)",
            ", ".join(r.name for r in options),
            path,
        )
        calibration = calibrate(sam, options, build, progress)
        stored = {"calibration": calibration, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        choices = _read_choices(path)
        choices[key] = stored
        home.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=home, suffix=".json.partial")
        with os.fdopen(handle, "w") as f:
            json.dump(choices, f, indent=1, sort_keys=True)
        os.replace(partial, path)
        how = "calibrated now"
    else:
        how = f"calibrated {stored['when']}, cached in {path}"
    calibration = stored["calibration"]
    runtime = fastest_agreeing(calibration)
    row = calibration[runtime.name]
    fastest = min((v["ms_per_slice"], n) for n, v in calibration.items() if v["agrees"])[1]
    why = (
        f"fastest of {len(calibration)} whose masks agree with fp32"
        if runtime.name == fastest
        else f"{fastest} is not {round((MIN_GAIN - 1) * 100)} % faster"
    )
    reason = (
        f"encoder runtime {runtime.name} (auto: {why}, {row['ms_per_slice']} ms/slice, Dice mean "
        f"{row['dice_mean']:.4f} min {row['dice_min']:.4f}; {how})"
    )
    return Choice(runtime, build(runtime), reason, calibration)


# ------------------------------------------------------------------------------ export check
def check_export(sam, directory) -> Dict[str, float]:
    """Run an exported folder (encoder.onnx, decoder.onnx) with onnxruntime on the bundled sample
    CT's calibration slices and compare with PyTorch fp32: the embeddings, and the masks of every
    structure's box and of a click at each box's centre (decoder fed PyTorch's embedding).
    Returns {"embedding_max_abs", "box_dice_mean", "box_dice_min", "click_dice_mean",
    "click_dice_min", "prompts"}."""
    import onnxruntime

    from sam_core.onnx_export import DECODER_FILE, ENCODER_FILE
    from sam_core.predictor import SamPredictor
    from sam_core.transforms import apply_boxes, apply_coords

    directory = Path(directory)
    encoder = onnxruntime.InferenceSession(str(directory / ENCODER_FILE))
    decoder = onnxruntime.InferenceSession(str(directory / DECODER_FILE))
    predictor = SamPredictor(sam)
    low = sam.prompt_encoder.mask_input_size
    worst, box_dice, click_dice = 0.0, [], []
    for image, boxes in calibration_case():
        torch_embedding = predictor.encode(image)
        batch = _preprocessed(sam, image)
        onnx_features = encoder.run(None, {"image": batch})[0]
        worst = max(worst, float(np.abs(onnx_features - torch_embedding.features.numpy()).max()))
        predictor.set_embedding(torch_embedding)
        size = torch_embedding.original_size
        for box in boxes:
            centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]], np.float32)
            prompts = (
                (apply_boxes(box[None], size, torch_embedding.input_size).reshape(1, 2, 2), [2, 3]),
                (
                    np.concatenate(
                        [apply_coords(centre, size, torch_embedding.input_size), [[0.0, 0.0]]]
                    )[None],
                    [1, -1],
                ),
            )
            expected = (
                predictor.predict(box=box, multimask_output=False)[0][0],
                predictor.predict(centre, np.array([1]), multimask_output=False)[0][0],
            )
            for (coords, labels), want, out in zip(prompts, expected, (box_dice, click_dice)):
                masks = decoder.run(
                    None,
                    {
                        "image_embeddings": torch_embedding.features.numpy(),
                        "point_coords": np.asarray(coords, np.float32),
                        "point_labels": np.asarray([labels], np.float32),
                        "mask_input": np.zeros((1, 1, *low), np.float32),
                        "has_mask_input": np.zeros(1, np.float32),
                        "orig_im_size": np.asarray(size, np.float32),
                    },
                )[0]
                out.append(_dice(masks[0, 0] > sam.mask_threshold, want))
    return {
        "embedding_max_abs": worst,
        "box_dice_mean": float(np.mean(box_dice)),
        "box_dice_min": float(np.min(box_dice)),
        "click_dice_mean": float(np.mean(click_dice)),
        "click_dice_min": float(np.min(click_dice)),
        "prompts": len(box_dice),
    }


def _preprocessed(sam, image: np.ndarray) -> np.ndarray:
    """(1, 3, S, S) float32: what the encoder graph takes for ``image`` (H, W, 3) uint8."""
    from sam_core.transforms import preprocess_image

    batch, _ = preprocess_image(image, sam.preprocessing, torch.device("cpu"))
    return batch.numpy()
