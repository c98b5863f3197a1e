"""3D Slicer module: Segment Anything (LiteMedSAM, MedSAM, SAM) for CT and MRI.

The module, its parameter node, its widget and its self-test. The panel is
``Resources/UI/SlicerSAM.ui``; the Logic is ``SlicerSAMLib/logic.py`` (no Qt); the engine is the
``SlicerSAM/`` folder. Slicer loads this file by path as the module ``SlicerSAM``; ``__path__``
below makes it the package whose submodules are the engine's files, while plain Python finds
the package folder first and never runs this file. Nothing here imports torch (the panel shows
before PyTorch is installed). No postponed annotations: ``parameterNodeWrapper`` needs real ones
(Slicer 5.8 is Python 3.9: ``Union``).
"""

import logging
import os
import sys
from typing import Union

import qt
import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# This module is the package "SlicerSAM" inside Slicer: its submodules are the engine's files.
__path__ = [os.path.join(_MODULE_DIR, "SlicerSAM")]
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)  # sam_core and SlicerSAMLib sit next to this file

from SlicerSAMLib import gui  # noqa: E402 (needs the path above; no torch)
from SlicerSAMLib.logic import SlicerSAMLogic  # noqa: E402

_ENGINE_PACKAGES = ("SlicerSAM.", "sam_core", "SlicerSAMLib")
_PREVIEW_DEBOUNCE_MS = 300  # live preview waits this long after the last prompt change
_ENCODE_POLL_MS = 50  # how often the GUI checks the background slice encoding


def _purgeEngineModules():
    """Forget loaded engine modules so that a reload picks up edited engine files."""
    for name in list(sys.modules):
        if name.startswith(_ENGINE_PACKAGES) and name != "SlicerSAM":
            del sys.modules[name]


# -------------------- Module
class SlicerSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment Anything (SAM)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerSAM developers"]
        self.parent.helpText = (
            "Interactive segmentation of CT and MRI with Segment Anything models (LiteMedSAM by "
            "default; MedSAM and SAM ViT-B/L/H on request). Place positive/negative points or a "
            "box (ROI) on a slice, check the live preview, propagate through the volume, click to "
            "correct a slice, then accept into a segment. An ROI thicker than one slice bounds "
            "every mask and the propagation. LiteMedSAM and MedSAM were trained with boxes only: "
            "clicks choose the box they are given. Shortcuts: Shift+P/N positive/negative point, "
            "Shift+B box, Shift+C next candidate, Shift+A accept, Shift+U undo."
        )
        self.parent.acknowledgementText = (
            "Segment Anything (Meta AI, Apache-2.0); MedSAM and LiteMedSAM (Ma et al., "
            "Apache-2.0). PyTorch is installed through the PyTorch extension."
        )


# -------------------- Parameter node
@parameterNodeWrapper
class SlicerSAMParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxROI: vtkMRMLMarkupsROINode
    reference: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    model: str = "litemedsam"
    checkpointPath: str = ""
    backend: str = "auto"
    precision: str = "auto"
    intensity: str = ""
    sliceView: str = "Red"
    direction: str = "both"
    mode: str = "replace"
    livePreview: bool = True
    multimask: bool = False
    serverUrl: str = ""


