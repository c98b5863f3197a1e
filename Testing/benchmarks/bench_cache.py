"""Benchmark the lazy per-slice embedding cache on the 112-slice CT.

Measures, with the default model (LiteMedSAM unless --model):

- slices encoded for a single-slice prompt on the 112-slice volume (expected: 1);
- cold prompt-to-mask latency (slice extraction + encode + decode), the first prompt on a slice;
- warm latency (the embedding is cached: decode only), later prompts on the same slice: a box
  (one decode), a new click (with a box-trained model such as LiteMedSAM, the box search of
  ``SlicerSAM.box_search``: 11 decodes) and a negative click added to the last click (the
  search re-ranks the decodes it remembers);
- disk latency: a new cache instance (a new session) reading the slice from the disk tier;
- cache memory per slice, float16 and float32.

Run from the repository root:

    python Testing/benchmarks/bench_cache.py [--device cpu|cuda|auto] [--repeats 5]

Not a pytest test: it prints a table (and, with --json, writes the figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_text  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "ct-abdomen-3mm" / "ct-112-slices.nii.gz"


def _ms(fn):
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--model", default=None, help="model name (default: the zoo's default)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="cold slices / warm prompts")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from sam_core.zoo import DEFAULT_MODEL, load_model
    from SlicerSAM.cache import EmbeddingCache
    from SlicerSAM.prompts import Box, Point, Prompts
    from SlicerSAM.segmenter import Segmenter
    from SlicerSAM.volume import load_volume

    model_name = args.model or DEFAULT_MODEL
    volume = load_volume(args.image)
    load_ms, sam = _ms(lambda: load_model(model_name, args.checkpoint, device=args.device))

    sam_device = next(sam.parameters()).device

    def sync():  # CUDA kernels run asynchronously: time the work, not its launch
        if sam_device.type == "cuda":
            torch.cuda.synchronize(sam_device)

    probe = Segmenter(volume, sam)
    plane = probe.plane
    rows, cols = plane.grid_shape
    n = plane.num_slices

    def click(index, shift=0, negative=False):
        """A click near the slice centre (``shift`` voxels along the rows), in voxel
        coordinates; ``negative`` adds a negative click a quarter of the slice away."""
        kji = np.zeros(3)
        kji[plane.axis], kji[plane.row_axis], kji[plane.col_axis] = index, rows // 2, cols // 2
        kji[plane.row_axis] += shift
        points = [Point(kji)]
        if negative:
            away = kji.copy()
            away[plane.col_axis] += cols // 4
            points.append(Point(away, positive=False))
        return Prompts(points=tuple(points), frame="kji")

    def box(index):
        a, b = np.zeros(3), np.zeros(3)
        a[plane.axis] = b[plane.axis] = index
        a[plane.row_axis], b[plane.row_axis] = rows // 4, 3 * rows // 4
        a[plane.col_axis], b[plane.col_axis] = cols // 4, 3 * cols // 4
        return Prompts(box=Box(a, b), frame="kji")

    # warm-up: the first call pays one-off costs (allocator, kernels); not a user-visible figure
    probe.segment_prompts(click(0))
    sync()

    # 1. slices encoded for one single-slice prompt, on a fresh segmenter
    seg = Segmenter(volume, sam)
    key_slice = n // 2
    seg.segment_prompts(click(key_slice))
    slices_for_one_prompt = seg.stats.slices_encoded

    # 2. cold: the first prompt on a slice never seen (fresh cache each time)
    cold = []
    cold_slices = np.linspace(1, n - 1, args.repeats).round().astype(int)
    for index in cold_slices:
        fresh = Segmenter(volume, sam)
        ms, _ = _ms(lambda fresh=fresh, index=index: (fresh.segment_prompts(box(index)), sync()))
        cold.append(ms)

    # 3. warm: more prompts on the slice encoded in step 1: boxes, new clicks (a new position
    # each time, so the box search decodes anew), a negative click added to the last click
    warm, warm_click, warm_negative = [], [], []
    for r in range(args.repeats):
        ms, _ = _ms(lambda: (seg.segment_prompts(box(key_slice)), sync()))
        warm.append(ms)
        ms, _ = _ms(lambda r=r: (seg.segment_prompts(click(key_slice, 3 * (r + 1))), sync()))
        warm_click.append(ms)
        negative = click(key_slice, 3 * (r + 1), negative=True)
        ms, _ = _ms(lambda negative=negative: (seg.segment_prompts(negative), sync()))
        warm_negative.append(ms)
    assert seg.stats.slices_encoded == slices_for_one_prompt, "warm prompts encoded again"

    # 4. disk: a new cache instance (a new session) finds the slice on disk
    with tempfile.TemporaryDirectory() as tmp:
        Segmenter(volume, sam, cache=EmbeddingCache(disk_dir=tmp)).embedding(key_slice)
        again = Segmenter(volume, sam, cache=EmbeddingCache(disk_dir=tmp))
        disk_ms, _ = _ms(lambda: (again.segment_prompts(box(key_slice)), sync()))
        disk_encoded = again.stats.slices_encoded
        file_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.pt")) / 2**20

    # 5. memory per cached slice
    embedding = seg.embedding(key_slice)
    per_slice = {}
    for half in (True, False):
        cache = EmbeddingCache(half_precision=half)
        cache.put(probe.cache_key(key_slice), embedding)
        per_slice["float16" if half else "float32"] = cache.stats.bytes / 2**20

    figures = {
        "image": str(args.image),
        "volume_shape_kji": list(volume.shape),
        "num_slices": n,
        "model": seg.model_name,
        "device": str(seg.device),
        "model_load_ms": round(load_ms, 1),
        "slices_encoded_for_one_prompt": slices_for_one_prompt,
        "cold_prompt_to_mask_ms_median": round(statistics.median(cold), 1),
        "cold_prompt_to_mask_ms": [round(v, 1) for v in cold],
        "warm_prompt_to_mask_ms_median": round(statistics.median(warm), 1),
        "warm_prompt_to_mask_ms": [round(v, 1) for v in warm],
        "point_prompts": seg.point_prompts,
        "warm_click_to_mask_ms_median": round(statistics.median(warm_click), 1),
        "warm_click_to_mask_ms": [round(v, 1) for v in warm_click],
        "warm_negative_click_to_mask_ms_median": round(statistics.median(warm_negative), 1),
        "disk_prompt_to_mask_ms": round(disk_ms, 1),
        "disk_slices_encoded": disk_encoded,
        "disk_file_mb": round(file_mb, 3),
        "cache_mb_per_slice_float16": round(per_slice["float16"], 3),
        "cache_mb_per_slice_float32": round(per_slice["float32"], 3),
        "slices_per_512_mb_float16": int(512 // per_slice["float16"]),
        "timing": seg.timing(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_text(),
    }

    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"volume {args.image} {volume.shape} (K, J, I), {n} {plane.orientation} slices")
    print(f"model {seg.model_name} on {seg.device} (loaded in {load_ms:.0f} ms)")
    print(f"CPU: {cpu_text()}, torch threads {torch.get_num_threads()}")
    print()
    print(f"{'measure':<48} {'value':>12}")
    print("-" * 61)
    rows_out = [
        ("slices encoded for a single-slice prompt", f"{slices_for_one_prompt}"),
        ("cold prompt -> mask, ms (median, encode+decode)", f"{statistics.median(cold):.1f}"),
        ("warm box -> mask, ms (median, cached)", f"{statistics.median(warm):.1f}"),
        (
            f"warm new click -> mask, ms (median; {seg.point_prompts})",
            f"{statistics.median(warm_click):.1f}",
        ),
        ("warm + a negative click -> mask, ms (median)", f"{statistics.median(warm_negative):.1f}"),
        ("new session, slice on disk -> mask, ms", f"{disk_ms:.1f}"),
        ("cache memory per slice, MB (float16)", f"{per_slice['float16']:.2f}"),
        ("cache memory per slice, MB (float32)", f"{per_slice['float32']:.2f}"),
        ("slices in the default 512 MB budget (float16)", f"{int(512 // per_slice['float16'])}"),
    ]
    for name, value in rows_out:
        print(f"{name:<48} {value:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
