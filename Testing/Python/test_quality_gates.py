"""Quality gates that CI runs through pytest: ruff over the packages and the module file."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

LINTED = ["SlicerSAM", "sam_core", "SlicerSAM.py", "Testing"]


def test_ruff_reports_no_problems():
    # ruff is a test dependency (pyproject [test]); a missing ruff must fail, not skip.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
