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
    # a zero-size ROI is refused as the CLI refuses it (the widget shows the message)
    flat = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "flat")
    flat.SetCenter([float(v) for v in centre.split(",")])
    flat.SetSize([10.0, 10.0, 10.0])  # placed, then dragged down to nothing
    flat.SetSize([0.0, 0.0, 0.0])
    try:
        logic.segmentSlice(roiNode=flat)
        refused = ""
    except Exception as error:
        refused = str(error)
    logic.segmentSlice(positiveNode=positive, roiNode=box)
    result = logic.propagate("both")
    segmentation = logic.ensureSegmentation()
    segment_id = logic.addSegment(segmentation, "kidney")
    logic.accept(segmentation, segment_id)
    labels = logic._segmentArray(segmentation, segment_id)
    np.save(out, labels)
    print(json.dumps({
        "voxels": int(labels.sum()), "summary": result.summary(), "refused": refused
    }))
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
    assert info["refused"].startswith("the box has zero size")
    assert info["voxels"] == int(cli.sum()) > 0
    assert np.array_equal(cli, logic)

    dice = 2 * (cli & kidney).sum() / (cli.sum() + kidney.sum())
    assert dice >= 0.8, dice
    ijk = np.argwhere(kidney)
    lo, hi = np.maximum(ijk.min(0) - 2, 0), ijk.max(0) + 2
    inside = np.zeros_like(cli)
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert not (cli & ~inside).any()


GEOMETRY = """
    import json, sys
    import numpy as np
    import slicer_core_harness as h

    slicer, logics = h.scene()
    module = h.load_module()
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.slicing import plane_for

    array = (np.arange(12 * 16 * 20) % 251).astype(np.int16).reshape(12, 16, 20)  # (K, J, I)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    matrices = {
        "RAS": np.diag([3.0, 2.0, 1.5, 1.0]),
        "LPS-ordered": np.diag([-3.0, -2.0, 1.5, 1.0]),
        "oblique": np.array(
            [[3 * c, -2 * s, 0, 10.0], [3 * s, 2 * c, 0, -20.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]]
        ),
    }
    voxel = np.array([5.0, 7.0, 9.0])  # (k, j, i)
    logic = module.SlicerSAMLogic()
    out = {"views": {n: logic.orientationOfView(n) for n in ("Red", "Yellow", "Green")}}
    for name, matrix in matrices.items():
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
        logic.setVolume(node, parse_intensity("40,400"))
        ras = (matrix @ np.append(voxel[::-1], 1.0))[:3]
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        point.AddControlPoint(*ras)
        corners = np.array([[4, 6, 8], [6, 9, 11]], float)  # (k, j, i)
        ras_corners = [(matrix @ np.append(k[::-1], 1.0))[:3] for k in corners]
        lo, hi = np.min(ras_corners, 0), np.max(ras_corners, 0)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(((lo + hi) / 2).tolist())
        roi.SetSize((hi - lo).tolist())
        row = {
            "matrix": bool(np.allclose(logic.volume.ijk_to_ras, matrix)),
            "array": bool(np.array_equal(logic.volume.array, array)),
        }
        for view in ("Red", "Yellow", "Green"):
            orientation = logic.orientationOfView(view)
            logic.setOrientation(orientation)
            plane = plane_for(logic.volume, orientation)
            index, _ = plane.voxel_to_xy(voxel[None])
            slices = logic.promptedSlices(logic.promptsFromNodes(positiveNode=point))
            box = logic.promptsFromNodes(roiNode=roi).box
            from SlicerSAM.prompts import box_slice_range

            first, last = box_slice_range(box, logic.volume, plane)
            kji = plane.voxel_to_xy(corners)[0]
            inner = (int(round(min(kji))), int(round(max(kji))))
            row[view] = {
                "point": slices == [int(round(float(index[0])))],
                # an RAS box around an oblique voxel box holds more than it: it must cover it
                "roi": (first, last) == inner
                if name != "oblique"
                else first <= inner[0] and last >= inner[1],
            }
        out[name] = row
    print(json.dumps(out))
"""


