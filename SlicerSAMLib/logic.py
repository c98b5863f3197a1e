"""The Slicer module's Logic: MRML nodes in and out of the engine's interactive session.

``SlicerSAMLogic`` reads volumes, markups nodes and segments into plain data (arrays, IJK-to-RAS
matrices, ``SlicerSAM.prompts.Prompts``), hands them to one
``SlicerSAM.session.InteractiveSession`` (the object the command line and the benchmark drive
too), and writes the session's results back into segments with region-limited edits and undo.
It uses Slicer's MRML and Logic libraries only (no Qt, no ``slicer.app``), so it runs in Slicer,
in ``Slicer --no-main-window --python-script`` and on ``slicer-core`` (the tests do).

This package sits next to ``SlicerSAM.py``; inside Slicer the module file is the ``SlicerSAM``
package whose submodules are the engine's files (see SlicerSAM.py), so ``SlicerSAM.session``
below is the engine's.
"""

import logging
import os
import tempfile
import time

import numpy as np
import slicer
import vtk

try:  # Slicer's application; absent in slicer-core, where the tests stand in for it
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # pragma: no cover - Slicer always has it
    ScriptedLoadableModuleLogic = object

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREVIEW_NODE_NAME = "SlicerSAM preview"
PREVIEW_SEGMENT_ID = "SlicerSAMPreview"
PREVIEW_COLOR = (1.0, 0.85, 0.1)
VIEWS = ("Red", "Yellow", "Green")
MODES = ("replace", "add", "remove")


