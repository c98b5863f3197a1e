"""How the next slice is prompted: the named propagation strategies on the propagating protocols.

Runs ``box-propagate`` and ``roi-propagate`` (docs/protocols.md) with each strategy of
``SlicerSAM.propagation.STRATEGIES`` on the same embeddings and prints the mean Dice and the
leaking structures of each: ``adaptive`` (the default: box only, calibrated per-side margins,
the intensity re-fit, the key ROI), ``published`` (LiteMedSAM's 3D inference: the previous
mask's box + 3 px in the model frame), ``box`` (a fixed 2 px margin), ``calibrated`` (no
re-fit), ``box+mask`` / ``box+point`` (the previous logits or an interior point as well), and the
box-less ``mask`` and ``point``. A last line runs ``roi-propagate`` with the default stop rules
instead of its own (inside a known range only an empty slice stops a walk). From the repository
root (``../shared`` beside it)::

    python Testing/benchmarks/bench_strategies.py [--axis axial] [--window 40,400]
        [--cache-dir DIR] [--protocols box-propagate roi-propagate] [--strategies adaptive ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DATA, case_parser, open_case  # noqa: E402

from SlicerSAM.benchmark import run_benchmark  # noqa: E402
from SlicerSAM.propagation import STRATEGIES, StopRules  # noqa: E402
from SlicerSAM.volume import load_volume  # noqa: E402


def main(argv=None) -> int:
    parser = case_parser(__doc__.split("\n")[0])
    parser.add_argument("--protocols", nargs="+", default=["box-propagate", "roi-propagate"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args(argv)
    case = open_case(args)
    if case is None:
        return 2
    segmenter, _, names = case
    reference = load_volume(DATA / "labels.nii.gz")
    print(f"{args.axis}, window {args.window}: mean Dice (leaking structures)")
    print(f"{'strategy':<12} " + " ".join(f"{p:>22}" for p in args.protocols))
    for name in args.strategies:
        t0 = time.perf_counter()
        cells = []
        for protocol in args.protocols:
            result = run_benchmark(
                segmenter.volume, reference, protocol, names, segmenter=segmenter, strategy=name
            )
            cells.append(f"{result['mean_dice']:.4f} ({result['leaks']:>2} leaks)")
        print(
            f"{name:<12} "
            + " ".join(f"{c:>22}" for c in cells)
            + f"  ({time.perf_counter() - t0:.0f} s)"
        )
    result = run_benchmark(
        segmenter.volume, reference, "roi-propagate", names, segmenter=segmenter, stop=StopRules()
    )
    print(
        f"roi-propagate with the default stop rules: {result['mean_dice']:.4f} "
        f"({result['leaks']} leaks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