def test_markups_in_each_slice_view_reach_the_right_slice_of_ras_lps_and_oblique_volumes():
    info = _run(GEOMETRY)
    assert info["views"] == {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}
    for name in ("RAS", "LPS-ordered", "oblique"):
        row = info[name]
        assert row["matrix"] and row["array"], (name, row)
        for view in ("Red", "Yellow", "Green"):
            assert row[view] == {"point": True, "roi": True}, (name, view, row)


SEGMENTS = """
    import json, sys
    import numpy as np
    import slicer_core_harness as h

    ct_path, labels_path, tmp = sys.argv[1:4]
    slicer, logics = h.scene()
    module = h.load_module()
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.outputs import read_segmentation, write_segmentation
    from SlicerSAM.volume import load_volume
    from SlicerSAMLib import storage

    ct = storage.loadVolume(ct_path)
    labels = storage.loadVolume(labels_path, labelmap=True)
    reference = slicer.util.arrayFromVolume(labels)
    spleen = reference == 1
    logic = module.SlicerSAMLogic()
    logic.setVolume(ct, parse_intensity("40,400"))
    try:
        logic.setRuntime("tensorrt", "fp32")
        refused = ""
    except ValueError as error:
        refused = str(error)
    logic.setRuntime("openvino", "fp32")
    runtime_requirements = logic._runtimeRequirements()
    logic.setRuntime("torch", "fp32")
    logic.loadModel()
    out = {"runtime_refused": refused, "device_text": logic.deviceText()}
    out["runtime_requirements"] = runtime_requirements
    plane = logic.plane()
    k = int(np.argmax([plane.grid(spleen, i).sum() for i in range(plane.num_slices)]))
    kji = np.argwhere(spleen[k : k + 1]) + [k, 0, 0]
    m = logic.volume.ijk_to_ras
    ras = [(m @ np.append(v[::-1].astype(float), 1.0))[:3] for v in (kji.min(0), kji.max(0))]
    lo, hi = np.min(ras, 0), np.max(ras, 0)
    box = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    box.SetCenter(((lo + hi) / 2).tolist())
    box.SetSize((hi - lo + [1.0, 1.0, 0.0]).tolist())  # a flat ROI: a box on slice k

    # accept into a segment that shares its labelmap layer with another segment
    segmentation = logic.ensureSegmentation()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    other_id = segmentation.GetSegmentation().AddEmptySegment("", "other", (0.2, 0.4, 0.8))
    other = np.zeros(spleen.shape, np.uint8)
    other[k - 1 : k + 2, 5:20, 5:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, other_id, ct)
    target_id = logic.addSegment(segmentation, "spleen")
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    seg = segmentation.GetSegmentation()
    out["shared_layer"] = seg.GetLayerIndex(other_id) == seg.GetLayerIndex(target_id)
    result = logic.segmentSlice(roiNode=box)
    out["result_text"] = logic.resultText()
    # the widget's live preview: the events promptEvents names fire when the prompts change
    fired = []
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for node in (box, points):
        for event in logic.promptEvents(node):
            node.AddObserver(event, lambda caller, e: fired.append(caller.GetClassName()))
    box.SetCenter((lo + hi + 2.0) / 2)
    points.AddControlPoint(*((lo + hi) / 2))
    out["prompt_events"] = sorted(set(fired))
    region = logic.accept(segmentation, target_id)
    after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, target_id, ct)
    out["accepted_slices"] = np.flatnonzero(after.any(axis=(1, 2))).tolist()
    out["key_slice"] = k
    out["key_dice"] = float(
        2 * (after[k] & spleen[k]).sum() / (after[k].sum() + spleen[k].sum())
    )
    kept = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, other_id, ct)
    out["other_untouched"] = bool(np.array_equal(kept, other))

    # evaluation against a segmentation and against a labelmap node
    by_labelmap = logic.evaluate(segmentation, target_id, labels, 1, showChart=False)
    volume = load_volume(ct_path)
    write_segmentation(
        tmp + "/reference.seg.nrrd",
        spleen.astype(np.uint8),
        volume,
        [(1, "spleen reference", (0.9, 0.3, 0.2))],
    )
    reference_node = storage.loadSegmentation(tmp + "/reference.seg.nrrd")
    rseg = reference_node.GetSegmentation()
    rid = rseg.GetNthSegmentID(0)
    by_segment = logic.evaluate(segmentation, target_id, reference_node, rid, showChart=False)
    truth = float(2 * (after & spleen).sum() / (after.sum() + spleen.sum()))
    out["dice"] = [by_labelmap["rows"][0]["dice"], by_segment["rows"][0]["dice"], truth]
    # our .seg.nrrd as Slicer reads it: voxels, names, colours
    ours = slicer.util.arrayFromSegmentBinaryLabelmap(reference_node, rid, ct)
    out["ours_read_by_slicer"] = [
        bool(np.array_equal(ours.astype(bool), spleen)),
        rseg.GetSegment(rid).GetName(),
        [round(v, 3) for v in rseg.GetSegment(rid).GetColor()],
    ]
    # Slicer's .seg.nrrd as we read it
    storage.saveSegmentation(segmentation, tmp + "/slicer.seg.nrrd")
    read, segments, ijk_to_ras = read_segmentation(tmp + "/slicer.seg.nrrd")
    offset = np.rint(np.linalg.inv(volume.ijk_to_ras) @ ijk_to_ras[:, 3])[:3].astype(int)
    placed = np.zeros(spleen.shape, read.dtype)
    k0, j0, i0 = offset[::-1]
    placed[k0 : k0 + read.shape[0], j0 : j0 + read.shape[1], i0 : i0 + read.shape[2]] = read
    values = {name: value for value, name, _ in segments}
    colours = {name: [round(c, 3) for c in colour] for _, name, colour in segments}
    out["slicers_read_by_us"] = [
        bool(np.array_equal(placed == values["spleen"], after.astype(bool))),
        bool(np.array_equal(placed == values["other"], other.astype(bool))),
        colours["other"],
    ]

    # undo restores the segment; the other segment stays as it was
    out["undone"] = bool(logic.undo())
    restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, target_id, ct)
    out["undo_empty"] = restored is None or not np.asarray(restored).any()
    kept = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, other_id, ct)
    out["other_after_undo"] = bool(np.array_equal(kept, other))

    # a segmentation made on another grid is refused, not resampled
    small = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small")
    slicer.util.updateVolumeFromArray(small, np.zeros((4, 5, 6), np.int16))
    elsewhere = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    elsewhere.SetReferenceImageGeometryParameterFromVolumeNode(small)
    elsewhere_id = elsewhere.GetSegmentation().AddEmptySegment("", "x", (1, 1, 0))
    logic.segmentSlice(roiNode=box)
    try:
        logic.accept(elsewhere, elsewhere_id)
        out["other_grid"] = ""
    except ValueError as error:
        out["other_grid"] = str(error)
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_logic_accepts_evaluates_undoes_and_round_trips_seg_nrrd_on_real_mrml(
    shared_data, litemedsam_checkpoint, tmp_path
):
    info = _run(SEGMENTS, shared_data / CT, shared_data / LABELS, tmp_path)
    assert info["shared_layer"]
    # a box on one slice: only that slice of the segment changes, and it is the spleen
    assert info["accepted_slices"] == [info["key_slice"]] and info["key_dice"] > 0.85
    assert info["other_untouched"] and info["other_after_undo"]
    by_labelmap, by_segment, truth = info["dice"]
    assert abs(by_labelmap - truth) < 1e-9 and abs(by_segment - truth) < 1e-9
    assert info["ours_read_by_slicer"] == [True, "spleen reference", [0.9, 0.3, 0.2]]
    assert info["slicers_read_by_us"] == [True, True, [0.2, 0.4, 0.8]]
    assert info["undone"] and info["undo_empty"]
    assert "voxel grid differs" in info["other_grid"]
    assert info["result_text"].startswith(f"slice {info['key_slice']}: candidate 1/")
    assert "unknown backend 'tensorrt'" in info["runtime_refused"]
    assert info["device_text"].endswith("encoder torch-fp32")
    # a CPU runtime chosen in the panel is installed with the other requirements
    assert info["runtime_requirements"] == ["openvino>=2024.0", "onnx>=1.16"]
    assert info["prompt_events"] == ["vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"]


BATCH = """
    import importlib.util, json, sys
    import slicer_core_harness as h

    slicer, logics = h.scene()
    h.load_module()
    spec = importlib.util.spec_from_file_location(
        "batch_segment", str(h.ROOT / "Resources" / "Scripts" / "batch_segment.py")
    )
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    code = batch.main(sys.argv[1:])
    from SlicerSAMLib import storage

    node = storage.loadSegmentation([a for a in sys.argv if a.endswith(".seg.nrrd")][0])
    seg = node.GetSegmentation()
    names = [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())]
    ct = storage.loadVolume(sys.argv[sys.argv.index("--volume") + 1])
    voxels = slicer.util.arrayFromSegmentBinaryLabelmap(node, seg.GetNthSegmentID(0), ct)
    print(json.dumps({"code": code, "names": names, "voxels": int(voxels.sum())}))
