"""Correction clicks on a box-trained model: how the box search should weigh the clicks.

Replays the ``clicks-N`` protocol (docs/protocols.md: a click at the most interior point of the
reference, then each next click at the most interior point of the largest error region) with up
to 5 clicks on every slice of every structure of ``../shared/data/ct-abdomen-3mm`` (>= 200
voxels), with LiteMedSAM, and
prints the mean over structures of the 3D Dice after 1, 2, ... 5 clicks. Each click is added to
an :class:`~SlicerSAM.session.InteractiveSession` as ``clicks-N`` adds it (the first answered by
the box search, the later ones correcting the mask), so after 3 and 5 clicks it measures what
``clicks-3`` and ``clicks-5`` do (the benchmark's figures, docs/benchmarks.md, and the
replay's agree within 0.003); a slice where nothing is wrong stops early.

``--variant`` replaces how the box search counts a candidate mask's clicks when it ranks them
(``clicks_honoured`` as ``rank_boxes`` calls it), to compare
the default with what was tried before it (docs/propagation.md, "Clicks for box-trained models"):

* ``default``: the module as it is: positive clicks honoured first, then negative ones; clicks
  of one label on one pixel count once; the edge tolerance of ``--tolerance`` pixels;
* ``count``: the number of clicks honoured, positive and negative alike, each click counted;
* ``anchored``: masks covering a positive click's own pixel first, then ``count``;
* ``positive-first``: the default without counting a repeated click once.

From the repository root (about 8 minutes per variant on one core once the slices are encoded):

    python Testing/benchmarks/bench_click_ranking.py [--variant default] [--tolerance 1.5]
        [--axis axial] [--window 40,400] [--cache-dir DIR]
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import case_parser, open_case  # noqa: E402

import SlicerSAM.box_search as box_search  # noqa: E402
from SlicerSAM.mask_geometry import grid_to_image_mask  # noqa: E402
from SlicerSAM.protocols import error_click, select_structures  # noqa: E402

CLICKS = 5
VARIANTS = ("default", "count", "anchored", "positive-first")


def each_click(mask, points_xy, point_labels, tolerance):
    """(whether the mask covers a positive click's own pixel, [honoured] per click, repeats
    kept): the module's rule for one click (``clicks_honoured``), without its merging of repeated
    clicks."""
    from scipy import ndimage

    xy = np.asarray(points_xy, np.float64).reshape(-1, 2)
    labels = np.asarray(point_labels).reshape(-1)
    cols = np.clip(np.rint(xy[:, 0]).astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(int), 0, mask.shape[0] - 1)
    anchored = bool(np.any(mask[rows, cols] & (labels == 1)))
    reach_in, reach_out = mask, ~mask
    if anchored and tolerance > 0:
        r = int(np.floor(tolerance))
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = dy * dy + dx * dx <= tolerance * tolerance
        reach_in = ndimage.binary_dilation(mask, disk)
        reach_out = ndimage.binary_dilation(~mask, disk)
    honoured = [
        bool(reach_in[y, x] if label == 1 else reach_out[y, x])
        for y, x, label in zip(rows, cols, labels)
    ]
    return anchored, honoured, labels


def counting(variant: str, tolerance: float):
    """A ``clicks_honoured`` for ``variant``: the pair search_box ranks by (larger first)."""
    if variant == "default":
        return functools.partial(box_search.clicks_honoured, tolerance=tolerance)

    def honoured(mask, points_xy, point_labels, **_):
        mask = np.asarray(mask, dtype=bool)
        anchored, each, labels = each_click(mask, points_xy, point_labels, tolerance)
        if variant == "count":
            return sum(each), 0
        if variant == "anchored":
            return int(anchored), sum(each)
        positive = sum(h for h, label in zip(each, labels) if label == 1)
        return positive, sum(each) - positive

    return honoured


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def replay(segmenter, reference, names) -> dict:
    """{structure: [3D Dice after 1 .. CLICKS clicks]}, clicks-N on every slice it is on, each
    click added to an :class:`InteractiveSession` as the ``clicks-N`` protocol adds it."""
    from SlicerSAM.session import InteractiveSession

    plane = segmenter.plane
    out = {}
    for label, name, _ in select_structures(reference, names, 200):
        mask3d = reference == label
        after = [np.zeros(mask3d.shape, dtype=bool) for _ in range(CLICKS)]
        session = InteractiveSession(segmenter=segmenter)
        for index in range(plane.num_slices):
            ref = np.asarray(plane.grid(mask3d, index), dtype=bool)
            if not ref.any():
                continue
            ref_img = grid_to_image_mask(plane, ref)
            mask = np.zeros(plane.grid_shape, dtype=bool)
            for n in range(CLICKS):
                click = error_click(grid_to_image_mask(plane, mask), ref_img)
                if click is not None:  # else nothing is wrong: the mask stays
                    session.add_click(index, click[:2], positive=bool(click[2]))
                    mask = session.keys[index].mask
                plane.set_grid(after[n], index, mask)
        out[name] = [dice(pred, mask3d) for pred in after]
        print(f"  {name}: " + " ".join(f"{d:.3f}" for d in out[name]), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    parser = case_parser(__doc__.split("\n")[0])
    parser.add_argument("--variant", default="default", choices=VARIANTS)
    parser.add_argument("--tolerance", type=float, default=box_search.CLICK_TOLERANCE_PX)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    original, variant = box_search.clicks_honoured, counting(args.variant, args.tolerance)

    def ranking_only(mask, points_xy, point_labels, *rest, **options):
        # rank_boxes counts with three arguments; honours_all (whether a mask agrees with every
        # click, a yes/no the session and the corrections rely on) passes a tolerance and keeps
        # the module's own rule
        if rest or options:
            return original(mask, points_xy, point_labels, *rest, **options)
        return variant(mask, points_xy, point_labels)

    box_search.clicks_honoured = ranking_only
    case = open_case(args)
    if case is None:
        return 2
    segmenter, reference, names = case
    segmenter.point_prompts = "box"
    dices = replay(segmenter, reference, names)
    means = " ".join(f"{np.mean([d[n] for d in dices.values()]):.4f}" for n in range(CLICKS))
    print(
        f"{args.variant}, tolerance {args.tolerance:g} px, {args.axis}, window {args.window}, "
        f"{len(dices)} structures: mean Dice after 1..{CLICKS} clicks {means} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
