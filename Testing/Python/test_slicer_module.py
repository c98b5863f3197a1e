"""The Slicer module without Slicer: loader, packaging, API names, and its engine-side helpers.

3D Slicer cannot run here, so these tests check what can be checked outside it:

- Slicer's loader is reproduced (``spec_from_file_location("SlicerSAM", SlicerSAM.py)`` with stub
  ``slicer``/``qt``/``ctk``/``vtk`` modules) in a subprocess: the module file must then act as the
  package, so ``import SlicerSAM.editing`` resolves to the engine file, without importing torch;
- plain Python ``import SlicerSAM`` still gets the engine package;
- the root holds exactly one .py, CMakeLists.txt lists every engine file (and only existing ones);
- ``../shared/tools/check_slicer_api.py`` finds no unknown Slicer API name (skipped without
  ../shared);
- the engine and sam_core never import slicer, qt, ctk or vtk; Slicer-imported code parses as
  Python 3.9 (Slicer 5.8);
- the pure-Python helpers of ``SlicerSAM/slicer_bridge.py``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, SHARED

from SlicerSAM import slicer_bridge as bridge
from SlicerSAM.errors import PromptError

MODULE_FILE = ROOT / "SlicerSAM.py"
ENGINE_DIRS = ("SlicerSAM", "sam_core")
MODULE_DIRS = ENGINE_DIRS + ("SlicerSAMLib",)  # what the extension installs next to SlicerSAM.py
GUI_MODULES = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "SampleData", "PyTorchUtils"}
API_CHECKER = SHARED / "tools" / "check_slicer_api.py"


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _engine_files(folders=ENGINE_DIRS):
    files = []
    for folder in folders:
        files += [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        ]
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# (a) Slicer's loader, reproduced with stub GUI modules
# ---------------------------------------------------------------------------------------------
STUBS = textwrap.dedent(
    """
    import importlib.util, json, sys, types

    root = sys.argv[1]

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    for name in ("qt", "ctk", "vtk"):
        module(name)
    slicer = module("slicer")
    for name in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLMarkupsFiducialNode",
                 "vtkMRMLMarkupsROINode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (), {}))
    slicer.ScriptedLoadableModule = module(
        "slicer.ScriptedLoadableModule",
        ScriptedLoadableModule=type("ScriptedLoadableModule", (Base,), {}),
        ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (Base,), {}),
        ScriptedLoadableModuleLogic=type("ScriptedLoadableModuleLogic", (Base,), {}),
        ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (Base,), {}),
    )
    mixin = type("VTKObservationMixin", (Base,), {})
    slicer.util = module("slicer.util", VTKObservationMixin=mixin)
    slicer.parameterNodeWrapper = module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls
    )
    options = types.SimpleNamespace(noMainWindow=True)
    slicer.app = types.SimpleNamespace(commandOptions=lambda: options, temporaryPath=".")
    slicer.mrmlScene = types.SimpleNamespace(nodes={})
    slicer.mrmlScene.GetNodeByID = lambda node_id: slicer.mrmlScene.nodes.get(node_id)

    # what Slicer does: load the file by path under the module name, registered before it runs
    spec = importlib.util.spec_from_file_location("SlicerSAM", root + "/SlicerSAM.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules["SlicerSAM"] = loaded
    spec.loader.exec_module(loaded)
    torch_after_load = "torch" in sys.modules
    """
)

LOADER = STUBS + textwrap.dedent(
    """
    import SlicerSAM.editing
    import SlicerSAM.slicer_bridge
    import sam_core.errors
    torch_after_helpers = "torch" in sys.modules

    logic = loaded.SlicerSAMLogic()
    missing = logic.missingDependencies()
    loaded._purgeEngineModules()
    print(json.dumps({
        "same_module": sys.modules["SlicerSAM"] is loaded,
        "classes": sorted(n for n in dir(loaded) if n.startswith("SlicerSAM")),
        "editing": SlicerSAM.editing.__file__,
        "bridge": SlicerSAM.slicer_bridge.__file__,
        "sam_core": sam_core.errors.__file__,
        "torch_after_load": torch_after_load,
        "torch_after_helpers": torch_after_helpers,
        "missing_is_list": isinstance(missing, list),
        "undo_steps": logic.undoStack.max_steps,
        "purged": sorted(n for n in sys.modules if n.startswith(("SlicerSAM.", "sam_core"))),
        "kept": "SlicerSAM" in sys.modules,
    }))
    """
)


def _run_flow(script: str, cwd, timeout: int = 300) -> dict:
    """Run a stubbed-Slicer script in a fresh interpreter; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_slicer_loader_makes_the_module_file_the_engine_package(tmp_path):
    # run outside the repo: the module file itself must make sam_core importable
    info = _run_flow(LOADER, tmp_path, timeout=120)
    assert info["same_module"]
    assert info["classes"] == [
        "SlicerSAM",
        "SlicerSAMLogic",
        "SlicerSAMParameterNode",
        "SlicerSAMTest",
        "SlicerSAMWidget",
    ]
    assert os.path.samefile(info["editing"], ROOT / "SlicerSAM" / "editing.py")
    assert os.path.samefile(info["bridge"], ROOT / "SlicerSAM" / "slicer_bridge.py")
    assert os.path.samefile(info["sam_core"], ROOT / "sam_core" / "errors.py")
    # the panel must show before PyTorch is installed
    assert not info["torch_after_load"]
    assert not info["torch_after_helpers"]
    assert info["missing_is_list"] and info["undo_steps"] >= 1
    # the widget's reload forgets engine modules but not the module itself
    assert info["purged"] == [] and info["kept"]


LOGIC_FLOW = STUBS + textwrap.dedent(
    """
    import numpy as np
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.phantom import make_phantom
    from SlicerSAM.prompts import Box, Prompts

    # The Logic on an engine volume, with the segment storage of Slicer replaced by a numpy
    # array: what is checked is the Logic's own glue (prompts -> slice -> result -> accept ->
    # undo), with the real Segmenter and LiteMedSAM.
    phantom = make_phantom(0)
    logic = loaded.SlicerSAMLogic()
    logic.volume = phantom.image
    logic.intensity = parse_intensity("abdomen")
    plane = logic.plane()
    liver = phantom.labels.array == 1
    present = [i for i in range(plane.num_slices) if plane.grid(liver, i).any()]
    index = present[len(present) // 2]
    on_slice = np.zeros(liver.shape, bool)
    plane.set_grid(on_slice, index, plane.grid(liver, index))
    kji = np.argwhere(on_slice)
    prompts = Prompts(box=Box(tuple(kji.min(0)), tuple(kji.max(0))), frame="kji")

    result = logic.segmentSlice(prompts=prompts)
    truth = plane.grid(liver, index)
    dice = 2 * np.logical_and(result.mask, truth).sum() / (result.mask.sum() + truth.sum())
    candidate = logic.nextCandidate()

    labels = np.zeros(phantom.image.shape, np.uint8)
    labels[0, 0, 0] = 1  # an unrelated voxel of the segment, far from the slice
    writes = []

    def write(node, segment_id, region, block, ijk_to_ras=None):
        writes.append(region)
        labels[region.slices] = block

    segment = types.SimpleNamespace(GetID=lambda: "seg1", GetName=lambda: "seg")
    segment.GetSegmentation = lambda: types.SimpleNamespace(GetSegment=lambda i: object())
    slicer.mrmlScene.nodes["seg1"] = segment
    logic._prepareSegmentation = lambda node: None
    logic._segmentArray = lambda node, segment_id: labels.copy()
    logic._writeRegion = write
    before = labels.copy()
    region = logic.accept(segment, "s1")
    accepted = labels.copy()
    pending_after_accept = logic.pending
    undone = logic.undo()
    writes_ok = writes[0] == region and len(writes) == 2
    restored = bool(np.array_equal(labels, before))
    # accept again, then delete the segment: undo must say so, not report success
    logic.segmentSlice(prompts=prompts)
    logic.accept(segment, "s1")
    segment.GetSegmentation = lambda: types.SimpleNamespace(GetSegment=lambda i: None)
    kept = labels.copy()
    try:
        logic.undo()
        gone_error = ""
    except ValueError as error:
        gone_error = str(error)
    other = [a for a in range(3) if a != plane.axis]
    print(json.dumps({
        "index": index,
        "result_index": int(result.index),
        "shape_ok": tuple(result.mask.shape) == tuple(plane.grid_shape),
        "dice": float(dice),
        "candidate": candidate,
        "writes_are_the_region": writes_ok,
        "slices_written": np.flatnonzero((accepted != before).any(axis=tuple(other))).tolist(),
        "far_voxel_kept": int(accepted[0, 0, 0]),
        "pending_after_accept": pending_after_accept is None,
        "undone": undone,
        "restored": restored,
        "gone_error": gone_error,
        "gone_untouched": bool(np.array_equal(labels, kept)),
    }))
    """
)


@pytest.mark.slow
def test_logic_segments_accepts_and_undoes_with_the_real_model(tmp_path, litemedsam_checkpoint):
    pytest.importorskip("torch")
    info = _run_flow(LOGIC_FLOW, tmp_path)
    index = info["index"]
    assert info["result_index"] == index and info["shape_ok"]
    assert info["dice"] > 0.6, info  # a tight box on the phantom's liver
    assert info["candidate"] == 0  # a box prompt gives one candidate: cycling stays on it
    assert info["writes_are_the_region"]  # one write for accept, one for undo, same region
    assert info["slices_written"] == [index]  # only the prompted slice changed
    assert info["far_voxel_kept"] == 1 and info["pending_after_accept"]
    assert info["undone"] and info["restored"]
    assert "s1" in info["gone_error"] and "deleted" in info["gone_error"]
    assert info["gone_untouched"]


REPROPAGATE_FLOW = STUBS + textwrap.dedent(
    """
    import numpy as np
    from SlicerSAM.phantom import make_phantom
    from SlicerSAM.propagation import propagate
    from SlicerSAM.prompts import Box, Prompts
    from SlicerSAM.segmenter import SliceResult
    from SlicerSAM.slicing import plane_for

    # The Logic's propagate -> correct a slice -> propagate again, with a box-following fake
    # model (the labelled voxels inside the box) that counts its calls.
    phantom = make_phantom(0)
    liver = phantom.labels.array == 1

    class Fake:
        def __init__(self, volume):
            self.volume = volume
            self.plane = plane_for(volume, "axial")
            self.calls = 0

        def segment(self, index, prompts, multimask=None):
            self.calls += 1
            grid = np.asarray(self.plane.grid(liver, index), bool)
            image = np.asarray(self.plane.to_image(grid.astype(np.float32), order=0)) > 0.5
            rows, cols = image.shape
            yy, xx = np.mgrid[:rows, :cols]
            x0, y0, x1, y1 = prompts.box_xyxy
            inside = image & (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
            mask = np.asarray(self.plane.to_grid(inside.astype(np.float32), order=0)) > 0.5
            return SliceResult(index, mask[None], np.array([0.9]), 0, np.zeros((1, 256, 256)))

    from SlicerSAM.session import InteractiveSession

    logic = loaded.SlicerSAMLogic()
    logic.volume = phantom.image
    fake = Fake(phantom.image)
    logic._session = InteractiveSession(segmenter=fake, undo_stack=logic.undoStack)
    logic.showPreview = lambda masks: None
    plane = fake.plane
    present = [i for i in range(plane.num_slices) if plane.grid(liver, i).any()]

    def box_prompts(index, part=1.0):
        on_slice = np.zeros(liver.shape, bool)
        grid = np.asarray(plane.grid(liver, index), bool).copy()
        cols = np.flatnonzero(grid.any(axis=0))
        grid[:, cols[0] + int(part * len(cols)) :] = False  # part < 1: a smaller box
        plane.set_grid(on_slice, index, grid)
        kji = np.argwhere(on_slice)
        return Prompts(box=Box(tuple(kji.min(0)), tuple(kji.max(0))), frame="kji")

    key = present[len(present) // 2]
    logic.segmentSlice(prompts=box_prompts(key))
    before = fake.calls
    first = logic.propagate("both")
    first_calls = fake.calls - before
    # the user corrects a slice near the end: a box over part of it (a different mask)
    corrected = present[-3]
    logic.segmentSlice(prompts=box_prompts(corrected, part=0.6))
    changed = not np.array_equal(logic.pending[corrected], first.masks.get(corrected))
    before = fake.calls
    second = logic.propagate("both")
    second_calls = fake.calls - before
    keys = {i: k.result for i, k in logic.keyMasks.items()}
    fresh = propagate(Fake(phantom.image), keys)
    gap = range(key + 1, corrected)
    beyond = [i for i in first.masks if i > corrected]
    print(json.dumps({
        "keys": sorted(keys),
        "first_calls": first_calls,
        "second_calls": second_calls,
        "first_slices": len(first.masks),
        "changed": bool(changed),
        # each gap slice is a fresh walk's mask, or the first run's where the walk rejoined it
        "gap_as_fresh": all(
            any(np.array_equal(second.masks.get(i), run.masks.get(i)) for run in (fresh, first))
            for i in gap
        ),
        "gap_recomputed": any(
            not np.array_equal(second.masks.get(i), first.masks.get(i)) for i in gap
        ),
        "beyond_kept": bool(beyond) and all(
            np.array_equal(second.masks[i], first.masks[i]) for i in beyond
        ),
        "pending": sorted(logic.pending) == sorted(second.masks),
    }))
    """
)


def test_logic_repropagates_only_around_a_corrected_slice(tmp_path):
    info = _run_flow(REPROPAGATE_FLOW, tmp_path)
    # the box dragged to another slice: the first key keeps its mask, the new slice is a key
    assert len(info["keys"]) == 2 and info["first_slices"] >= 10 and info["changed"], info
    # the second run recomputes only the gap between the keys (as a fresh run would, until it
    # rejoins the first run's masks); the slices beyond the corrected one, which the first run
    # had reached, keep its masks
    assert 0 < info["second_calls"] < info["first_calls"], info
    assert info["gap_as_fresh"] and info["gap_recomputed"], info
    assert info["beyond_kept"], info
    assert info["pending"], info


# ---------------------------------------------------------------------------------------------
# (b) plain Python gets the engine package
# ---------------------------------------------------------------------------------------------
def test_plain_python_import_gets_the_engine_package():
    result = subprocess.run(
        [sys.executable, "-c", "import SlicerSAM; print(SlicerSAM.__file__)"],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert os.path.samefile(result.stdout.strip(), ROOT / "SlicerSAM" / "__init__.py")


# ---------------------------------------------------------------------------------------------
# (c) one .py at the root, (d) CMake lists every engine file
# ---------------------------------------------------------------------------------------------
def test_repository_root_holds_exactly_one_python_file():
    # Slicer loads every top-level .py of a module folder as a module
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["SlicerSAM.py"]


def _cmake_text():
    text = (ROOT / "CMakeLists.txt").read_text()
    return "\n".join(line.split("#")[0] for line in text.splitlines())


def test_cmake_lists_every_engine_python_file_and_only_existing_ones():
    listed = set(re.findall(r"[\w./-]+\.py\b", _cmake_text()))
    engine = set(_engine_files(MODULE_DIRS))
    missing = sorted(engine - listed)
    assert not missing, f"not listed in CMakeLists.txt (would vanish from the extension): {missing}"
    absent = sorted(p for p in listed if not (ROOT / p).is_file())
    assert not absent, f"listed in CMakeLists.txt but not in the tree: {absent}"
    assert "SlicerSAM.py" in listed


def test_cmake_lists_resources_and_registers_the_self_test():
    text = _cmake_text()
    for resource in re.findall(r"\b(Resources/[\w./-]+)", text):
        assert (ROOT / resource).is_file(), resource
    for name in (
        "Resources/Icons/SlicerSAM.png",
        "Resources/requirements.txt",
        "Resources/UI/SlicerSAM.ui",
    ):
        assert name in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)
    assert re.search(r"set\(MODULE_NAME\s+SlicerSAM\)", text)


def test_icon_is_a_128_pixel_png():
    data = (ROOT / "Resources" / "Icons" / "SlicerSAM.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


# ---------------------------------------------------------------------------------------------
# (e) Slicer API names
# ---------------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_slicer_facing_code_uses_only_known_slicer_api():
    if not API_CHECKER.is_file():
        pytest.skip(f"{API_CHECKER} not found (../shared is present in CI)")
    files = [str(MODULE_FILE)] + sorted(
        str(p)
        for p in [
            *(ROOT / "Resources" / "Scripts").glob("*.py"),
            *(ROOT / "SlicerSAMLib").glob("*.py"),
        ]
    )
    result = subprocess.run(
        [sys.executable, str(API_CHECKER), *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 unknown Slicer API use(s)" in result.stdout


# ---------------------------------------------------------------------------------------------
# (f) engine never imports the GUI; Python 3.9 syntax for everything Slicer imports
# ---------------------------------------------------------------------------------------------
def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_engine_and_sam_core_never_import_slicer_qt_ctk_vtk():
    offenders = []
    for rel in _engine_files():
        tree = ast.parse((ROOT / rel).read_text(), filename=rel)
        offenders += [
            f"{rel}:{line} imports {name}" for line, name in _imports(tree) if name in GUI_MODULES
        ]
    assert not offenders, offenders


def _slicer_imported_files():
    scripts = sorted((ROOT / "Resources" / "Scripts").glob("*.py"))
    return [MODULE_FILE, *scripts, *(ROOT / rel for rel in _engine_files(MODULE_DIRS))]


def test_code_slicer_imports_is_python_39_syntax():
    for path in _slicer_imported_files():
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_union_annotations_only_with_postponed_evaluation():
    """``X | Y`` in an annotation fails at import on Python 3.9 unless annotations are postponed."""
    offenders = []
    for path in _slicer_imported_files():
        tree = ast.parse(path.read_text())
        postponed = any(
            isinstance(n, ast.ImportFrom)
            and n.module == "__future__"
            and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        if postponed:
            continue
        annotations = [
            n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign))
        ]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for annotation in filter(None, annotations):
            if any(
                isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                for n in ast.walk(annotation)
            ):
                offenders.append(f"{path.name}:{annotation.lineno}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------
# slicer_bridge: orientations, prompts, intensity, models, tables, dependencies
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected", [("Axial", "axial"), ("Coronal", "coronal"), ("Sagittal", "sagittal")]
)
def test_slice_node_orientation_maps_to_engine(name, expected):
    assert bridge.engine_orientation(name) == expected


@pytest.mark.parametrize("name", ["Reformat", "", "MyOblique"])
def test_oblique_slice_view_is_a_clear_error(name):
    with pytest.raises(PromptError, match="axial, coronal or sagittal"):
        bridge.engine_orientation(name)


def test_default_views_are_slicer_conventions():
    assert bridge.VIEW_ORIENTATIONS == {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}


def _slice_to_ras(normal_axis: int, offset: float) -> np.ndarray:
    """A slice node's SliceToRAS for an axis-aligned view at ``offset`` mm along its normal."""
    m = np.eye(4)
    columns = {2: (0, 1, 2), 0: (1, 2, 0), 1: (0, 2, 1)}[normal_axis]  # x, y, normal axes
    m[:3, :3] = np.eye(3)[:, columns]
    m[normal_axis, 3] = offset
    return m


def test_prompts_segment_along_the_view_they_were_placed_in():
    views = {
        "Red": _slice_to_ras(2, 12.0),  # axial plane S = 12
        "Yellow": _slice_to_ras(0, -30.5),  # sagittal plane R = -30.5
        "Green": _slice_to_ras(1, 4.0),  # coronal plane A = 4
    }
    placed_in_yellow = [[-30.5, 10.0, 50.0], [-30.5, -22.0, 61.0]]
    assert bridge.view_of_points(placed_in_yellow, views, preferred="Red") == "Yellow"
    assert bridge.view_of_points([[5.0, 4.0, -70.0]], views) == "Green"
    # a point where the Red and Green planes cross: the current view is kept
    crossing = [[20.0, 4.0, 12.0]]
    assert bridge.view_of_points(crossing, views, preferred="Green") == "Green"
    assert bridge.view_of_points(crossing, views, preferred="Red") == "Red"
    # points from two different views, a point off every plane, no point: no view
    assert bridge.view_of_points([[-30.5, 0, 0], [0, 0, 12.0]], views) is None
    assert bridge.view_of_points([[1.0, 2.0, 3.0]], views) is None
    assert bridge.view_of_points(np.zeros((0, 3)), views) is None
    # what the module passes: the points and the ROI's centre of the markups prompts
    prompts = bridge.prompts_from_markups(
        [[-30.5, 10.0, 50.0]], [[-30.5, 0.0, 40.0]], [-30.5, -30.5, -5.0, 5.0, 30.0, 70.0]
    )
    anchors = bridge.prompt_points_ras(prompts)
    assert anchors.shape == (3, 3)
    np.testing.assert_allclose(anchors[2], [-30.5, 0.0, 50.0])
    assert bridge.view_of_points(anchors, views, preferred="Red") == "Yellow"


def test_prompts_from_markups_keeps_polarity_and_ras_box():
    prompts = bridge.prompts_from_markups(
        positive=np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        negative=np.array([[7.0, 8.0, 9.0]]),
        roi_bounds=[-10.0, 10.0, -5.0, 5.0, 2.0, 2.5],
    )
    assert prompts.frame == "ras"
    assert [p.positive for p in prompts.points] == [True, True, False]
    assert prompts.points[2].position == (7.0, 8.0, 9.0)
    assert prompts.box.corner_a == (-10.0, -5.0, 2.0)
    assert prompts.box.corner_b == (10.0, 5.0, 2.5)
    assert bridge.prompts_from_markups(None, np.zeros((0, 3)), None).is_empty


@pytest.mark.parametrize(
    "bounds", [[0, 1, 0, 1, 0], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0], [0, 1, 0, np.nan, 0, 1]]
)
def test_bad_roi_bounds_are_refused(bounds):
    with pytest.raises(PromptError):
        bridge.box_from_ras_bounds(bounds)


def test_bad_point_arrays_are_refused():
    with pytest.raises(PromptError):
        bridge.prompts_from_markups(positive=np.zeros((2, 2)))
    with pytest.raises(PromptError):
        bridge.prompts_from_markups(positive=np.array([[np.inf, 0, 0]]))


def test_slice_index_at_follows_the_plane():
    slicing = pytest.importorskip("SlicerSAM.slicing")
    from SlicerSAM.volume import Volume

    matrix = np.diag([0.7, 0.7, 2.5, 1.0])
    matrix[:3, 3] = (-10.0, 20.0, -30.0)
    volume = Volume(np.zeros((12, 8, 9), np.int16), matrix)
    plane = slicing.plane_for(volume, "axial")
    ras = volume.kji_to_ras(np.array([5.0, 3.0, 4.0]))
    assert bridge.slice_index_at(volume, plane, ras) == 5
    assert bridge.slice_index_at(volume, plane, ras + (0, 0, 1.2)) == 5  # within half a slice
    assert bridge.slice_index_at(volume, plane, ras + (0, 0, 100.0)) is None


def test_intensity_from_display_window_level():
    pytest.importorskip("SlicerSAM.intensity")
    mapping = bridge.intensity_from_window_level(350.0, 50.0)
    assert (mapping.kind, mapping.level, mapping.width) == ("window", 50.0, 350.0)
    with pytest.raises(PromptError):
        bridge.intensity_from_window_level(0.0, 40.0)
    choices = bridge.intensity_choices()
    assert choices[0] == bridge.DISPLAY_CHOICE and bridge.MR_CHOICE in choices
    lung = next(c for c in choices if c.startswith("lung"))
    assert bridge.intensity_for_choice(lung).level == -600
    assert bridge.intensity_for_choice(bridge.DISPLAY_CHOICE, 400, 40).width == 400
    assert bridge.intensity_for_choice(bridge.MR_CHOICE).kind == "percentile"
    with pytest.raises(PromptError):
        bridge.intensity_for_choice(bridge.DISPLAY_CHOICE)


def test_model_choices_default_first_with_sizes():
    choices = bridge.model_choices()
    names = [c.name for c in choices]
    assert names[0] == "litemedsam"
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= set(names)
    try:
        from sam_core import zoo
    except ImportError:
        return  # without torch the list has names only
    assert set(names) == set(zoo.MODEL_SPECS)
    sam_h = next(c for c in choices if c.name == "sam_vit_h")
    assert sam_h.size_bytes == zoo.MODEL_SPECS["sam_vit_h"].size_bytes
    assert "GB" in sam_h.label


def test_format_and_device_text():
    assert bridge.format_bytes(39370479) == "39.4 MB"
    assert bridge.format_bytes(2564550879) == "2.6 GB"
    assert bridge.format_bytes(None) == "size unknown"
    assert bridge.device_text("cuda:0") == "CUDA GPU (cuda:0)"
    assert bridge.device_text("cpu") == "CPU (cpu)"


def test_metric_rows_and_cells():
    results = {
        "liver": {"label": 1, "dice": 0.91, "iou": 0.83, "hd95_mm": float("inf"), "nsd": 0.7}
    }
    rows = bridge.metric_rows(results)
    assert list(rows[0])[:5] == ["structure", "dice", "iou", "hd95_mm", "nsd"]
    assert rows[0]["label"] == 1
    assert bridge.table_text(0.912345) == "0.9123"
    assert bridge.table_text(float("inf")) == "inf" and bridge.table_text(float("nan")) == "nan"
    assert bridge.slice_dice_series({7: 0.5, 3: 1.0}) == ([3, 7], [1.0, 0.5])


def test_requirements_file_leaves_slicer_owned_packages_alone():
    from packaging.requirements import Requirement

    text = (ROOT / "Resources" / "requirements.txt").read_text()
    lines = bridge.read_requirements(text)
    assert lines, "no requirement found"
    owned = {n.lower() for n in bridge.SLICER_OWNED}
    for line in lines:
        requirement = Requirement(line)  # what slicer.packaging.pip_ensure parses
        assert requirement.name.lower() not in owned
    raw = [ln.split("#")[0].strip() for ln in text.splitlines()]
    assert not [ln for ln in raw if ln and bridge.requirement_name(ln).lower() in owned]


def test_read_requirements_drops_owned_comments_and_options():
    text = "# c\n\n-r other.txt\nnumpy>=1.0\nSimple_ITK\nsimpleitk==2.3\nmonai>=1.3  # why\ntqdm\n"
    assert bridge.read_requirements(text) == ["Simple_ITK", "monai>=1.3", "tqdm"]


def test_missing_requirements_checks_versions():
    versions = {"monai": "1.2.0", "scipy": "1.11.0"}
    lines = ["monai>=1.3", "scipy>=1.9", "tqdm", 'pywin32; sys_platform == "never"']
    missing = bridge.missing_requirements(lines, version_of=lambda name: versions.get(name))
    assert missing == ["monai>=1.3", "tqdm", 'pywin32; sys_platform == "never"']
    versions["pywin32"] = "300"
    missing = bridge.missing_requirements(lines, version_of=lambda name: versions.get(name))
    assert missing == ["monai>=1.3", "tqdm"]


def test_constraints_pin_installed_owned_packages():
    versions = {"numpy": "1.26.4", "torch": "2.3.1+cu121"}
    text = bridge.constraints_text(version_of=lambda name: versions.get(name))
    pins = [line.split("#")[0].strip() for line in text.splitlines() if not line.startswith("#")]
    assert pins == ["numpy==1.26.4", "torch==2.3.1+cu121"]


def test_no_deps_pin_matches_the_zoo():
    try:
        from sam_core import zoo
    except ImportError:
        pytest.skip("sam_core.zoo needs torch")
    pins = {bridge.requirement_name(r): r.split("==")[1] for r in bridge.NO_DEPS_REQUIREMENTS}
    assert pins == dict(zoo.PACKAGE_PINS)


def test_runtime_requirements_are_the_pyproject_extras():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python >= 3.11")

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    for backend, requirements in bridge.RUNTIME_REQUIREMENTS.items():
        assert sorted(requirements) == sorted(extras[backend]), backend


def test_slice_mask_ras_bounds_round_trips_through_prompts():
    slicing = pytest.importorskip("SlicerSAM.slicing")
    from SlicerSAM.prompts import prompts_on_slice
    from SlicerSAM.volume import Volume

    matrix = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like storage flips, thick slices
    matrix[:3, 3] = (40.0, 20.0, -30.0)
    volume = Volume(np.zeros((12, 20, 16), np.int16), matrix)
    plane = slicing.plane_for(volume, "axial")
    grid = np.zeros(plane.grid_shape, bool)
    grid[4:9, 3:11] = True
    bounds = bridge.slice_mask_ras_bounds(volume, plane, 6, grid)
    assert bounds[4] == bounds[5]  # as thin as the slice: a 2D box
    slice_prompts = prompts_on_slice(bridge.prompts_from_markups(roi_bounds=bounds), volume, plane)
    assert slice_prompts.index == 6
    rows, cols = np.nonzero(grid)
    # on a square-pixel grid the box is the mask's extent in (x, y) = (column, row) pixels
    assert not plane.is_resampled
    assert slice_prompts.box_xyxy.tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]
    with pytest.raises(PromptError):
        bridge.slice_mask_ras_bounds(volume, plane, 6, np.zeros(plane.grid_shape, bool))


def test_run_polling_keeps_polling_while_the_work_runs_and_returns_its_result():
    import threading
    import time

    from SlicerSAM.errors import Cancelled

    started, release = threading.Event(), threading.Event()
    polls = []

    def work():
        started.set()
        release.wait(5)
        return threading.current_thread().name

    def poll():
        polls.append(started.is_set())
        if len(polls) == 3:
            release.set()  # the "GUI" lets the work finish after a few polls

    assert bridge.run_polling(work, poll, interval_s=0.01) == "SlicerSAM-work"
    assert len(polls) >= 4 and polls[-1]  # polled while running and once after

    # the engine's exception (here a cancel read from state the poll sets) reaches the caller
    state = {"cancel": False}

    def cancellable():
        for _ in range(500):
            if state["cancel"]:
                raise Cancelled("propagation cancelled")
            time.sleep(0.01)
        return "finished"

    def press_cancel():
        state["cancel"] = True

    with pytest.raises(Cancelled):
        bridge.run_polling(cancellable, press_cancel, interval_s=0.01)


# ---------------------------------------------------------------------------------------------
# (g) the panel: Resources/UI/SlicerSAM.ui holds every widget the module reaches
# ---------------------------------------------------------------------------------------------
def test_the_ui_file_holds_every_widget_the_module_uses():
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "Resources" / "UI" / "SlicerSAM.ui").getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    used |= set(
        re.findall(r'"(\w+(?:Selector|Combo|Button|Check|Edit|Place))"', MODULE_FILE.read_text())
    )
    assert used and not sorted(used - set(widgets)), sorted(used - set(widgets))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QComboBox", "QPushButton", "QLabel", "QCheckBox", "QLineEdit", "QWidget"}
    assert set(widgets.values()) - qt_classes <= declared
    # the scene reaches every MRML widget through the top widget's signal
    receivers = {c.findtext("receiver") for c in root.iter("connection")}
    mrml = {
        n for n, c in widgets.items() if c.startswith(("qMRML", "qSlicer")) and n != "SlicerSAM"
    }
    assert mrml <= receivers, sorted(mrml - receivers)
    # widgets bound to the parameter node name existing parameters
    params = {
        p.findtext("string")
        for p in root.iter("property")
        if p.get("name") == "SlicerParameterName"
    }
    annotated = set(re.findall(r"^    (\w+):", MODULE_FILE.read_text(), re.M))
    assert params and params <= annotated, sorted(params - annotated)