"""


@pytest.mark.slow
def test_batch_script_segments_propagates_and_writes_a_seg_nrrd_slicer_reads(
    shared_data, litemedsam_checkpoint, tmp_path
):
    click, centre, size, kidney = _kidney_prompts(shared_data)
    prompts = write(
        tmp_path,
        fiducial("positive", [point("P-1", click)]),
        roi("ROI", centre, size),
        name="kidney.mrk.json",
    )
    out, csv = tmp_path / "kidney.seg.nrrd", tmp_path / "metrics.csv"
    argv = ["--volume", shared_data / CT, "--markups", prompts, "--output", out, "--name", "kidney"]
    argv += ["--window", "40,400", "--reference", shared_data / LABELS, "--label", "3"]
    info = _run(BATCH, *argv, "--csv", csv)
    assert info["code"] == 0 and info["names"] == ["kidney"]
    assert 0.5 * kidney.sum() < info["voxels"] < 2 * kidney.sum()
    rows = csv.read_text().splitlines()
    dice = float(rows[1].split(",")[rows[0].split(",").index("dice")])
    assert dice >= 0.8, rows


API = """
    import ast, json, sys
    from pathlib import Path
    import slicer, vtk

    files = [Path(p) for p in sys.argv[1:]]
    MODULES = {"argparse", "qt", "ctk", "slicer", "vtk", "PyTorchUtils", "SampleData", "unittest"}
    called = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                receiver = node.func.value
                if isinstance(receiver, ast.Name) and receiver.id in MODULES:
                    continue  # a class of a module (qt.QTimer, vtk.vtkMatrix4x4): constructed
                if isinstance(receiver, ast.Attribute) and receiver.attr == "util":
                    continue  # slicer.util.WaitCursor: a helper of Slicer's Python, not MRML
                if name[:1].isupper():  # VTK/MRML methods; Qt's and Python's are lowerCamel
                    called.setdefault(name, path.name)
    classes = [getattr(slicer, n) for n in dir(slicer) if n.startswith("vtk")]
    classes += [vtk.vtkMatrix4x4, vtk.vtkCommand, vtk.vtkImageData, vtk.vtkPointData]
    known = set()
    for cls in classes:
        known |= set(dir(cls))
    print(json.dumps({"called": sorted(called), "unknown": sorted(set(called) - known)}))
