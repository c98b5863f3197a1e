"""The flows of the module's in-Slicer self-test (``SlicerSAMTest`` in SlicerSAM.py).

They need Slicer's application (SampleData downloads, the module's requirements installed) and
skip with the reason otherwise; the same flows run on Slicer's libraries in CI
(Testing/Python/test_slicer_core.py).
"""

import os
import unittest

import numpy as np
import slicer

from SlicerSAMLib.logic import MODULE_DIR, SlicerSAMLogic

REFERENCE = os.path.join(MODULE_DIR, "Testing", "Data", "CTChest-reference.seg.nrrd")
# LiteMedSAM on the reference structure, prompted with its exact box on the middle slice
KEY_SLICE_DICE = 0.80
VOLUME_DICE = 0.50


def logicOn(sample):
    """A Logic with SampleData volume ``sample`` and LiteMedSAM loaded; SkipTest without them."""
    import SampleData

    logic = SlicerSAMLogic()
    missing = logic.missingDependencies()
    if missing:
        raise unittest.SkipTest("dependencies not installed: " + ", ".join(missing))
    if logic.modelDownload() is not None:
        raise unittest.SkipTest("LiteMedSAM weights not available offline")
    logic.setVolume(SampleData.SampleDataLogic().downloadSample(sample))
    logic.loadModel()
    return logic


def boxNode(volume, plane, index, grid2d):
    """An ROI node around the voxels of slice-grid mask ``grid2d`` on slice ``index``."""
    from SlicerSAM.slicer_bridge import slice_mask_ras_bounds

    bounds = np.array(slice_mask_ras_bounds(volume, plane, index, grid2d))
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "test box")
    roi.SetCenter(((bounds[0::2] + bounds[1::2]) / 2).tolist())
    roi.SetSize((bounds[1::2] - bounds[0::2]).tolist())
    return roi


def logicRoundtrip(test):
    """Box on MRHead's middle slice -> one-slice mask -> accept touches that slice -> undo."""
    logic = logicOn("MRHead")
    plane = logic.plane()
    index = plane.num_slices // 2
    rows, cols = plane.grid_shape
    centre = np.zeros(plane.grid_shape, dtype=bool)
    centre[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4] = True
    result = logic.segmentSlice(roiNode=boxNode(logic.volume, plane, index, centre))
    test.assertEqual((result.index, result.mask.shape), (index, tuple(plane.grid_shape)))
    segmentation = logic.ensureSegmentation()
    segmentId = logic.addSegment(segmentation)
    test.assertIsNotNone(logic.accept(segmentation, segmentId))
    labels = logic._segmentArray(segmentation, segmentId)
    slices = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != plane.axis)))
    test.assertEqual(slices.tolist(), [index])
    test.assertTrue(logic.undo())
    test.assertFalse(logic._segmentArray(segmentation, segmentId).any())


def boxPropagationAgainstReference(test):
    """Box from the reference's middle slice, propagate, compare Dice with thresholds."""
    if not os.path.isfile(REFERENCE):
        raise unittest.SkipTest(f"reference mask {REFERENCE} not present")
    logic = logicOn("CTChest")
    reference = slicer.util.loadSegmentation(REFERENCE)
    plane = logic.plane()
    referenceId = reference.GetSegmentation().GetNthSegmentID(0)
    truth = logic._segmentArray(reference, referenceId)
    present = [i for i in range(plane.num_slices) if plane.grid(truth, i).any()]
    index = present[len(present) // 2]
    key = plane.grid(truth, index).astype(bool)
    result = logic.segmentSlice(roiNode=boxNode(logic.volume, plane, index, key))
    dice = 2.0 * np.logical_and(result.mask, key).sum() / (result.mask.sum() + key.sum())
    test.assertGreaterEqual(dice, KEY_SLICE_DICE)
    logic.propagate(direction="both")
    segmentation = logic.ensureSegmentation()
    segmentId = logic.addSegment(segmentation)
    logic.accept(segmentation, segmentId)
    metrics = logic.evaluate(segmentation, segmentId, reference, referenceId, showChart=False)
    test.assertGreaterEqual(metrics["rows"][0]["dice"], VOLUME_DICE)