# -------------------- Widget
class SlicerSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._encodeFuture = None
        self._busy = False  # a propagation is running on the worker thread
        self._previewTimer = None
        self._encodeTimer = None

    # ---------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerSAMLogic()
        self.logic.logCallback = self._showStatus
        self.logic.confirmCallback = gui.confirm
        self.logic.previewEnabled = True
        self._fillModelCombo()
        self._fillIntensityCombo()
        for selector, place in (
            (self.ui.positiveSelector, self.ui.positivePlace),
            (self.ui.negativeSelector, self.ui.negativePlace),
            (self.ui.roiSelector, self.ui.roiPlace),
        ):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", place.setCurrentNode)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPromptNodesChanged)
        node, index = "currentNodeChanged(vtkMRMLNode*)", "currentIndexChanged(int)"
        for name, signal, slot in (
            ("volumeSelector", node, self.onVolumeChanged),
            ("segmentSelector", node, self.onTargetChanged),
            ("segmentSelector", "currentSegmentChanged(QString)", self.onTargetChanged),
            ("modelCombo", index, self.onModelChanged),
            ("computeCombo", index, self.onComputeChanged),
            ("serverEdit", "editingFinished()", self.onComputeChanged),
            ("tokenEdit", "editingFinished()", self.onComputeChanged),
            ("checkpointEdit", "currentPathChanged(QString)", self.onModelChanged),
            ("backendCombo", index, self.onModelChanged),
            ("precisionCombo", index, self.onModelChanged),
            ("intensityCombo", index, self.onIntensityChanged),
            ("viewCombo", index, self.onIntensityChanged),
            ("liveCheck", "toggled(bool)", self.onPromptsModified),
            ("multimaskCheck", "toggled(bool)", self.onPromptsModified),
            ("referenceSelector", node, self.onReferenceChanged),
        ):
            getattr(self.ui, name).connect(signal, slot)
        for name, slot in (
            ("addSegmentButton", self.onAddSegment),
            ("segmentButton", self.onSegmentSlice),
            ("candidateButton", self.onNextCandidate),
            ("clearButton", self.onClearPrompts),
            ("acceptButton", self.onAccept),
            ("undoButton", self.onUndo),
            ("propagateButton", self.onPropagate),
            ("everythingButton", self.onEverything),
            ("useCandidatesButton", self.onUseCandidates),
            ("evaluateButton", self.onEvaluate),
            ("exportButton", self.onExportCsv),
        ):
            getattr(self.ui, name).connect("clicked(bool)", slot)
        self._previewTimer = gui.timer(_PREVIEW_DEBOUNCE_MS, self.onPreviewTimeout, singleShot=True)
        self._encodeTimer = gui.timer(_ENCODE_POLL_MS, self.onEncodePoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # ---------------------------------------------------------------- combos
    def _fillModelCombo(self):
        from SlicerSAM.slicer_bridge import model_choices

        gui.fillCombo(self.ui.modelCombo, [(c.label, c.name) for c in model_choices()])

    def _fillIntensityCombo(self):
        from SlicerSAM.slicer_bridge import intensity_choices

        gui.fillCombo(self.ui.intensityCombo, [(text, text) for text in intensity_choices()])

    # ---------------------------------------------------------------- lifecycle
    def cleanup(self):
        self._stopTimers()
        self._setShortcuts(False)
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()
        self._setShortcuts(True)

    def exit(self):
        self._setShortcuts(False)
        self._stopTimers()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self):
        self.cleanup()
        _purgeEngineModules()
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        if self.logic:
            self.logic.reset()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def _stopTimers(self):
        for timer in (self._previewTimer, self._encodeTimer):
            if timer:
                timer.stop()
        # a running encode finishes on its worker; without this the next prompt would wait for
        # a poll that no longer comes and the preview would stay silent
        self._encodeFuture = None

    def _setShortcuts(self, enabled):
        self._shortcuts = gui.removeShortcuts(self._shortcuts)
        place = lambda widget: lambda: setattr(widget, "placeModeEnabled", True)  # noqa: E731
        if enabled:
            self._shortcuts = gui.installShortcuts(
                {
                    "placePositive": place(self.ui.positivePlace),
                    "placeNegative": place(self.ui.negativePlace),
                    "placeBox": place(self.ui.roiPlace),
                    "nextCandidate": self.onNextCandidate,
                    "accept": self.onAccept,
                    "undo": self.onUndo,
                }
            )

    # ---------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(SlicerSAMParameterNode(self.logic.getParameterNode()))
        node = self._parameterNode
        if not node.inputVolume:
            node.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        prompts = (
            ("positivePoints", "vtkMRMLMarkupsFiducialNode", "SAM +", (0.2, 0.9, 0.2)),
            ("negativePoints", "vtkMRMLMarkupsFiducialNode", "SAM -", (0.95, 0.3, 0.3)),
            ("boxROI", "vtkMRMLMarkupsROINode", "SAM box", (0.3, 0.8, 1.0)),
        )
        for name, className, title, color in prompts:
            if not getattr(node, name):
                setattr(node, name, self.logic.createPromptNode(className, title, color))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._restoreManualWidgets()
        self.onPromptNodesChanged()
        self._updateButtons()

    def _restoreManualWidgets(self):
        """The widgets connectGui does not bind: the segment selector and the model choice (its
        combo box shows labels, the parameter holds the model's name)."""
        node = self._parameterNode
        if node.segmentation:
            self.ui.segmentSelector.setCurrentNode(node.segmentation)
            if node.segmentId:
                self.ui.segmentSelector.setCurrentSegmentID(node.segmentId)
        index = self.ui.modelCombo.findData(node.model)
        if index >= 0:
            self.ui.modelCombo.setCurrentIndex(index)

    # ---------------------------------------------------------------- status
    def _showStatus(self, message):
        slicer.util.showStatusMessage(message, 5000)

    def _updateButtons(self):
        logic = self.logic
        hasPreview = logic is not None and logic.pending is not None
        hasTarget = bool(
            self.ui.segmentSelector.currentNode() and self.ui.segmentSelector.currentSegmentID()
        )
        self.ui.acceptButton.enabled = hasPreview and hasTarget
        self.ui.undoButton.enabled = logic is not None and logic.undoStack.can_undo
        self.ui.propagateButton.enabled = logic is not None and bool(logic.keyMasks)
        candidates = getattr(self, "_candidates", None)
        self.ui.useCandidatesButton.enabled = (
            candidates is not None and slicer.mrmlScene.IsNodePresent(candidates[0]) == 1
        )
        result = logic.lastResult if logic else None
        self.ui.candidateButton.enabled = result is not None and len(result.iou) > 1
        self.ui.evaluateButton.enabled = (
            hasTarget and self.ui.referenceSelector.currentNode() is not None
        )
        self.ui.exportButton.enabled = logic is not None and logic.lastMetrics is not None
        self.ui.resultLabel.text = logic.resultText() if logic else ""

    # ---------------------------------------------------------------- slots: inputs and options
    def onVolumeChanged(self, node=None):
        with slicer.util.tryWithErrorDisplay("Cannot use this volume.", waitCursor=True):
            self._stopTimers()
            volumeNode = self.ui.volumeSelector.currentNode()
            self.logic.setVolume(volumeNode, self._selectedIntensity(volumeNode))
        self._updateButtons()

    def onTargetChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.segmentation = self.ui.segmentSelector.currentNode()
            self._parameterNode.segmentId = self.ui.segmentSelector.currentSegmentID() or ""
        self._updateButtons()

    def onAddSegment(self):
        with slicer.util.tryWithErrorDisplay("Cannot add a segment."):
            node = self.ui.segmentSelector.currentNode()
            node = self.logic.ensureSegmentation(node)
            segmentId = self.logic.addSegment(node)
            self.logic.clearKeys()  # a new segment is a new structure: earlier keys do not apply
            self.ui.segmentSelector.setCurrentNode(node)
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)

    def onModelChanged(self, *args):
        with slicer.util.tryWithErrorDisplay("Cannot select this model."):
            name = self.ui.modelCombo.currentData
            checkpoint = self.ui.checkpointEdit.currentPath or None
            if self._parameterNode:
                self._parameterNode.model = name or ""
            self.logic.setModel(name, checkpoint)
            ui = self.ui
            self.logic.setRuntime(ui.backendCombo.currentText, ui.precisionCombo.currentText)
            self.ui.deviceLabel.text = "loads on first use"
        self._updateButtons()

    def onComputeChanged(self, *args):
        with slicer.util.tryWithErrorDisplay("Cannot use this server."):
            remote = self.ui.computeCombo.currentIndex == 1
            self.ui.serverEdit.enabled = self.ui.tokenEdit.enabled = remote
            url = self.ui.serverEdit.text if remote else None
            self.logic.setServer(url, self.ui.tokenEdit.text or None)
            self.ui.deviceLabel.text = "connects on first use" if remote else "loads on first use"
        self._updateButtons()

    def _selectedIntensity(self, volumeNode):
        from SlicerSAM.slicer_bridge import DISPLAY_CHOICE

        choice = self.ui.intensityCombo.currentText
        if volumeNode is None or choice == DISPLAY_CHOICE:
            return None  # the Logic reads the display window/level
        return self.logic.intensityForChoice(choice, volumeNode)

    def onIntensityChanged(self, *args):
        with slicer.util.tryWithErrorDisplay("Cannot use this intensity setting."):
            self.logic.setOrientation(self.logic.orientationOfView(self.ui.viewCombo.currentText))
            volumeNode = self.ui.volumeSelector.currentNode()
            if volumeNode is not None:
                self.logic.setIntensity(self._selectedIntensity(volumeNode))
        self._updateButtons()

    # ---------------------------------------------------------------- slots: prompts
    def onPromptNodesChanged(self, *args):
        self.removeObservers(self.onPromptsModified)
        for name in ("positiveSelector", "negativeSelector", "roiSelector"):
            node = getattr(self.ui, name).currentNode()
            for event in self.logic.promptEvents(node) if node and self.logic else ():
                self.addObserver(node, event, self.onPromptsModified)

    def onPromptsModified(self, *args):
        if self.ui.liveCheck.checked and self._previewTimer is not None:
            self._previewTimer.start()  # restarts: re-segment once the prompts stop changing

    def onPreviewTimeout(self):
        # Live preview runs while the user drags points: a half-placed prompt (points on two
        # slices, a box outside the volume) is reported in the status bar, not in a modal dialog.
        if self._busy:
            self._previewTimer.start()  # again once the propagation has finished
            return
        try:
            self._segmentCurrentPrompts(live=True)
        except Exception as exc:
            logging.debug("live preview", exc_info=True)
            self._showStatus(f"SlicerSAM preview: {exc}")

    def onSegmentSlice(self):
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self._segmentCurrentPrompts(live=False)

    def _segmentCurrentPrompts(self, live):
        if self.logic.volume is None:
            self.onVolumeChanged()
        volumeNode = self.ui.volumeSelector.currentNode()
        if volumeNode is not None:  # follows the display window/level as the user changes it
            self.logic.setIntensity(self._selectedIntensity(volumeNode))
        prompts = self.logic.promptsFromNodes(
            self.ui.positiveSelector.currentNode(),
            self.ui.negativeSelector.currentNode(),
            self.ui.roiSelector.currentNode(),
        )
        if prompts.is_empty:
            self.logic.discardPending()
            self._updateButtons()
            return
        self._followPromptView(prompts)
        self._ensureReady(interactive=not live)
        waiting = [i for i in self.logic.promptedSlices(prompts) if not self.logic.isEncoded(i)]
        if waiting:
            # first visit of a slice: encode on a worker thread, come back when it is done
            if self._encodeFuture is None:
                self._showStatus(f"SlicerSAM: encoding slice {waiting[0]}...")
                self._encodeFuture = self.logic.encodeAsync(waiting[0])
                self._encodeTimer.start()
            return
        multimask = True if self.ui.multimaskCheck.checked else None
        self.logic.segmentSlice(prompts=prompts, multimask=multimask)
        self._updateButtons()

    def _followPromptView(self, prompts):
        """Segment along the view the prompts were placed in (when one slice view holds them)."""
        view = self.logic.viewOfPrompts(prompts, preferred=self.ui.viewCombo.currentText)
        if view is not None and view != self.ui.viewCombo.currentText:
            self.ui.viewCombo.setCurrentIndex(self.ui.viewCombo.findText(view))  # -> setOrientation

    def onEncodePoll(self):
        future = self._encodeFuture
        if future is None or not future.done() or self._busy:
            return  # (busy: a propagation holds the model; the timer polls again after it)
        self._encodeTimer.stop()
        self._encodeFuture = None
        with slicer.util.tryWithErrorDisplay("Encoding the slice failed."):
            future.result()  # raises the worker's exception here, on the main thread
            self._segmentCurrentPrompts(live=True)

    def _ensureReady(self, interactive=True):
        """Dependencies, model weights (asking before a download) and the segmenter, once.

        The live preview (``interactive=False``) never opens install or download dialogs while
        the user drags a point; it asks for one click on "Segment slice" instead.
        """
        if self.logic.segmenterReady():
            return
        if self.logic.serverUrl:  # the server holds the model: nothing to install or load here
            with slicer.util.WaitCursor():
                self.logic.startSession()
            self.ui.deviceLabel.text = self.logic.deviceText()
            return
        if not interactive and (self.logic.missingDependencies() or self.logic.modelDownload()):
            raise RuntimeError("click 'Segment slice' once to set up PyTorch and the model")
        if self.logic.missingDependencies():  # asks first (confirmCallback)
            with gui.progressDialog("Installing...", 0) as progress:
                self.logic.ensureDependencies(
                    askConfirmation=True, progress=lambda message: progress(0, 0, message)
                )
        self._fillModelCombo()
        with (
            gui.progressDialog("Loading the model...", 1000) as progress,
            slicer.util.WaitCursor(),
        ):
            self.logic.loadModel(askDownload=True, progress=progress)
        self.ui.deviceLabel.text = self.logic.deviceText()

    def onNextCandidate(self):
        with slicer.util.tryWithErrorDisplay("Cannot show the next candidate."):
            self.logic.nextCandidate()
        self._updateButtons()

    def onClearPrompts(self):
        with slicer.util.tryWithErrorDisplay("Cannot clear the prompts."):
            for name in ("positiveSelector", "negativeSelector", "roiSelector"):
                node = getattr(self.ui, name).currentNode()
                if node:
                    node.RemoveAllControlPoints()
            self.logic.clearKeys()
            self.logic.clearPreview()
        self._updateButtons()

    # ---------------------------------------------------------------- slots: segment everything
    def onEverything(self):
        """Every mask the model finds on the slice the view shows, in a new segmentation."""
        with slicer.util.tryWithErrorDisplay("Segment everything failed.", waitCursor=True):
            self._ensureReady()
            index = self.logic.sliceIndexOfView(self.ui.viewCombo.currentText)
            node, ids = self.logic.segmentEverything(index)
            self._candidates = (node, index)
            self._showStatus(
                f"SlicerSAM: {len(ids)} candidates on slice {index}; delete the ones you do not "
                "want, then Use kept candidates"
            )
        self._updateButtons()

    def onUseCandidates(self):
        """The candidates left in the candidates segmentation become a key slice."""
        with slicer.util.tryWithErrorDisplay("Cannot use the candidates."):
            node, index = self._candidates
            self.logic.useCandidates(node, index)
            self._showStatus(f"SlicerSAM: slice {index} is a key slice; propagate or accept it")
        self._updateButtons()

    # ---------------------------------------------------------------- slots: propagate, accept
    def onPropagate(self):
        """Propagate on a worker thread; this (GUI) thread shows progress and reads Cancel."""
        from SlicerSAM.errors import Cancelled
        from SlicerSAM.slicer_bridge import run_polling

        with slicer.util.tryWithErrorDisplay("Propagation failed."):
            self._ensureReady()
            work = self.logic.propagationWork(
                direction=self.ui.directionCombo.currentText,
                roiNode=self.ui.roiSelector.currentNode(),
            )
            state = {"done": 0, "total": 1, "message": "", "cancel": False}  # shared plain data

            def progress(done, total, message=""):  # worker thread: no Qt, no MRML
                state.update(done=done, total=total, message=message)

            self._busy = True  # the live preview waits: one user of the model at a time
            try:
                with gui.progressDialog("Propagating...", 1, cancel=state) as show:
                    poll = lambda: show(state["done"], state["total"], state["message"])  # noqa
                    outcome = run_polling(lambda: work(progress, lambda: state["cancel"]), poll)
                result = self.logic.applyPropagation(outcome)
                self._showStatus(f"SlicerSAM: propagated {result.summary()}")
            except Cancelled:
                self._showStatus("SlicerSAM: propagation cancelled; nothing changed")
            finally:
                self._busy = False
        self._updateButtons()

    def onAccept(self):
        if not self.ui.acceptButton.enabled:
            return
        with slicer.util.tryWithErrorDisplay("Accept failed.", waitCursor=True):
            region = self.logic.accept(
                self.ui.segmentSelector.currentNode(),
                self.ui.segmentSelector.currentSegmentID(),
                mode=self.ui.modeCombo.currentText,
            )
            self._showStatus(
                "SlicerSAM: nothing changed" if region is None else "SlicerSAM: accepted"
            )
        self._updateButtons()

    def onUndo(self):
        if not self.ui.undoButton.enabled:
            return
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            self.logic.undo()
        self._updateButtons()

    # ---------------------------------------------------------------- slots: evaluation
    def onReferenceChanged(self, node=None):
        with slicer.util.tryWithErrorDisplay("Cannot read the reference."):
            self.ui.referenceCombo.clear()
            for label, value in self.logic.referenceStructures(
                self.ui.referenceSelector.currentNode()
            ):
                self.ui.referenceCombo.addItem(label, value)
        self._updateButtons()

    def onEvaluate(self):
        with slicer.util.tryWithErrorDisplay("Evaluation failed.", waitCursor=True):
            result = self.logic.evaluate(
                self.ui.segmentSelector.currentNode(),
                self.ui.segmentSelector.currentSegmentID(),
                self.ui.referenceSelector.currentNode(),
                self.ui.referenceCombo.currentData,
            )
            self.ui.metricsView.setMRMLTableNode(result["table"])
        self._updateButtons()

    def onExportCsv(self):
        with slicer.util.tryWithErrorDisplay("CSV export failed."):
            path = qt.QFileDialog.getSaveFileName(
                self.parent, "Export metrics", "slicersam-metrics.csv", "CSV (*.csv)"
            )
            if path:
                self.logic.exportCsv(path)
                self._showStatus(f"SlicerSAM: wrote {path}")


# -------------------- Test
class SlicerSAMTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: SampleData, a box prompt, propagation, accept/undo, metrics (the flows
    are in SlicerSAMLib/selftest.py). Skips with the reason when PyTorch, the weights or the
    reference mask are missing; it never installs anything."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_logic_roundtrip, self.test_box_propagation_against_reference):
            self.setUp()
            test()

    def test_logic_roundtrip(self):
        from SlicerSAMLib.selftest import logicRoundtrip

        logicRoundtrip(self)

    def test_box_propagation_against_reference(self):
        from SlicerSAMLib.selftest import boxPropagationAgainstReference

        boxPropagationAgainstReference(self)