"""


def test_every_mrml_method_the_module_calls_exists_on_slicers_classes():
    files = [ROOT / "SlicerSAM.py", *sorted((ROOT / "SlicerSAMLib").glob("*.py"))]
    files.append(ROOT / "Resources" / "Scripts" / "batch_segment.py")
    info = _run(API, *files)
    assert len(info["called"]) > 30 and info["unknown"] == [], info["unknown"]


REMOTE = """
    import json, sys
    import numpy as np
    import slicer_core_harness as h

    ct, click, centre, size, url = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    slicer, logics = h.scene()
    module = h.load_module()
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAMLib import storage

    volume = storage.loadVolume(ct)
    positive = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*[float(v) for v in click.split(",")])
    box = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    box.SetCenter([float(v) for v in centre.split(",")])
    box.SetSize([float(v) for v in size.split(",")])
    out = {}
    for where in ("here", "server"):
        logic = module.SlicerSAMLogic()
        logic.setServer(url if where == "server" else None)
        logic.setVolume(volume, parse_intensity("40,400"))
        logic.segmentSlice(positiveNode=positive, roiNode=box)
        logic.propagate("both")
        segmentation = logic.ensureSegmentation()
        segment_id = logic.addSegment(segmentation, where)
        logic.accept(segmentation, segment_id)
        out[where] = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        out[where + "_undo"] = bool(logic.undo())
        out[where + "_device"] = logic.deviceText()
    print(json.dumps({
        "same": bool(np.array_equal(out["here"], out["server"])),
        "voxels": int(out["server"].sum()),
        "undo": [out["here_undo"], out["server_undo"]],
        "device": out["server_device"],
    }))
