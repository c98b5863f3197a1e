"""What each rule of a correction is worth: ``click-correct`` with one rule switched off at a time.

``click-correct`` (docs/protocols.md): one click on each structure's largest slice, propagation,
one correction click on the slice with the largest error, propagation again. The corrections'
rules (docs/prompts.md, "How prompts combine"; docs/propagation.md, "Corrections") are switched
off one at a time, on the same run's embeddings:

* ``default``: as shipped;
* ``whole walk``: a correction on a slice the first propagation had reached recomputes the walk
  beyond it too (``propagate(previous_keys=None)``);
* ``no rejoin``: a recomputed walk never stops where it rejoins the earlier result;
* ``no size prior``: a click's candidates are not measured against the nearest slices' masks;
* ``no keep``: a positive correction does not prefer the masks that keep the corrected one;
* ``replace``: a correction with positive clicks only replaces the mask by the candidate that
  wins instead of growing the mask by it.

Prints, per variant, the mean Dice before and after the correction and the leaking structures.
From the repository root (``../shared`` beside it)::

    python Testing/benchmarks/bench_corrections.py [--axis axial] [--window 40,400]
        [--cache-dir DIR]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DATA, case_parser, open_case  # noqa: E402

import SlicerSAM.propagation as propagation  # noqa: E402
import SlicerSAM.segmenter as segmenter_module  # noqa: E402
import SlicerSAM.session as session_module  # noqa: E402
import SlicerSAM.walk as walk_module  # noqa: E402
from SlicerSAM.benchmark import run_benchmark  # noqa: E402
from SlicerSAM.volume import load_volume  # noqa: E402


@contextlib.contextmanager
def switched(module, name, value):
    """``module.name`` set to ``value`` while the block runs."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def whole_walk():
    original = propagation.propagate

    def propagate(*args, **kwargs):
        kwargs["previous_keys"] = None
        return original(*args, **kwargs)

    return switched(propagation, "propagate", propagate)


VARIANTS = {
    "default": contextlib.nullcontext,
    "whole walk": whole_walk,
    "no rejoin": lambda: switched(walk_module, "REJOIN_DICE", 2.0),
    "no size prior": lambda: switched(session_module, "LEAK_GROWTH", float("inf")),
    "no keep": lambda: switched(segmenter_module, "KEEP_FRACTION", 0.0),
    "replace": lambda: switched(segmenter_module, "POSITIVE_CORRECTIONS_GROW", False),
}


def main(argv=None) -> int:
    args = case_parser(__doc__.split("\n")[0]).parse_args(argv)
    case = open_case(args)
    if case is None:
        return 2
    segmenter, _, names = case
    reference = load_volume(DATA / "labels.nii.gz")
    print(f"click-correct, {args.axis}, window {args.window}, {len(names)} label names")
    for name, variant in VARIANTS.items():
        t0 = time.perf_counter()
        with variant():
            result = run_benchmark(
                segmenter.volume, reference, "click-correct", names, segmenter=segmenter
            )
        leaks = sorted(n for n, row in result["structures"].items() if row["leak"])
        print(
            f"{name:<14} mean Dice {result['mean_dice_before']:.4f} -> {result['mean_dice']:.4f} "
            f"({result['mean_dice'] - result['mean_dice_before']:+.4f}), {len(leaks)} leaks "
            f"({time.perf_counter() - t0:.0f} s): {', '.join(leaks)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
