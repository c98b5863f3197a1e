"""The Slicer module on Slicer's own MRML and Logic libraries (``slicer-core``), for tests.

Imported in a fresh interpreter (the module file claims the name ``SlicerSAM``, which the
engine package holds in the pytest process). It sets up a scene the way Slicer does
(../shared/notes/slicer-core.md) and loads ``SlicerSAM.py`` the way Slicer's loader does. Only
what ``slicer-core`` lacks because it needs Qt is stood in for: ``qt``, ``ctk``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.app`` (a
headless application: ``noMainWindow``). Every MRML node, the volumes, markups and
segmentations logics and ``slicer.util`` are Slicer's own.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _stub_qt_side(slicer):
    class Base:
        def __init__(self, *args, **kwargs):
            pass

    for name in ("qt", "ctk"):
        _module(name)
    slicer.ScriptedLoadableModule = _module(
        "slicer.ScriptedLoadableModule",
        ScriptedLoadableModule=type("ScriptedLoadableModule", (Base,), {}),
        ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (Base,), {}),
        ScriptedLoadableModuleLogic=type("ScriptedLoadableModuleLogic", (Base,), {}),
        ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (Base,), {}),
    )
    slicer.parameterNodeWrapper = _module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls
    )
    options = types.SimpleNamespace(noMainWindow=True)
    slicer.app = types.SimpleNamespace(
        commandOptions=lambda: options, temporaryPath=tempfile.gettempdir()
    )


_KEEP_ALIVE: list = []


def scene():
    """A new MRML scene set up as Slicer sets it up; returns (slicer, {name: module logic})."""
    import slicer

    mrml = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(mrml)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(mrml)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = {}
    for name, logic in (
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
        ("Volumes", slicer.vtkSlicerVolumesLogic()),
        ("Markups", slicer.vtkSlicerMarkupsLogic()),
    ):
        logic.SetMRMLScene(mrml)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = mrml
    # the logics hold the application logic by a plain pointer: keep it alive
    _KEEP_ALIVE[:] = [mrml, app, colors, logics]
    slicer.modules = types.SimpleNamespace(
        **{n.lower(): types.SimpleNamespace(logic=(lambda lg=lg: lg)) for n, lg in logics.items()}
    )
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(mrml, True)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = mrml.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        mrml.AddNode(node)
        node.SetOrientation(orientation)
    return slicer, logics


def load_module():
    """``SlicerSAM.py`` loaded as Slicer loads it (by path, under the name SlicerSAM)."""
    import slicer

    _stub_qt_side(slicer)
    spec = importlib.util.spec_from_file_location("SlicerSAM", ROOT / "SlicerSAM.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["SlicerSAM"] = module
    spec.loader.exec_module(module)
    return module


def load_volume(logics, path, name="CT", labelmap=False):
    """A volume node read by Slicer's volumes logic (as File > Add Data does)."""
    node = logics["Volumes"].AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    if node is None:
        raise RuntimeError(f"Slicer could not read {path}")
    return node
