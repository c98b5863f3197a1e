"""Headless SlicerSAM run inside 3D Slicer: volume + markups -> segment, propagate, save, metrics.

Run with Slicer's own Python and no main window::

    Slicer --no-main-window --python-script Resources/Scripts/batch_segment.py \\
        --volume ct.nrrd --markups prompts.mrk.json --output liver.seg.nrrd \\
        [--reference reference.seg.nrrd | --reference labels.nii.gz --label 6] \\
        [--model litemedsam] [--checkpoint file.pth] [--window abdomen] \\
        [--direction both|up|down|roi|none] [--csv metrics.csv] [--install] [--download]

The markups file (.mrk.json) holds the prompts: point lists (positive, or negative when the list
or point is named "neg"/"negative"/"background", see SlicerSAM/markups.py) and/or one ROI box.
Points may lie on several slices (each a key slice); a box thicker than one slice is a region of
interest that bounds every mask and the propagation (docs/prompts.md, "How prompts combine").

It uses only ``SlicerSAMLogic`` (the module's Logic works without its widget, and without the
application: files are read and written by Slicer's logics and storage nodes,
``SlicerSAMLib.storage``), so what this script does is what the module's buttons do.
``--install`` lets it install missing Python packages (PyTorch through the PyTorch extension)
without asking; ``--download`` allows the download of model weights that are not cached yet.
Exit status 0 on success, 1 on error.
"""

import argparse
import logging
import sys
import traceback

import slicer


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n")[0])
    parser.add_argument("--volume", required=True, help="CT/MR volume file (NRRD, NIfTI, ...)")
    parser.add_argument("--markups", required=True, help="prompts as a Slicer .mrk.json file")
    parser.add_argument("--output", required=True, help="segmentation to write (.seg.nrrd)")
    parser.add_argument("--name", default="SAM", help="segment name (default: SAM)")
    parser.add_argument("--reference", help="reference .seg.nrrd or labelmap for metrics")
    parser.add_argument("--label", type=int, help="label value in a labelmap reference")
    parser.add_argument("--model", default="litemedsam", help="model name (default litemedsam)")
    parser.add_argument("--checkpoint", help="local checkpoint file for the model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--window", help="intensity: preset (abdomen, lung, ...), 'L,W' or 'mr'")
    parser.add_argument("--orientation", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument(
        "--direction", default="both", choices=("both", "up", "down", "roi", "none")
    )
    parser.add_argument("--csv", help="write the metrics table to this CSV file")
    parser.add_argument("--install", action="store_true", help="install missing packages")
    parser.add_argument("--download", action="store_true", help="allow downloading weights")
    return parser.parse_args(argv)


def progress(done, total, message=""):
    print(f"  {done}/{total} {message}", flush=True)


def load_reference(path):
    from SlicerSAMLib import storage

    if path.endswith(".seg.nrrd"):
        return storage.loadSegmentation(path)
    return storage.loadVolume(path, labelmap=True)


def run(args):
    from SlicerSAM import SlicerSAMLogic  # the loaded module (SlicerSAM.py), not the engine
    from SlicerSAM.markups import read_markups
    from SlicerSAMLib import storage

    logic = SlicerSAMLogic()
    logic.logCallback = print
    missing = logic.missingDependencies()
    if missing and not args.install:
        raise RuntimeError(f"missing packages {missing}: rerun with --install to install them")
    logic.ensureDependencies(askConfirmation=False)

    logic.setModel(args.model, args.checkpoint, device=args.device)
    logic.allowDownload = args.download
    logic.setOrientation(args.orientation)
    volume_node = storage.loadVolume(args.volume)
    logic.setVolume(volume_node, logic.intensityForChoice(args.window) if args.window else None)
    download = logic.modelDownload()
    if download is not None and not args.download:
        size, url = download
        raise RuntimeError(
            f"{args.model} weights ({size} bytes) need a download from {url}: "
            "rerun with --download, or pass --checkpoint"
        )
    logic.loadModel(progress=progress)

    prompts = read_markups(args.markups)
    logic.segmentSlice(prompts=prompts)
    for index, key in sorted(logic.keyMasks.items()):
        print(f"key slice {index}: {int(key.mask.sum())} pixels")
    if args.direction != "none":
        logic.propagate(direction=args.direction, progress=progress)

    segmentation = logic.ensureSegmentation()
    segment_id = logic.addSegment(segmentation, args.name)
    region = logic.accept(segmentation, segment_id)
    print(f"changed region (k, j, i): {region}")
    storage.saveSegmentation(segmentation, args.output)
    print(f"wrote {args.output}")

    if args.reference:
        reference = load_reference(args.reference)
        structure = args.label
        if structure is None and reference.IsA("vtkMRMLSegmentationNode"):
            structure = reference.GetSegmentation().GetNthSegmentID(0)
        metrics = logic.evaluate(segmentation, segment_id, reference, structure, showChart=False)
        for row in metrics["rows"]:
            print(
                f"{row['structure']}: Dice {row['dice']:.3f}  IoU {row['iou']:.3f}  "
                f"HD95 {row['hd95_mm']:.1f} mm  NSD {row['nsd']:.3f}"
            )
        if args.csv:
            logic.exportCsv(args.csv)
            print(f"wrote {args.csv}")


def main(argv):
    logging.basicConfig(level=logging.INFO)
    if argv and argv[0] == "--":  # tolerate a "--" separator before the script's options
        argv = argv[1:]
    try:
        run(parse_args(argv))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