class SlicerSAMLogic(ScriptedLoadableModuleLogic):
    """Segment Anything on Slicer nodes; usable without the widget (batch scripts).

    It translates MRML nodes to and from the engine's ``InteractiveSession`` and needs nothing of
    the application: no Qt, no ``slicer.app``. What needs a person (a confirmation, a progress
    dialog, the preview in the slice views) comes through callbacks and flags the widget sets:
    ``confirmCallback(message, details) -> bool``, ``logCallback(message)`` and
    ``previewEnabled``.

    Typical use::

        logic = SlicerSAMLogic()
        logic.ensureDependencies(askConfirmation=False)
        logic.setModel("litemedsam")
        logic.setVolume(volumeNode)
        result = logic.segmentSlice(roiNode=roiNode)        # or prompts=SlicerSAM.prompts.Prompts
        logic.propagate(direction="both")
        logic.accept(segmentationNode, segmentId)
        metrics = logic.evaluate(segmentationNode, segmentId, referenceNode, referenceSegmentId)
        logic.undo()

    ``logCallback(message)`` receives status messages. Every engine call is in one method each;
    engine-side helpers are ``SlicerSAM.editing`` and ``SlicerSAM.slicer_bridge``.
    """

    _dependenciesConfirmed = False  # asked once per session, shared by all Logic instances

    def __init__(self):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        from SlicerSAM.editing import UndoStack

        self.logCallback = None
        # confirmCallback(message, details) -> bool: asks a person (the widget shows a dialog);
        # without it nothing that needs consent (an install, a download) happens unless allowed
        self.confirmCallback = None
        self.previewEnabled = False  # the widget shows results in the slice views
        self.allowDownload = False  # batch use: allow model downloads without asking
        self.modelName = "litemedsam"
        self.checkpoint = None
        self.device = "auto"
        # the image encoder's runtime (setRuntime); None: $SLICERSAM_BACKEND/_PRECISION, else auto
        self.backend = None
        self.precision = None
        # compute on an inference server (python -m SlicerSAM serve) instead of this computer:
        # no PyTorch and no weights here; see setServer
        self.serverUrl = None
        self.serverToken = None
        self.orientation = "axial"
        self.intensity = None  # IntensityMapping; None: the volume's display window/level
        self.undoStack = UndoStack()
        self.volumeNode = None
        self.volume = None
        self._model = None
        self._modelKey = None
        self._executor = None
        self._session = None
        self.reset()

    def log(self, message):
        logging.info(message)
        if self.logCallback:
            self.logCallback(message)

    def reset(self):
        """Forget the volume, results and undo history (scene closed)."""
        self._closeSegmenter()
        self.volumeNode = None
        self.volume = None
        self.undoStack.clear()
        self.clearKeys()
        self.lastMetrics = None
        self._metricRows = {}  # (segmentation, segment, reference, structure) -> metric rows
        self._metricsTable = None
        self._plotNodes = {}  # slicer.util.plot's nodes, reused by every evaluation
        self._previewNode = None
        self._previewRegion = None

    def shutdown(self):
        self._closeSegmenter()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # ---------------------------------------------------------------- dependencies
    @staticmethod
    def requirementsPath():
        return os.path.join(MODULE_DIR, "Resources", "requirements.txt")

    def missingDependencies(self):
        """Requirement lines not installed yet (PyTorch first); empty when all is in place."""
        from SlicerSAM import slicer_bridge as bridge

        missing = bridge.missing_requirements(["torch" + bridge.TORCH_REQUIREMENT])
        with open(self.requirementsPath()) as f:
            missing += bridge.missing_requirements(bridge.read_requirements(f.read()))
        missing += bridge.missing_requirements(list(bridge.NO_DEPS_REQUIREMENTS))
        missing += bridge.missing_requirements(self._runtimeRequirements())
        return list(dict.fromkeys(missing))

    def _runtimeRequirements(self):
        """The packages of the encoder runtime chosen with setRuntime (none for torch, auto)."""
        from SlicerSAM import slicer_bridge as bridge

        return list(bridge.RUNTIME_REQUIREMENTS.get(self.backend or "", ()))

    def ensureDependencies(self, askConfirmation=True, progress=None):
        """Install what is missing: PyTorch via the PyTorch extension, the rest with pip.

        Asks once per Slicer session through ``confirmCallback`` (one question listing
        everything); ``askConfirmation=False`` installs without asking (``--install`` of the
        batch script). Packages Slicer owns are never replaced: see ``slicer_bridge.SLICER_OWNED``
        (they are pinned in a constraints file). ``progress(message)`` is told each step.
        """
        progress = progress or self.log
        import importlib

        from SlicerSAM import slicer_bridge as bridge

        missing = self.missingDependencies()
        if not missing:
            return
        if askConfirmation and not SlicerSAMLogic._dependenciesConfirmed:
            question = (
                "SlicerSAM needs Python packages that are not installed yet. Install them now? "
                "PyTorch may take several minutes and a few GB."
            )
            if self.confirmCallback is None or not self.confirmCallback(
                question, "\n".join(missing)
            ):
                raise RuntimeError("SlicerSAM cannot run without: " + ", ".join(missing))
        SlicerSAMLogic._dependenciesConfirmed = True
        torchVersion = bridge.installed_version("torch")
        if torchVersion is None:
            progress("Installing PyTorch (this can take several minutes)...")
            self._installTorch(bridge.TORCH_REQUIREMENT)
        elif bridge.missing_requirements(["torch" + bridge.TORCH_REQUIREMENT]):
            # replacing a loaded torch needs a restart: leave it to the PyTorch Utils module
            raise RuntimeError(
                f"PyTorch {torchVersion} is too old (SlicerSAM needs torch"
                f"{bridge.TORCH_REQUIREMENT}): upgrade it in the 'PyTorch Utils' module "
                "(uninstall, restart Slicer, install), then try again."
            )
        constraints = os.path.join(tempfile.gettempdir(), "SlicerSAM-constraints.txt")
        with open(constraints, "w") as f:
            f.write(bridge.constraints_text())
        with open(self.requirementsPath()) as f:
            requirements = bridge.missing_requirements(bridge.read_requirements(f.read()))
        requirements += bridge.missing_requirements(self._runtimeRequirements())
        requirements = list(dict.fromkeys(requirements))
        if requirements:
            progress("Installing " + ", ".join(requirements) + "...")
            self._pipInstall(requirements, constraints)
        for requirement in bridge.missing_requirements(list(bridge.NO_DEPS_REQUIREMENTS)):
            progress(f"Installing {requirement} (the LiteMedSAM weights)...")
            slicer.util.pip_install(["--no-deps", requirement])
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise RuntimeError("Installation incomplete, still missing: " + ", ".join(still))

    def _installTorch(self, versionRequirement):
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError(
                "SlicerSAM needs the PyTorch extension: install 'PyTorch' from the Extensions "
                "Manager, restart Slicer, and try again."
            ) from exc
        # askConfirmation=False: the one SlicerSAM dialog above already listed PyTorch
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=versionRequirement
        )
        if torch is None:
            raise RuntimeError("PyTorch was not installed; SlicerSAM cannot run without it.")

    def _pipInstall(self, requirements, constraintsPath):
        try:
            import slicer.packaging as packaging  # Slicer >= 5.10
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(
                requirements,
                constraints=constraintsPath,
                prompt_install=False,
                requester="SlicerSAM",
            )
        else:  # Slicer 5.8: pip_install, same constraints (list form: paths may hold spaces)
            slicer.util.pip_install(["-c", constraintsPath] + list(requirements))

    # ---------------------------------------------------------------- model
    def setModel(self, name, checkpoint=None, device=None):
        """Choose the model (a ``sam_core.zoo`` name) and an optional local checkpoint (lazy)."""
        self.modelName = name or "litemedsam"
        self.checkpoint = checkpoint or None
        if device:
            self.device = device
        self._closeSegmenter()

    def setRuntime(self, backend="auto", precision="auto"):
        """The image encoder's runtime (``SlicerSAM/backends.py``): backend "auto" | "torch" |
        "openvino" | "onnxruntime", precision "auto" | "fp32" | "bf16" | "fp16". Unknown names
        are refused now; the model reloads on next use. A backend that is not installed is
        refused when the model loads, naming what to install."""
        from SlicerSAM.backends import requested

        runtime = requested(backend or "auto", precision or "auto")
        if runtime != (self.backend, self.precision):
            self.backend, self.precision = runtime
            self._closeSegmenter()

    def modelDownload(self):
        """(size in bytes, URL) when the chosen model must be downloaded first, else None."""
        from sam_core import zoo
        from sam_core.errors import CheckpointError

        if self.checkpoint:
            return None
        spec = zoo.get_spec(self.modelName)
        try:
            zoo.resolve_checkpoint(self.modelName, None, allow_download=False)
            return None
        except CheckpointError:
            if spec.url and spec.sha256:
                return spec.size_bytes, spec.url
            raise  # the message says how to get the weights (package or local file)

    def loadModel(self, askDownload=False, progress=None):
        """Load the weights; build the session when a volume is set.

        Weights that must be downloaded first are fetched when ``allowDownload`` is set, or when
        ``askDownload`` and ``confirmCallback`` says yes; otherwise a RuntimeError says how to
        get them. ``progress(done, total, message)`` follows the download.
        """
        from sam_core.zoo import load_model
        from SlicerSAM.slicer_bridge import format_bytes

        if not self._modelLoaded():
            download = self.modelDownload()
            if download is not None and not self.allowDownload:
                size, url = download
                what = f"the {self.modelName} weights ({format_bytes(size)}) from {url}"
                asked = askDownload and self.confirmCallback is not None
                if not asked or not self.confirmCallback(f"Download {what}?", url):
                    raise RuntimeError(
                        f"Model {self.modelName} needs a download of {what}: allow it (in "
                        "batch scripts logic.allowDownload = True), or use a local checkpoint."
                    )
            self.log(f"SlicerSAM: loading {self.modelName}...")
            self._model = load_model(
                self.modelName,
                self.checkpoint,
                device=self.device,
                allow_download=download is not None,
                progress=progress,
            )
            self._modelKey = (self.modelName, self.checkpoint, self.device)
        from SlicerSAM.backends import choose_runtime, default_threads, request_runtime, requested
        from SlicerSAM.segmenter import _model_identity

        runtime = requested(self.backend, self.precision)
        if getattr(self._model, "_slicersam_runtime_request", (None, None))[:2] != runtime:
            request_runtime(self._model, *runtime)
        # the encoder runtime now (auto calibrates on first use: ~1 min under ``progress``);
        # the segmenters made later share this choice
        choice = choose_runtime(
            self._model, _model_identity(self._model), threads=default_threads(), progress=progress
        )
        self.log(f"SlicerSAM: {choice.reason}")
        return self._getSegmenter() if self.volume is not None else None

    def _modelLoaded(self):
        return self._model is not None and self._modelKey == (
            self.modelName,
            self.checkpoint,
            self.device,
        )

    def setServer(self, url=None, token=None):
        """Compute on the inference server at ``url`` (``http://host:port``; None: on this
        computer). The server holds the model; this computer needs neither PyTorch nor the
        weights. Accepted segments and their undo stay here whatever happens to the server."""
        url = (url or "").strip() or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"A server address starts with http:// or https://, got {url!r}.")
        if (url, token or None) != (self.serverUrl, self.serverToken):
            self.serverUrl, self.serverToken = url, token or None
            self._closeSegmenter()

    def deviceText(self):
        from SlicerSAM.slicer_bridge import device_text

        if self.serverUrl:
            return f"server {self.serverUrl}"
        if not self._session:
            return "not loaded"
        segmenter = self._session.segmenter
        return f"{device_text(segmenter.device)}, encoder {segmenter.runtime.name}"

    # ---------------------------------------------------------------- volume, orientation
    def setVolume(self, volumeNode, intensity=None):
        """Use ``volumeNode`` (a scalar volume without a non-linear transform) for segmentation."""
        from SlicerSAM import editing

        self._closeSegmenter()
        self._removePreviewNode()  # its geometry is the old volume's
        self.volumeNode = None
        self.volume = None
        if volumeNode is None:
            return
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(
                f"Volume {volumeNode.GetName()} is under a transform: harden it first (Data "
                "module, right-click > Harden transform)."
            )
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        self.volume = editing.volume_from_arrays(
            slicer.util.arrayFromVolume(volumeNode), slicer.util.arrayFromVTKMatrix(matrix)
        )
        self.volumeNode = volumeNode
        self.intensity = (
            intensity if intensity is not None else self.intensityFromDisplay(volumeNode)
        )
        self.log(f"SlicerSAM: volume {volumeNode.GetName()} {self.volume.shape} (K, J, I)")

    def intensityFromDisplay(self, volumeNode):
        """The volume's current display window/level as the model's intensity mapping."""
        from SlicerSAM.intensity import IntensityMapping
        from SlicerSAM.slicer_bridge import intensity_from_window_level

        display = volumeNode.GetDisplayNode() if volumeNode else None
        if display is None or display.GetWindow() <= 0:
            return IntensityMapping()
        return intensity_from_window_level(display.GetWindow(), display.GetLevel())

    def intensityForChoice(self, choice, volumeNode=None):
        from SlicerSAM.slicer_bridge import intensity_for_choice

        display = volumeNode.GetDisplayNode() if volumeNode else None
        if display is None:
            return intensity_for_choice(choice)
        return intensity_for_choice(choice, display.GetWindow(), display.GetLevel())

    def setIntensity(self, intensity):
        """Change the intensity mapping (None: the display window/level now).

        Only a real change gives the session a new segmenter (embeddings depend on the mapping);
        key slices and the pending result stay: they are masks, valid whatever the mapping was.
        """
        if intensity is None and self.volumeNode is not None:
            intensity = self.intensityFromDisplay(self.volumeNode)
        if intensity != self.intensity:
            self.intensity = intensity
            if self._session is not None:
                self._session.set_intensity(intensity)
                self._encoded = set()

    @staticmethod
    def viewOfPrompts(prompts, preferred=None):
        """The slice view ("Red", "Yellow", "Green") whose plane holds every prompt, or None."""
        from SlicerSAM.slicer_bridge import prompt_points_ras, view_of_points

        matrices = {}
        for name in VIEWS:
            sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{name}")
            if sliceNode is not None:
                matrices[name] = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        return view_of_points(prompt_points_ras(prompts), matrices, preferred)

    @staticmethod
    def orientationOfView(viewName):
        """Engine orientation of a slice view ("Red", "Yellow", "Green")."""
        from SlicerSAM.slicer_bridge import VIEW_ORIENTATIONS, engine_orientation

        sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{viewName}")
        if sliceNode is None:
            return VIEW_ORIENTATIONS.get(viewName, "axial")
        return engine_orientation(sliceNode.GetOrientation())

    def setOrientation(self, orientation):
        from SlicerSAM.slicer_bridge import check_orientation

        orientation = check_orientation(orientation)
        if orientation != self.orientation:
            self.orientation = orientation
            if self._session is not None:
                self._session.set_orientation(orientation)  # keys are per plane: cleared
                self._encoded = set()
            self.lastResult = None
            self.clearPreview()

    # ---------------------------------------------------------------- session
    def _requireVolume(self):
        if self.volume is None:
            raise ValueError("Select an input volume first.")

    def segmenterReady(self):
        return self._session is not None

    def _getSession(self):
        """The engine's InteractiveSession of the current volume (the model loads first), or
        with a server set, a RemoteSession (the volume is uploaded once)."""
        if self._session is None and self.serverUrl:
            from SlicerSAM.intensity import IntensityMapping
            from SlicerSAM.remote import RemoteSession

            self._requireVolume()
            self.log(f"SlicerSAM: sending the volume to {self.serverUrl}...")
            self._session = RemoteSession(
                self.serverUrl,
                self.volume,
                token=self.serverToken,
                orientation=self.orientation,
                window=(self.intensity or IntensityMapping()).as_text(),
                undo_stack=self.undoStack,
            )
            self._encoded = set()
        if self._session is None:
            self._requireVolume()
            if not self._modelLoaded():
                self.loadModel()
            from SlicerSAM.session import InteractiveSession

            self._session = InteractiveSession(
                self.volume,
                self._model,
                orientation=self.orientation,
                intensity=self.intensity,
                undo_stack=self.undoStack,
            )
            self._encoded = set()
        return self._session

    def startSession(self):
        """Start the session now (load the model, or upload the volume to the server) rather
        than on the first prompt; returns it."""
        return self._getSession()

    def _getSegmenter(self):
        return self._getSession().segmenter

    def _closeSegmenter(self):
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()
        self._session = None
        self._encoded = set()
        self.lastResult = None

    @property
    def session(self):
        """The engine's InteractiveSession (None until the model is loaded for a volume)."""
        return self._session

    def plane(self):
        """The engine's SlicePlane of the current volume and orientation."""
        if self._session is not None:
            return self._session.plane
        self._requireVolume()
        from SlicerSAM.slicing import plane_for

        return plane_for(self.volume, self.orientation)

    def isEncoded(self, index):
        return bool(self.serverUrl) or index in self._encoded

    def encodeAsync(self, index):
        """Encode slice ``index`` on a worker thread; returns a ``concurrent.futures.Future``.

        Threading choice: a Python ``ThreadPoolExecutor`` with one worker, polled from the GUI by
        a ``qt.QTimer``. PyTorch releases the GIL while it computes, so the GUI keeps painting;
        all MRML and Qt calls stay on the main thread (the worker only runs the encoder).
        """
        from concurrent.futures import ThreadPoolExecutor

        segmenter = self._getSegmenter()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SlicerSAM")
        future = self._executor.submit(segmenter.embedding, index)
        encoded = self._encoded  # the current session's set (a new session gets a new one)
        future.add_done_callback(lambda f: f.exception() is None and encoded.add(index))
        return future

    # ---------------------------------------------------------------- prompts and one slice
    @staticmethod
    def createPromptNode(className, name, color=(0.2, 0.9, 0.2)):
        """A new markups node for prompts (a point list or an ROI) in ``color``."""
        node = slicer.mrmlScene.AddNewNodeByClass(
            className, slicer.mrmlScene.GenerateUniqueName(name)
        )
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(color)
        return node

    @staticmethod
    def promptEvents(node):
        """The events that say prompt node ``node`` changed: an ROI's size and position come as
        ModifiedEvent, a point list reports point events."""
        if node.IsA("vtkMRMLMarkupsROINode"):
            return [vtk.vtkCommand.ModifiedEvent]
        return [
            node.PointAddedEvent,
            node.PointRemovedEvent,
            node.PointModifiedEvent,
            node.PointPositionDefinedEvent,
        ]

    @staticmethod
    def _definedPoints(node):
        if node is None:
            return None
        points = []
        for n in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(n, position)
            points.append(position)
        return np.array(points, dtype=np.float64).reshape(-1, 3)

    def promptsFromNodes(self, positiveNode=None, negativeNode=None, roiNode=None):
        """Engine ``Prompts`` (RAS) from point lists and an ROI (undefined points are skipped)."""
        from SlicerSAM.slicer_bridge import prompts_from_markups

        bounds = None
        if roiNode is not None and roiNode.GetNumberOfDefinedControlPoints() > 0:
            bounds = [0.0] * 6
            roiNode.GetRASBounds(bounds)
        return prompts_from_markups(
            self._definedPoints(positiveNode), self._definedPoints(negativeNode), bounds
        )

    def promptedSlices(self, prompts):
        """The slices ``prompts`` would make key slices of (validated; no model work)."""
        from SlicerSAM.session import InteractiveSession

        self._requireVolume()
        session = self._session or InteractiveSession(
            self.volume, None, orientation=self.orientation, intensity=self.intensity
        )
        return sorted(session.plan(prompts)[1])

    def segmentSlice(
        self,
        prompts=None,
        positiveNode=None,
        negativeNode=None,
        roiNode=None,
        multimask=None,
    ):
        """Give the engine's session the prompts (engine ``Prompts``, or the markups nodes):
        every slice whose prompts changed is segmented; a 3D ROI bounds masks and propagation.

        The session's result (key slices over the last propagation) is previewed and pending.
        Returns the SliceResult of the last slice segmented now (None when nothing changed).
        """
        if prompts is None:
            prompts = self.promptsFromNodes(positiveNode, negativeNode, roiNode)
        session = self._getSession()
        started = time.perf_counter()
        results = session.set_prompts(prompts, multimask=multimask)
        if self.serverUrl and results:
            ms = (time.perf_counter() - started) * 1000.0
            self.log(f"SlicerSAM: {len(results)} slice(s) from the server in {ms:.0f} ms")
        for index in results:
            self._encoded.add(index)
        if results:
            self.lastResult = results[max(results)]
        self.showPreview(session.result())
        return self.lastResult

    @property
    def candidate(self):
        """Which candidate of the last slice result is chosen."""
        result = self.lastResult
        key = None if result is None or self._session is None else self.keyMasks.get(result.index)
        return 0 if key is None else key.candidate

    def resultText(self):
        """One line on the last slice result: its candidate and predicted IoU ("" without one)."""
        result = self.lastResult
        if result is None:
            return ""
        return (
            f"slice {result.index}: candidate {self.candidate + 1}/{len(result.iou)}, "
            f"predicted IoU {float(result.iou[self.candidate]):.2f}"
        )

    def nextCandidate(self):
        """Show the next multimask candidate of the last slice result; returns its index."""
        result = self.lastResult
        if result is None or self._session is None:
            raise ValueError("Segment a slice first.")
        self._session.select_candidate(result.index, self.candidate + 1)
        self.showPreview(self._session.result())
        return self.candidate

    @property
    def keyMasks(self):
        """The session's key slices ({slice index: KeySlice})."""
        return {} if self._session is None else self._session.keys

    @property
    def pending(self):
        """The result waiting for accept ({slice index: bool grid}), or None."""
        masks = None if self._session is None else self._session.result()
        return masks or None

    def clearKeys(self):
        """Forget the key slices and the result (a new structure)."""
        if self._session is not None:
            self._session.clear()
        self.lastResult = None

    # ---------------------------------------------------------------- propagation
    def propagate(self, direction="both", roiNode=None, progress=None, cancel=None):
        """Propagate the key slice(s) through the volume; the result is previewed and pending.

        ``progress(done, total, message)`` and ``cancel() -> bool`` are the engine's callbacks
        (cancelling raises ``SlicerSAM.errors.Cancelled`` and changes nothing).
        """
        work = self.propagationWork(direction, roiNode)
        return self.applyPropagation(work(progress, cancel))

    def propagationWork(self, direction="both", roiNode=None):
        """Read the nodes now (GUI thread); return ``work(progress, cancel)``, which runs only
        the engine (any thread) and returns what :meth:`applyPropagation` takes.

        ``direction``: "both", "up", "down", or "roi" (both ways; an ROI must be set). An
        ``roiNode`` given here becomes the session's ROI (slice range and in-plane bounds).
        """
        from SlicerSAM.slicer_bridge import DIRECTIONS, box_from_ras_bounds

        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        session = self._getSession()
        if not session.keys:
            raise ValueError("Segment a key slice first.")
        if roiNode is not None and roiNode.GetNumberOfDefinedControlPoints() > 0:
            bounds = [0.0] * 6
            roiNode.GetRASBounds(bounds)
            session.set_roi(box_from_ras_bounds(bounds))
        if direction == "roi":
            if session.roi is None:
                raise ValueError("Direction 'roi' needs a box (ROI) prompt.")
            direction = "both"
        self.log(f"SlicerSAM: propagating from slice(s) {sorted(session.keys)} ({direction})")

        def work(progress=None, cancel=None):
            return session.propagate(direction, progress=progress, cancel=cancel)

        return work

    def applyPropagation(self, result):
        """Preview a finished propagation (GUI thread); returns its result."""
        self.showPreview(self._session.result())
        return result

    # ---------------------------------------------------------------- segment everything
    def segmentEverything(self, index):
        """Every mask the model finds on slice ``index`` (current orientation), one segment each
        in a new segmentation, largest first, named with its predicted IoU and stability.

        The radiologist deletes what they do not want; :meth:`useCandidates` makes the kept ones
        a key slice to propagate or accept. The session's prompts and result do not change; a
        failure leaves no segmentation behind. Returns (segmentation node, segment ids).
        """
        from SlicerSAM.editing import bounding_region
        from SlicerSAM.everything import CANDIDATE_COLOURS, candidate_name

        if self.serverUrl:
            raise ValueError(
                "Segment everything runs on this computer: set Compute on to this computer."
            )
        session = self._getSession()
        candidates = session.segment_everything(index)
        if not candidates:
            raise ValueError(f"No mask on slice {index} passed the model's confidence filters.")
        plane = session.plane
        node = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"SAM candidates ({plane.orientation} {index})"
        )
        try:
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
            segmentation = node.GetSegmentation()
            ids = []
            for number, c in enumerate(candidates, 1):
                name = candidate_name(number, c)
                mask = plane.stack({index: c.mask}, dtype=np.uint8)
                region = bounding_region(mask)
                # a labelmap of its own: candidates overlap, and a segment written into a
                # shared layer would overwrite the others there
                segment = slicer.vtkSegment()
                segment.SetName(name)
                segment.SetColor(CANDIDATE_COLOURS[(number - 1) % len(CANDIDATE_COLOURS)])
                segment.AddRepresentation(
                    slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                    self._labelmapImage(region, mask[region.slices]),
                )
                segmentId = f"candidate_{number}"
                if not segmentation.AddSegment(segment, segmentId):
                    raise RuntimeError(f"Could not add {name} to {node.GetName()}.")
                ids.append(segmentId)
        except Exception:
            slicer.mrmlScene.RemoveNode(node)
            raise
        self.log(f"SlicerSAM: {len(ids)} candidates on {plane.orientation} slice {index}")
        return node, ids

    def sliceIndexOfView(self, viewName):
        """The slice (current orientation) that slice view ``viewName`` ("Red", ...) shows."""
        sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{viewName}")
        if sliceNode is None:
            raise ValueError(f"There is no {viewName} slice view.")
        self._requireVolume()
        ras = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 3]
        plane = self.plane()
        index, _ = plane.voxel_to_xy(self.volume.ras_to_kji(np.asarray(ras)[None]))
        index = int(round(float(index[0])))
        if not 0 <= index < plane.num_slices:
            raise ValueError(f"The {viewName} view shows no slice of the input volume.")
        return index

    def useCandidates(self, segmentationNode, index, segmentIds=None):
        """Make the union of segments (default: all the node holds, i.e. the candidates the
        radiologist kept) on slice ``index`` a key slice of the session, previewed and pending:
        propagate it or accept it as any mask. Returns the (rows, cols) mask."""
        segmentation = segmentationNode.GetSegmentation()
        if segmentIds is None:
            count = segmentation.GetNumberOfSegments()
            segmentIds = [segmentation.GetNthSegmentID(n) for n in range(count)]
        if not segmentIds:
            raise ValueError(f"{segmentationNode.GetName()} holds no segment.")
        plane = self.plane()
        mask = np.zeros(plane.grid_shape, dtype=bool)
        for segmentId in segmentIds:
            labels = self._segmentArray(segmentationNode, segmentId)
            mask |= np.asarray(plane.grid(labels, int(index))) != 0
        if not mask.any():
            raise ValueError(f"The kept candidates are empty on slice {index}.")
        session = self._getSession()
        session.add_mask(int(index), mask)
        self.showPreview(session.result())
        return mask

    # ---------------------------------------------------------------- segments: accept, undo
    @staticmethod
    def ensureSegmentation(segmentationNode=None):
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", "SAM segmentation"
            )
            segmentationNode.CreateDefaultDisplayNodes()
        return segmentationNode

    def addSegment(self, segmentationNode, name="SAM segment"):
        segmentation = segmentationNode.GetSegmentation()
        return segmentation.AddEmptySegment("", name, (0.9, 0.45, 0.2))

    def _prepareSegmentation(self, segmentationNode):
        from SlicerSAM.editing import same_grid

        self._requireVolume()
        if segmentationNode.GetParentTransformNode() is not None:
            raise ValueError("The segmentation is under a transform: harden it first.")
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        reference = segmentationNode.GetNodeReference(role)
        if reference is None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        elif reference is not self.volumeNode and reference.IsA("vtkMRMLVolumeNode"):
            # writing on another grid would make Slicer resample the whole segment (and the
            # rest of its layer) onto ours: refuse rather than change what the user did not edit
            matrix = vtk.vtkMatrix4x4()
            reference.GetIJKToRASMatrix(matrix)
            image = reference.GetImageData()
            shape = tuple(reversed(image.GetDimensions())) if image is not None else (0, 0, 0)
            if not same_grid(
                self.volume.shape,
                self.volume.ijk_to_ras,
                shape,
                slicer.util.arrayFromVTKMatrix(matrix),
            ):
                raise ValueError(
                    f"Segmentation {segmentationNode.GetName()} was made on "
                    f"{reference.GetName()}, whose voxel grid differs from "
                    f"{self.volumeNode.GetName()}: choose or create a segmentation on this "
                    "volume (writing into this one would resample its segments)."
                )

    def _segmentArray(self, segmentationNode, segmentId):
        """The segment as a 0/1 uint8 (K, J, I) array on the input volume's grid."""
        from SlicerSAM.editing import check_labels_on_grid

        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise ValueError(f"Segment {segmentId!r} is not in {segmentationNode.GetName()}.")
        array = slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentationNode, segmentId, self.volumeNode
        )
        if array is None:
            return np.zeros(self.volume.shape, dtype=np.uint8)
        check_labels_on_grid(array, self.volume.shape, f"segment {segmentId}")
        return (np.asarray(array) != 0).astype(np.uint8)

    def _labelmapImage(self, region, block, ijkToRas=None):
        """A binary labelmap (vtkOrientedImageData) of ``block`` (0/1, region.shape) placed at
        ``region`` of the voxel grid of ``ijkToRas`` (default: the input volume's)."""
        from vtk.util.numpy_support import vtk_to_numpy

        image = slicer.vtkOrientedImageData()
        image.SetExtent(*region.extent)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        if ijkToRas is None:
            matrix = vtk.vtkMatrix4x4()
            self.volumeNode.GetIJKToRASMatrix(matrix)
        else:
            matrix = slicer.util.vtkMatrixFromArray(np.asarray(ijkToRas, dtype=float).reshape(4, 4))
        image.SetImageToWorldMatrix(matrix)
        vtk_to_numpy(image.GetPointData().GetScalars())[:] = (
            (np.asarray(block) != 0).astype(np.uint8).ravel()
        )
        image.Modified()
        return image

    def _writeRegion(self, segmentationNode, segmentId, region, block, ijkToRas=None):
        """Set the segment to ``block`` (0/1, region.shape) inside ``region`` only.

        ``region`` indexes the voxel grid of ``ijkToRas`` (4x4 numbers; default: the current
        input volume's grid).

        Two region-limited merges, as the Segment Editor does: MERGE_MIN clears the segment where
        the block is 0, MERGE_MASK sets it where the block is 1; ``extent`` keeps both inside the
        region and other segments of a shared labelmap are left as they are.
        """
        image = self._labelmapImage(region, block, ijkToRas)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        extent = list(region.extent)
        for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MASK):
            if not logic.SetBinaryLabelmapToSegment(
                image, segmentationNode, segmentId, mode, extent
            ):
                raise RuntimeError(
                    f"Could not write segment {segmentId} of {segmentationNode.GetName()}."
                )

    def accept(self, segmentationNode, segmentId, masks=None, mode="replace"):
        """Write the session's result (or ``masks``) into a segment, touching only changed voxels.

        ``masks``: {slice index: bool grid} along the current orientation, or a bool (K, J, I)
        array on the volume grid. Returns the changed ``editing.Region`` (None: no change);
        the previous content of that region goes on the undo stack. The session starts afresh.
        """
        if masks is None and self.pending is None:
            raise ValueError("Nothing to accept: segment a slice or propagate first.")
        if segmentationNode is None or not segmentId:
            raise ValueError("Choose a target segmentation and segment.")
        self._prepareSegmentation(segmentationNode)
        labels = self._segmentArray(segmentationNode, segmentId)
        edit = self._getSession().accept(
            labels, mode=mode, key=self._editKey(segmentationNode, segmentId), masks=masks
        )
        self.lastResult = None
        self.clearPreview()
        if edit is None:
            return None
        self._writeRegion(segmentationNode, segmentId, edit.region, edit.after)
        self.log(f"SlicerSAM: {edit.changed_voxels} voxels changed in {segmentId}")
        return edit.region

    def _editKey(self, segmentationNode, segmentId):
        """Undo key: the target segment and the voxel grid its region indexes (the input volume
        may change before the undo)."""
        return (segmentationNode.GetID(), segmentId, tuple(self.volume.ijk_to_ras.ravel().tolist()))

    def undo(self):
        """Restore the segment(s) as before the last accept; False when there is nothing to undo."""
        step = self.undoStack.pop()
        if step is None:
            return False
        gone = []
        for edit in reversed(step):
            nodeId, segmentId, ijkToRas = edit.key
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is None or node.GetSegmentation().GetSegment(segmentId) is None:
                gone.append(segmentId)
                continue
            self._writeRegion(node, segmentId, edit.region, edit.before, ijkToRas)
        if gone:
            raise ValueError(
                f"Cannot undo into segment(s) {', '.join(gone)}: deleted since the accept."
            )
        return True

    # ---------------------------------------------------------------- preview
    def _previewSegment(self):
        node = self._previewNode
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
            node.GetSegmentation().AddEmptySegment(PREVIEW_SEGMENT_ID, "SAM preview", PREVIEW_COLOR)
            display = node.GetDisplayNode()
            display.SetOpacity2DFill(0.35)
            display.SetOpacity2DOutline(1.0)
            self._previewNode = node
            self._previewRegion = None
        return node

    def showPreview(self, masks):
        """Show {slice index: bool grid} in the slice views (a helper segmentation node)."""
        from SlicerSAM import editing

        if self.volumeNode is None or not self.previewEnabled:
            return
        node = self._previewSegment()
        self.clearPreview()
        scope, block = editing.masks_to_block(self.plane(), masks, self.volume.shape)
        self._writeRegion(node, PREVIEW_SEGMENT_ID, scope, block)
        self._previewRegion = scope

    def clearPreview(self):
        """Empty the preview segment (only the region last shown is rewritten)."""
        node = self._previewNode
        if (
            node is not None
            and self._previewRegion is not None
            and slicer.mrmlScene.GetNodeByID(node.GetID())
        ):
            self._writeRegion(
                node,
                PREVIEW_SEGMENT_ID,
                self._previewRegion,
                np.zeros(self._previewRegion.shape, np.uint8),
            )
        self._previewRegion = None

    def discardPending(self):
        """Drop the result waiting for accept and its preview (a new structure)."""
        self.clearPreview()
        self.clearKeys()

    def _removePreviewNode(self):
        self.clearPreview()
        node = self._previewNode
        if node is not None and slicer.mrmlScene.GetNodeByID(node.GetID()):
            slicer.mrmlScene.RemoveNode(node)
        self._previewNode = None

    # ---------------------------------------------------------------- evaluation
    def referenceStructures(self, referenceNode):
        """(label, value) choices of a reference: its segments, or a labelmap's label values."""
        if referenceNode is None:
            return []
        if referenceNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = referenceNode.GetSegmentation()
            ids = [
                segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
            ]
            return [(segmentation.GetSegment(i).GetName(), i) for i in ids]
        values = np.unique(slicer.util.arrayFromVolume(referenceNode))
        return [(f"label {int(v)}", int(v)) for v in values if v != 0]

    def _referenceArray(self, referenceNode, structure):
        from SlicerSAM import editing

        if referenceNode.IsA("vtkMRMLSegmentationNode"):
            return self._segmentArray(referenceNode, structure)
        matrix = vtk.vtkMatrix4x4()
        referenceNode.GetIJKToRASMatrix(matrix)
        array = slicer.util.arrayFromVolume(referenceNode)
        if not editing.same_grid(
            array.shape,
            slicer.util.arrayFromVTKMatrix(matrix),
            self.volume.shape,
            self.volume.ijk_to_ras,
        ):
            raise ValueError(
                "The reference labelmap is not on the input volume's grid: import it into a "
                "segmentation (Data module) and choose that instead."
            )
        return (np.asarray(array) == int(structure)).astype(np.uint8)

    def evaluate(
        self,
        segmentationNode,
        segmentId,
        referenceNode,
        referenceStructure=None,
        toleranceMm=2.0,
        tableNode=None,
        showChart=True,
    ):
        """Dice, IoU, HD95, NSD of a segment against a reference segment or labelmap label.

        The table node (returned under "table") keeps one row per evaluated segment: evaluating
        another segment adds its row, evaluating one again replaces it; ``exportCsv`` writes them
        all. With ``showChart``, the per-slice Dice of this segment (along the current
        orientation) is plotted in one chart, reused by later evaluations. Returns {"rows" (this
        segment's), "per_slice_dice", "table", "chart"}.
        """
        from SlicerSAM.metrics import evaluate_labels, per_slice_dice
        from SlicerSAM.slicer_bridge import metric_rows, slice_dice_series

        self._requireVolume()
        if referenceNode is None:
            raise ValueError("Choose a reference segmentation or labelmap.")
        if referenceStructure is None:
            choices = self.referenceStructures(referenceNode)
            if not choices:
                raise ValueError("The reference is empty.")
            referenceStructure = choices[0][1]
        prediction = self._segmentArray(segmentationNode, segmentId)
        reference = self._referenceArray(referenceNode, referenceStructure)
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        axis = self.plane().axis
        results = evaluate_labels(
            prediction,
            reference,
            self.volume.spacing,
            {1: name},
            tolerance_mm=toleranceMm,
            axis=axis,
        )
        perSlice = per_slice_dice(prediction, reference, axis=axis)
        rows = metric_rows(results)
        key = (segmentationNode.GetID(), segmentId, referenceNode.GetID(), str(referenceStructure))
        self._metricRows[key] = rows
        allRows = [row for segmentRows in self._metricRows.values() for row in segmentRows]
        if tableNode is None and self._metricsTable is not None:
            if slicer.mrmlScene.GetNodeByID(self._metricsTable.GetID()) is not None:
                tableNode = self._metricsTable
        table = self._fillTable(allRows, tableNode)
        self._metricsTable = table
        chart = None
        if showChart and perSlice:
            for role in ("chart", "table"):  # the user may have deleted the earlier plot
                node = self._plotNodes.get(role)
                if node is not None and slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
                    self._plotNodes = {}
                    break
            indices, values = slice_dice_series(perSlice)
            chart = slicer.util.plot(
                np.column_stack([indices, values]),
                xColumnIndex=0,
                columnNames=["slice", "Dice"],
                title=f"Per-slice Dice ({name})",
                show=self.previewEnabled,
                nodes=self._plotNodes,
            )
        self.lastMetrics = {"rows": allRows, "per_slice_dice": perSlice}
        return {"rows": rows, "per_slice_dice": perSlice, "table": table, "chart": chart}

    @staticmethod
    def _fillTable(rows, tableNode=None):
        from SlicerSAM.slicer_bridge import table_text

        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "SlicerSAM metrics")
        tableNode.RemoveAllColumns()
        columns = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        for column in columns:
            tableNode.AddColumn().SetName(column)
        for row in rows:
            r = tableNode.AddEmptyRow()
            for c, column in enumerate(columns):
                tableNode.SetCellText(r, c, table_text(row.get(column, "")))
        return tableNode

    def exportCsv(self, path):
        """Write the metrics table (one row per evaluated segment) as CSV."""
        from SlicerSAM.reports import write_csv

        if not self.lastMetrics:
            raise ValueError("Evaluate first.")
        return write_csv(path, self.lastMetrics["rows"])
