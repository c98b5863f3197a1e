"""The Slicer module's Logic on Slicer's own libraries (``slicer-core``): real MRML nodes, real
volumes and segmentations logic, the real model.

Each test runs a script in a fresh interpreter (``slicer_core_harness`` loads ``SlicerSAM.py``
the way Slicer does). Skipped with the reason where ``slicer-core`` is not installed (it has
wheels for CPython 3.10-3.13 only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from markups_files import fiducial, point, roi, write

HERE = Path(__file__).resolve().parent
CT = "ct-abdomen-3mm/ct.nii.gz"
LABELS = "ct-abdomen-3mm/labels.nii.gz"


def _slicer_core_missing() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import slicer; slicer.vtkMRMLScene"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "" if probe.returncode == 0 else "slicer-core is not installed (Python >= 3.10)"


_MISSING = _slicer_core_missing()
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "slicer-core present")


def _run(script: str, *args, timeout: int = 600) -> dict:
    """Run ``script`` with the harness importable; its last stdout line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _kidney_prompts(shared_data):
    """The left kidney (label 3) of the shared CT: a click at its most interior point on its
    largest axial slice and a 3D ROI around it with a margin of 2 voxels, in RAS mm."""
    from scipy import ndimage

    image = nib.load(str(shared_data / CT))
    kidney = np.asarray(nib.load(str(shared_data / LABELS)).dataobj) == 3  # (i, j, k)
    k = int(np.argmax(kidney.sum(axis=(0, 1))))
    depth = ndimage.distance_transform_edt(kidney[:, :, k])
    i, j = np.unravel_index(int(np.argmax(depth)), depth.shape)
    ijk = np.argwhere(kidney)
    lo = np.maximum(ijk.min(0) - 2, 0)
    hi = np.minimum(ijk.max(0) + 2, np.array(kidney.shape) - 1)
    affine = image.affine

    def ras(v):
        return (affine @ np.append(np.asarray(v, float), 1.0))[:3]

    corners = np.array([ras(lo), ras(hi)])
    centre = corners.mean(0)
    size = np.abs(corners[1] - corners[0])
    return ras((i, j, k)), centre, size, kidney


LOGIC_SEGMENT = """
    import json, sys
    import numpy as np
    import slicer_core_harness as h

    ct, click, centre, size, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    slicer, logics = h.scene()
    module = h.load_module()
    from SlicerSAM.intensity import parse_intensity

    volume = h.load_volume(logics, ct)
    positive = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*[float(v) for v in click.split(",")])
    box = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    box.SetCenter([float(v) for v in centre.split(",")])
    box.SetSize([float(v) for v in size.split(",")])

    logic = module.SlicerSAMLogic()
    logic.setVolume(volume, parse_intensity("40,400"))
    logic.loadModel()
    logic.segmentSlice(positiveNode=positive, roiNode=box)
    result = logic.propagate("both")
    segmentation = logic.ensureSegmentation()
    segment_id = logic.addSegment(segmentation, "kidney")
    logic.accept(segmentation, segment_id)
    labels = logic._segmentArray(segmentation, segment_id)
    np.save(out, labels)
    print(json.dumps({"voxels": int(labels.sum()), "summary": result.summary()}))
"""


@pytest.mark.slow
def test_cli_and_slicer_logic_give_the_same_voxels_for_a_click_inside_an_roi(
    shared_data, litemedsam_checkpoint, tmp_path
):
    """The same click and ROI, once as a markups file for the CLI and once as markups nodes in a
    real scene for the Logic: both drive the engine's session, so the voxels are identical; the
    click inside the ROI keeps what the ROI alone gives (Dice >= 0.8, nothing outside it)."""
    from SlicerSAM.cli import main

    click, centre, size, kidney = _kidney_prompts(shared_data)
    prompts = write(
        tmp_path,
        fiducial("positive", [point("P-1", click)]),
        roi("ROI", centre, size),
        name="kidney.mrk.json",
    )
    out = tmp_path / "cli.nii.gz"
    argv = ["segment", str(shared_data / CT), "--prompts", str(prompts), "--propagate"]
    assert main(argv + ["--window", "40,400", "--output", str(out), "--device", "cpu"]) == 0
    cli = np.asarray(nib.load(str(out)).dataobj) > 0  # (i, j, k)

    joined = [",".join(f"{v:.6f}" for v in x) for x in (click, centre, size)]
    info = _run(LOGIC_SEGMENT, shared_data / CT, *joined, tmp_path / "logic.npy")
    logic = np.load(tmp_path / "logic.npy").transpose(2, 1, 0) > 0  # (K, J, I) -> (i, j, k)
    assert info["voxels"] == int(cli.sum()) > 0
    assert np.array_equal(cli, logic)

    dice = 2 * (cli & kidney).sum() / (cli.sum() + kidney.sum())
    assert dice >= 0.8, dice
    ijk = np.argwhere(kidney)
    lo, hi = np.maximum(ijk.min(0) - 2, 0), ijk.max(0) + 2
    inside = np.zeros_like(cli)
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert not (cli & ~inside).any()
