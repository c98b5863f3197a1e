"""What the benchmark scripts on the shared sample CT share: its path, the options, loading it.

Imported by the scripts in this folder (run from the repository root with ``../shared`` beside
it): ``case_parser`` gives --axis, --window and --cache-dir, ``open_case`` the LiteMedSAM
segmenter over the CT, its reference label map and the structure names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from SlicerSAM.cache import EmbeddingCache  # noqa: E402
from SlicerSAM.intensity import parse_intensity  # noqa: E402
from SlicerSAM.segmenter import Segmenter  # noqa: E402
from SlicerSAM.volume import load_volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ct-abdomen-3mm"


def load_case(axis: str, window: str, cache=None):
    """(LiteMedSAM Segmenter on the CPU over the sample CT, the reference label map as an int64
    array on the CT's voxel grid, {label value: structure name}) for the benchmarks on ``DATA``;
    ``cache``: an EmbeddingCache to share (None: a private one)."""
    image = load_volume(DATA / "ct.nii.gz")
    reference = np.asarray(load_volume(DATA / "labels.nii.gz").array).astype(np.int64)
    names = {int(k): v for k, v in json.loads((DATA / "labels.json").read_text()).items()}
    segmenter = Segmenter(
        image,
        "litemedsam",
        orientation=axis,
        intensity=parse_intensity(window),
        device="cpu",
        cache=cache,
    )
    return segmenter, reference, names


def case_parser(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarks on ``DATA``: --axis, --window, --cache-dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--window", default="40,400")
    parser.add_argument("--cache-dir", help="keep slice embeddings in this folder")
    return parser


def open_case(args):
    """:func:`load_case` for the options of :func:`case_parser`, with a 2 GB embedding cache
    (on disk under --cache-dir); None, with a message, when the shared data is missing."""
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return None
    cache = EmbeddingCache(budget_mb=2048, disk_dir=args.cache_dir)
    return load_case(args.axis, args.window, cache)


# the CPU model, logical CPUs and the flags that decide precisions and kernels, printed with
# every speed figure (machines differ from run to run)
from sam_core.runtimes import cpu_text  # noqa: E402,F401