"""


@pytest.mark.slow
def test_the_module_computing_on_a_server_gives_the_same_segment_as_here(
    shared_data, litemedsam_checkpoint
):
    """The Logic set to compute on a server (python -m SlicerSAM serve on 127.0.0.1): the same
    segment, accept and undo as on this computer."""
    pytest.importorskip("fastapi", reason="the server needs FastAPI")
    from test_server import Server

    click, centre, size, _ = _kidney_prompts(shared_data)
    joined = [",".join(f"{v:.6f}" for v in x) for x in (click, centre, size)]
    server = Server()
    try:
        info = _run(REMOTE, shared_data / CT, *joined, server.url)
    finally:
        server.stop()
    assert info["same"] and info["voxels"] > 0 and info["undo"] == [True, True]
    assert info["device"] == f"server {server.url}"


EVERYTHING = """
    import json, sys
    import numpy as np
    import slicer_core_harness as h

    ct_path, labels_path = sys.argv[1:3]
    slicer, logics = h.scene()
    module = h.load_module()
    from SlicerSAM.everything import segment_everything
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAMLib import storage

    ct = storage.loadVolume(ct_path)
    reference = slicer.util.arrayFromVolume(storage.loadVolume(labels_path, labelmap=True))
    logic = module.SlicerSAMLogic()
    logic.setVolume(ct, parse_intensity("40,400"))
    logic.loadModel()
    plane = logic.plane()
    liver = reference == 5
    k = int(np.argmax([plane.grid(liver, i).sum() for i in range(plane.num_slices)]))
    # the Red view shows slice k: the module reads the index from the view
    ras = logic.volume.kji_to_ras(np.array([[k, 50, 60]]))[0]
    slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed").SetSliceOffset(float(ras[2]))
    out = {"view_index": logic.sliceIndexOfView("Red"), "k": k}
    scene_nodes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    node, ids = logic.segmentEverything(k)
    seg = node.GetSegmentation()
    engine = segment_everything(logic.session.segmenter, k)
    masks = [slicer.util.arrayFromSegmentBinaryLabelmap(node, i, ct) for i in ids]
    out["same_as_engine"] = len(ids) == len(engine) and all(
        np.array_equal(np.asarray(plane.grid(m, k)) != 0, c.mask)
        and not np.delete(m, k, axis=0).any()
        for m, c in zip(masks, engine)
    )
    out["names"] = [seg.GetSegment(i).GetName() for i in ids[:2]]
    out["new_nodes"] = (
        slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") - scene_nodes
    )
    out["pending_before"] = logic.pending is not None
    # keep the candidate that best matches the liver, delete the rest, use it, propagate
    found = [m[k] != 0 for m in masks]
    dice = [2 * (f & liver[k]).sum() / (f.sum() + liver[k].sum()) for f in found]
    best = int(np.argmax(dice))
    out["best_dice"] = float(dice[best])
    for n, segment_id in enumerate(ids):
        if n != best:
            seg.RemoveSegment(segment_id)
    logic.useCandidates(node, k)
    out["key"] = sorted(logic.keyMasks)
    logic.propagate()
    pending = logic.pending
    vol = plane.stack(pending, dtype=bool)
    out["propagated_dice"] = float(2 * (vol & liver).sum() / (vol.sum() + liver.sum()))
    out["slices"] = len([i for i, m in pending.items() if m.any()])
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_segment_everything_fills_a_segmentation_and_a_kept_candidate_propagates(
    shared_data, litemedsam_checkpoint
):
    info = _run(EVERYTHING, shared_data / CT, shared_data / LABELS)
    assert info["view_index"] == info["k"]
    assert info["same_as_engine"] and info["new_nodes"] == 1
    assert info["names"][0].startswith("candidate 1 (IoU ")
    assert not info["pending_before"]  # candidates change nothing until one is used
    assert info["best_dice"] >= 0.8, info
    assert info["key"] == [info["k"]]
    assert info["slices"] > 5 and info["propagated_dice"] >= 0.7, info
