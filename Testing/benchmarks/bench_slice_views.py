"""Does LiteMedSAM segment better when it sees the slice differently? box-per-slice, four views.

For every structure of ``../shared/data/ct-abdomen-3mm`` (>= 200 voxels) and every slice it is
on, the tight pixel-edge box of the reference prompts the model (the ``box-per-slice`` protocol,
the upper bound of the propagation protocols), with the image encoder given

* ``slice``: the whole slice, as the Segmenter does (the reference figure of the run);
* ``zoom``: a square crop around the box, ``--context`` box sizes on each side and at least
  ``--min-crop`` pixels wide, which the model resizes to its input like a whole slice: small
  structures get more pixels of the 64 x 64 embedding;
* ``flip-lr`` / ``flip-ud``: the slice mirrored left-right / up-down (the box mirrored with it,
  the logits mirrored back);
* ``flips``: the mean of the ``slice``, ``flip-lr`` and ``flip-ud`` logits (test-time
  augmentation).

It prints the 3D Dice of every structure in every view, the mean over structures and each view's
mean as a ratio of the ``slice`` view's. docs/propagation.md quotes its output. Run from the
repository root (about 20 minutes on 2 CPU cores: every crop is encoded on its own):

    python Testing/benchmarks/bench_slice_views.py [--axis axial] [--window 40,400]
        [--context 1.0] [--min-crop 32] [--views slice,zoom,flip-lr,flip-ud,flips]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import DATA, load_case  # noqa: E402

from SlicerSAM import protocols as P  # noqa: E402

VIEWS = ("slice", "zoom", "flip-lr", "flip-ud", "flips")


def crop_around(box, image_shape, context: float, min_side: int):
    """(x0, y0, x1, y1) integer pixel bounds of a square crop centred on the XYXY ``box`` (model
    image pixels), ``context`` box sizes wider on each side, at least ``min_side`` wide, moved
    (not shrunk) to stay inside an image of ``image_shape`` (rows, cols) where it fits."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rows, cols = image_shape
    side = int(np.ceil(max(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * context), min_side)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(np.clip(np.floor(cx - side / 2.0), 0, max(cols - side, 0)))
    top = int(np.clip(np.floor(cy - side / 2.0), 0, max(rows - side, 0)))
    return left, top, min(cols, left + side), min(rows, top + side)


def view_logits(segmenter, index, image, box, views, context, min_side, flipped):
    """{view: (rows, cols) float32 logits on the model image} for one box on slice ``index``;
    ``flipped`` caches the mirrored slices' embeddings ({(index, "lr"|"ud"): embedding})."""
    predictor = segmenter.predictor
    rows, cols = image.shape[:2]
    out = {}

    def decode(embedding, b, size):
        predictor.set_embedding(embedding)
        logits, _, _ = predictor.predict(
            box=np.asarray(b, dtype=np.float32),
            multimask_output=False,
            return_logits=True,
            output_size=size,
        )
        return np.asarray(logits[0], dtype=np.float32)

    x0, y0, x1, y1 = (float(v) for v in box)
    if {"slice", "flips"} & set(views):
        out["slice"] = decode(segmenter.embedding(index), box, (rows, cols))
    for name, flip in (("flip-lr", "lr"), ("flip-ud", "ud")):
        if name not in views and "flips" not in views:
            continue
        key = (index, flip)
        if key not in flipped:
            mirrored = image[:, ::-1] if flip == "lr" else image[::-1]
            flipped[key] = predictor.encode(np.ascontiguousarray(mirrored))
        if flip == "lr":
            logits = decode(flipped[key], (cols - x1, y0, cols - x0, y1), (rows, cols))[:, ::-1]
        else:
            logits = decode(flipped[key], (x0, rows - y1, x1, rows - y0), (rows, cols))[::-1]
        out[name] = logits
    if "flips" in views:
        out["flips"] = (out["slice"] + out["flip-lr"] + out["flip-ud"]) / 3.0
    if "zoom" in views:
        left, top, right, bottom = crop_around(box, (rows, cols), context, min_side)
        crop = np.ascontiguousarray(image[top:bottom, left:right])
        local = (x0 - left, y0 - top, x1 - left, y1 - top)
        logits = np.full((rows, cols), -np.inf, dtype=np.float32)
        logits[top:bottom, left:right] = decode(predictor.encode(crop), local, crop.shape[:2])
        out["zoom"] = logits
    return {v: out[v] for v in views}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--window", default="40,400")
    parser.add_argument("--context", type=float, default=1.0, help="zoom: box sizes each side")
    parser.add_argument("--min-crop", type=int, default=32, help="zoom: smallest crop (pixels)")
    parser.add_argument("--views", default=",".join(VIEWS))
    args = parser.parse_args(argv)
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or "slice" not in views:
        parser.error(f"--views takes {', '.join(VIEWS)} and must hold slice; got {args.views}")
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    segmenter, reference, names = load_case(args.axis, args.window)
    plane = segmenter.plane
    structures = P.select_structures(reference, names, 200)
    # per structure and view: (intersection, predicted + reference pixels), summed over slices
    sums = {name: {v: [0, 0] for v in views} for _, name, _ in structures}
    flipped = {}
    for index in range(plane.num_slices):
        model_image = segmenter.model_image(index)
        for label, name, _ in structures:
            grid = np.asarray(plane.grid(reference == label, index), dtype=bool)
            if not grid.any():
                continue
            box = P.reference_box(plane, grid)
            ref = plane.to_image(grid.astype(np.float32), order=0) >= 0.5
            logits = view_logits(
                segmenter, index, model_image, box, views, args.context, args.min_crop, flipped
            )
            for view, lg in logits.items():
                mask = lg > 0.0
                sums[name][view][0] += int(np.logical_and(mask, ref).sum())
                sums[name][view][1] += int(mask.sum() + ref.sum())
        flipped.clear()  # one slice's mirrored embeddings at a time
    print(
        f"{len(structures)} structures, box-per-slice, {args.axis}, window {args.window}, "
        f"zoom context {args.context} (crop >= {args.min_crop} px) "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'structure':30s}" + "".join(f"{v:>9s}" for v in views))
    dice = {v: [] for v in views}
    for name, per_view in sums.items():
        row = []
        for view in views:
            inter, total = per_view[view]
            dice[view].append(2.0 * inter / total if total else 1.0)
            row.append(dice[view][-1])
        print(f"{name:30s}" + "".join(f"{d:9.3f}" for d in row))
    means = {v: float(np.mean(dice[v])) for v in views}
    print(f"{'mean':30s}" + "".join(f"{means[v]:9.4f}" for v in views))
    print(f"{'ratio to slice':30s}" + "".join(f"{means[v] / means['slice']:9.3f}" for v in views))
    return 0


if __name__ == "__main__":
    sys.exit(main())
