"""One click on a box-trained model: which box around it should the model be given?

For every structure of ``../shared/data/ct-abdomen-3mm`` (>= 200 voxels) and three of its slices
(the largest, and those a quarter and three quarters through its extent) this puts one positive
click at the reference's most interior point, prompts LiteMedSAM with square boxes of every
half-size in ``SIZES_MM`` around it, and records each candidate's mask Dice against the
reference, predicted IoU, stability score, whether its mask holds the click, and its
self-consistency (the Dice with the mask of its own tight box). Ranking rules are then replayed
on the recording. It prints the mean Dice over slices of the mask each rule picks:

* ``oracle``: the candidate with the best Dice (reads the reference);
* ``fixed N mm``: always the same half-size;
* rankings among the candidates that hold the click, over all sizes and without the smallest
  and largest;
* ``search_box (default)``: :func:`SlicerSAM.box_search.search_box` itself through the segmenter
  (``point_prompts="box"``), not a replay: its line is what users get;
* ``model's own point prompt``: the click given to LiteMedSAM as a point (the best of its three
  candidates by predicted IoU), the behaviour before the box search.

docs/propagation.md ("Clicks for box-trained models") quotes its output. From the repository
root (about 2 minutes per axis on 2 cores once the slices are encoded):

    python Testing/benchmarks/bench_click_boxes.py [--axis axial] [--window 40,400]
        [--cache-dir DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import case_parser, open_case  # noqa: E402

from SlicerSAM.box_search import (  # noqa: E402
    HALF_SIZES_MM,
    RERANK,
    candidate_boxes,
    clicks_honoured,
    stability_score,
    tight_box,
)
from SlicerSAM.prompts import SlicePrompts  # noqa: E402
from SlicerSAM.propagation import interior_point  # noqa: E402
from SlicerSAM.protocols import select_structures  # noqa: E402

# every half-size measured: the default's, and one step beyond each end
SIZES_MM = (4.0,) + tuple(HALF_SIZES_MM) + (108.0,)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def slices_of(plane, mask3d: np.ndarray) -> list:
    """The largest slice of a structure and those a quarter and three quarters through it."""
    areas = [int(np.asarray(plane.grid(mask3d, k)).sum()) for k in range(plane.num_slices)]
    present = [k for k, a in enumerate(areas) if a > 0]
    picks = {int(np.argmax(areas)), present[len(present) // 4], present[3 * len(present) // 4]}
    return sorted(picks)


def to_image(plane, grid: np.ndarray) -> np.ndarray:
    if tuple(plane.image_shape) == tuple(plane.grid_shape):
        return np.asarray(grid, dtype=bool)
    return np.asarray(plane.to_image(np.asarray(grid, np.float32), order=1)) >= 0.5


def record(segmenter, reference, names) -> list:
    """[{"name", "index", "click", "candidates": [{"half", "dice", "iou", "stability",
    "holds", "consistency"}], "default": Dice of search_box's pick, "model": Dice of the point
    prompt}] for every structure and slice."""
    plane = segmenter.plane
    pixel = float(min(plane.pixel_spacing))
    out = []
    for label, name, _ in select_structures(reference, names, 200):
        mask3d = reference == label
        for index in slices_of(plane, mask3d):
            ref = np.asarray(plane.grid(mask3d, index), dtype=bool)
            x, y = interior_point(to_image(plane, ref))
            click, labels = np.array([[x, y]]), np.array([1])
            boxes = candidate_boxes(click, labels, plane.image_shape, pixel, SIZES_MM)
            candidates = []
            for half, box in zip(SIZES_MM, boxes):
                result = segmenter.segment(index, SlicePrompts(index, box_xyxy=box), False)
                image = to_image(plane, result.mask)
                again = tight_box(image)
                consistency = 0.0
                if again is not None:
                    second = segmenter.segment(index, SlicePrompts(index, box_xyxy=again), False)
                    consistency = dice(to_image(plane, second.mask), image)
                candidates.append(
                    {
                        "half": half,
                        "dice": dice(result.mask, ref),
                        "iou": float(result.iou[0]),
                        "stability": stability_score(result.low_res_logits[0]),
                        "holds": clicks_honoured(image, click, labels)[0] == 1,
                        "consistency": consistency,
                    }
                )
            prompts = SlicePrompts(index, points_xy=click, point_labels=labels)
            segmenter.point_prompts = "box"
            searched = segmenter.segment(index, prompts, multimask=False).mask
            segmenter.point_prompts = "model"
            own = segmenter.segment(index, prompts, multimask=True).mask
            out.append(
                {
                    "name": name,
                    "index": index,
                    "candidates": candidates,
                    "default": dice(searched, ref),
                    "model": dice(own, ref),
                }
            )
        print(f"  {name}", file=sys.stderr, flush=True)
    return out


def pick(candidates, sizes, score, rerank=None):
    """Replay a ranking: among the candidates of ``sizes`` that hold the click (all of them
    when none does), the best ``score``; with ``rerank``, the best ``rerank`` by ``score`` are
    ranked again by score x consistency (as search_box does)."""
    pool = [c for c in candidates if c["half"] in sizes]
    holding = [c for c in pool if c["holds"]] or pool
    ranked = sorted(holding, key=lambda c: -score(c))
    if rerank:
        ranked = sorted(ranked[:rerank], key=lambda c: -score(c) * c["consistency"])
    return ranked[0]


def main(argv=None) -> int:
    args = case_parser(__doc__.split("\n")[0]).parse_args(argv)
    t0 = time.perf_counter()
    case = open_case(args)
    if case is None:
        return 2
    segmenter, reference, names = case
    rows = record(segmenter, reference, names)
    print(
        f"{len(rows)} slices of {len({r['name'] for r in rows})} structures, {args.axis}, "
        f"window {args.window}, one click at the most interior point "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    def line(label, chooser):
        print(f"{label:50s} {np.mean([chooser(r) for r in rows]):.4f}")

    line(
        "oracle (best candidate by the reference)",
        lambda r: max(c["dice"] for c in r["candidates"]),
    )
    for half in SIZES_MM:
        line(
            f"fixed {half:g} mm",
            lambda r, h=half: [c for c in r["candidates"] if c["half"] == h][0]["dice"],
        )
    default_sizes = set(HALF_SIZES_MM)
    rules = (
        ("predicted IoU", lambda c: c["iou"], None),
        ("IoU x stability", lambda c: c["iou"] * c["stability"], None),
        ("IoU x consistency", lambda c: c["iou"] * c["consistency"], None),
        (
            "IoU x stability x consistency (all)",
            lambda c: c["iou"] * c["stability"] * c["consistency"],
            None,
        ),
        (
            f"IoU x stability, best {RERANK} x consistency",
            lambda c: c["iou"] * c["stability"],
            RERANK,
        ),
    )
    for sizes, text in (
        (set(SIZES_MM), f"{SIZES_MM[0]:g}-{SIZES_MM[-1]:g} mm"),
        (default_sizes, f"{HALF_SIZES_MM[0]:g}-{HALF_SIZES_MM[-1]:g} mm"),
    ):
        for label, score, rerank in rules:
            line(
                f"{label}, {text}",
                lambda r, s=score, k=rerank, z=sizes: pick(r["candidates"], z, s, k)["dice"],
            )
    line("search_box (default)", lambda r: r["default"])
    line("model's own point prompt", lambda r: r["model"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
