"""Draw the README's picture: a click and an ROI on the shared CT, propagated through the volume.

The left kidney of ``../shared/data/ct-abdomen-3mm`` (the CT the demo ships with): an ROI around
it and one click at its most interior point on its largest axial slice, given to an
``InteractiveSession`` exactly as the CLI and the Slicer module give them, then propagated. The
picture shows three axial slices and a coronal one (the CT at window L40/W400, the result in
orange, the reference outline in green, the ROI dashed, the click as a cross) and prints the
Dice. From the repository root::

    python docs/make_readme_image.py [--output docs/images/kidney.png]

Drawn with matplotlib: Slicer's own slice views need the application (or its displayable
managers with an OpenGL context), which the ``slicer-core`` wheel does not set up on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SlicerSAM.intensity import parse_intensity  # noqa: E402
from SlicerSAM.mask_geometry import grid_to_image_mask, interior_point  # noqa: E402
from SlicerSAM.prompts import Box, Point, Prompts  # noqa: E402
from SlicerSAM.session import InteractiveSession  # noqa: E402
from SlicerSAM.slicing import plane_for  # noqa: E402
from SlicerSAM.volume import load_volume  # noqa: E402

SAMPLE = ROOT / "SlicerSAM" / "sample"
LEFT_KIDNEY = 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "images" / "kidney.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ct = load_volume(SAMPLE / "ct.nii.gz")
    reference = np.asarray(load_volume(SAMPLE / "labels.nii.gz").array) == LEFT_KIDNEY
    axial = plane_for(ct, "axial")
    key = int(np.argmax([axial.grid(reference, k).sum() for k in range(axial.num_slices)]))
    x, y = interior_point(grid_to_image_mask(axial, axial.grid(reference, key)))
    click = tuple(axial.xy_to_voxel(key, np.array([[x, y]]))[0])
    kji = np.argwhere(reference)
    lo = np.maximum(kji.min(0) - 2, 0)
    hi = np.minimum(kji.max(0) + 2, np.array(ct.shape) - 1)
    prompts = Prompts(
        points=(Point(click),),
        box=Box(tuple(lo.astype(float)), tuple(hi.astype(float))),
        frame="kji",
    )
    session = InteractiveSession(ct, "litemedsam", intensity=parse_intensity("40,400"))
    session.set_prompts(prompts)
    result = session.propagate()
    pred = session.result_volume().astype(bool)
    dice = 2 * (pred & reference).sum() / (pred.sum() + reference.sum())
    print(f"left kidney, ROI + one click: Dice {dice:.3f}; {result.summary()}")

    window = parse_intensity("40,400")
    bounds = window.bounds(ct)
    coronal = plane_for(ct, "coronal")
    views = [(axial, k, f"axial slice {k}") for k in (key - 6, key, key + 6)]
    views.append((coronal, int(click[1]), f"coronal slice {int(click[1])}"))
    fig, axes = plt.subplots(1, len(views), figsize=(4 * len(views), 4))
    for ax, (plane, index, title) in zip(axes, views):
        image = window.apply(np.asarray(plane.grid(ct.array, index), np.float32), bounds)
        rs, cs = plane.grid_spacing
        ax.imshow(image, cmap="gray", aspect=rs / cs, interpolation="nearest")
        mask = np.asarray(plane.grid(pred, index), bool)
        ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45, aspect=rs / cs)
        ax.contour(np.asarray(plane.grid(reference, index), float), [0.5], colors="lime")
        roi = session.roi if plane is axial else None
        if roi is not None:
            x0, y0, x1, y1 = roi.bounds_xyxy
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", ec="cyan"))
        if plane is axial and index == key:
            ax.plot([x], [y], "+", color="yellow", ms=14, mew=2)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(
        f"Left kidney from one ROI and one click, propagated: Dice {dice:.2f} "
        "(orange: SlicerSAM, green: reference)"
    )
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
