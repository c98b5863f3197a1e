"""Segment everything on CT slices: how many reference structures are among the candidates.

For slices a quarter, half and three quarters through ``../shared/data/ct-abdomen-3mm`` along
each axis, :func:`SlicerSAM.everything.segment_everything` (LiteMedSAM, window L40/W400) gives
the candidates; every reference structure with >= 20 voxels on the slice is matched to its
best candidate by Dice. Printed per axis: recall at Dice >= 0.5 and >= 0.8, the mean best Dice,
candidates per slice, and seconds per slice (decoding only: the slices are encoded first);
``--unfiltered`` also prints the same figures before the confidence filters (every mask of the
grid), ``--points-per-side N`` another grid, ``--prompt boxes`` square boxes of several sizes
around each grid point instead of the default click made a box by the click search.
docs/benchmarks.md ("Segment everything") quotes its output. From the repository root:

    python Testing/benchmarks/bench_everything.py [--cache-dir DIR] [--unfiltered]
        [--points-per-side N] [--prompt search|boxes]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from bench_common import DATA, cpu_text, load_case

from SlicerSAM.cache import EmbeddingCache
from SlicerSAM.everything import BOX_FILTERS, BOX_POINTS_PER_SIDE, segment_everything


def best_dice(candidates, reference: np.ndarray) -> dict:
    """{label value: best Dice over the candidates} for structures of >= 20 voxels."""
    out = {}
    for value in np.unique(reference):
        r = reference == value
        if value == 0 or r.sum() < 20:
            continue
        out[int(value)] = max(
            (2 * (c.mask & r).sum() / (c.mask.sum() + r.sum()) for c in candidates), default=0.0
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="keep slice embeddings in this folder")
    parser.add_argument("--points-per-side", type=int, default=BOX_POINTS_PER_SIDE)
    parser.add_argument("--unfiltered", action="store_true", help="also without the filters")
    parser.add_argument(
        "--prompt", choices=("boxes", "search"), default="search", help="grid of clicks or boxes"
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 1
    cache = EmbeddingCache(budget_mb=2048, disk_dir=args.cache_dir)
    print(cpu_text())
    print(
        f"LiteMedSAM, {args.points_per_side} x {args.points_per_side} grid of {args.prompt}, "
        f"filters {BOX_FILTERS}"
    )
    variants = [("filtered", {})]
    if args.unfiltered:
        variants.append(("unfiltered", dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)))
    rows = []
    for axis in ("axial", "coronal", "sagittal"):
        segmenter, reference, names = load_case(axis, "40,400", cache)
        n = segmenter.num_slices
        slices = [n // 4, n // 2, 3 * n // 4]
        segmenter.encode_many(slices)
        for label, options in variants:
            found, counts, seconds = [], [], []
            for k in slices:
                start = time.perf_counter()
                candidates = segment_everything(
                    segmenter,
                    k,
                    points_per_side=args.points_per_side,
                    prompt=args.prompt,
                    **options,
                )
                seconds.append(time.perf_counter() - start)
                counts.append(len(candidates))
                ref = np.asarray(segmenter.plane.grid(reference, k))
                found += list(best_dice(candidates, ref).values())
            f = np.asarray(found)
            rows.append(
                f"| {axis} | {label} | {len(f)} | {(f >= 0.5).mean():.2f} "
                f"| {(f >= 0.8).mean():.2f} | {f.mean():.3f} | {np.mean(counts):.0f} "
                f"| {np.mean(seconds):.1f} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| axis | masks | structures | recall@0.5 | recall@0.8 | mean best Dice "
        "| candidates/slice | s/slice |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
