"""Reading and writing files with Slicer's own MRML logics and storage nodes, no application.

``slicer.util.loadVolume`` and ``saveNode`` go through the application's IO manager, which
``Slicer --no-main-window`` has but Slicer's libraries alone (``slicer-core``) do not. These
helpers use the volumes logic and the segmentation storage node directly, so the batch script and
the tests read and write exactly what Slicer's readers and writers do, anywhere.
"""

import os

import slicer


def _volumes_logic():
    return slicer.modules.volumes.logic()


def loadVolume(path, name=None, labelmap=False):
    """A scalar (or, with ``labelmap``, a label map) volume node read by Slicer's volumes logic."""
    name = name or os.path.basename(str(path)).split(".")[0]
    node = _volumes_logic().AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    if node is None:
        raise RuntimeError(f"Slicer could not read the volume {path}")
    return node


def loadSegmentation(path, name=None):
    """A segmentation node read by Slicer's segmentation storage node (``.seg.nrrd``)."""
    scene = slicer.mrmlScene
    name = name or os.path.basename(str(path)).split(".")[0]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise RuntimeError(f"Slicer could not read the segmentation {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def saveSegmentation(node, path):
    """Write ``node`` as ``.seg.nrrd`` with Slicer's storage node, atomically: a temporary file
    beside ``path``, renamed onto it once complete (a failure leaves ``path`` as it was)."""
    path = os.path.abspath(str(path))
    if not path.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation is written as .seg.nrrd")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(path)[: -len(".seg.nrrd")]
    temporary = os.path.join(folder, f".{stem}.tmp.seg.nrrd")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(temporary)
        if not storage.WriteData(node) or not os.path.isfile(temporary):
            raise RuntimeError(f"Slicer could not write the segmentation {path}")
        os.replace(temporary, path)
    finally:
        slicer.mrmlScene.RemoveNode(storage)
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
