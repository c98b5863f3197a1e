"""Segment everything on one slice: the candidates a user picks from.

`segment_everything` runs `sam_core.automatic_mask_generator.SamAutomaticMaskGenerator` on the
embedding of one slice (the engine's cache: a slice already encoded costs only decoding) and
returns its masks on the slice grid, largest first, as `Candidate` records. A kept candidate is
an ordinary mask: `InteractiveSession.add_mask` makes it a key slice to propagate from.

Which prompts and thresholds (measured in docs/benchmarks.md, "Segment everything"):

- models trained with points (SAM): the official generator's defaults, a 32 x 32 point grid and
  the filters predicted IoU > 0.88, stability >= 0.95;
- box-trained models (LiteMedSAM, MedSAM; ``ModelSpec.point_prompts`` False): a point gives a few
  pixels, so each point of an 8 x 8 grid is a click answered as the engine answers a click, by
  the box around it the model is surest of (:mod:`SlicerSAM.box_search`; ``prompt="search"``).
  The alternative, square boxes of :data:`BOX_SIDES_MM` around each point (``prompt="boxes"``),
  finds as many structures at Dice >= 0.5 but fewer at >= 0.8, in twice as many candidates.
  These models' predicted IoU and stability run lower than SAM's, and the official thresholds
  keep nothing: :data:`BOX_FILTERS` are the thresholds they get.

Coordinates: masks (rows, cols) on the slice grid of `SlicePlane.grid`; prompt points and boxes in
model-image pixels (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from SlicerSAM.errors import PromptError

__all__ = [
    "BOX_FILTERS",
    "BOX_POINTS_PER_SIDE",
    "BOX_SIDES_MM",
    "CANDIDATE_COLOURS",
    "Candidate",
    "candidate_name",
    "check_slice",
    "segment_everything",
]

#: Box sides for box-trained models, mm: a rib's cross-section to a liver's (the click search's
#: range, SlicerSAM.box_search.HALF_SIZES_MM, stops at a kidney: a liver takes a second click).
BOX_SIDES_MM: Tuple[float, ...] = (12.0, 24.0, 48.0, 96.0, 192.0)
#: Grid points per side for box-trained models.
BOX_POINTS_PER_SIDE = 8
#: Distinct colours (r, g, b in 0..1) for candidate segments, cycled (CLI and Slicer module).
CANDIDATE_COLOURS = (
    (0.90, 0.30, 0.25), (0.30, 0.65, 0.90), (0.40, 0.80, 0.35), (0.95, 0.75, 0.20),
    (0.70, 0.45, 0.85), (0.20, 0.80, 0.75), (0.95, 0.50, 0.70), (0.60, 0.60, 0.60),
)  # fmt: skip
#: (pred_iou_thresh, stability_score_thresh, box_nms_thresh) for box-trained models.
BOX_FILTERS: Tuple[float, float, float] = (0.3, 0.7, 0.7)


@dataclass(frozen=True, eq=False)
class Candidate:
    """One mask the model found on a slice.

    mask: (rows, cols) bool on the slice grid; predicted_iou, stability_score: the model's
    confidence (SAM's definitions); prompt_xy: (x, y) model-image pixels of the grid point;
    prompt_box: XYXY model-image pixels of the box prompt (None for a point prompt).
    """

    mask: np.ndarray
    predicted_iou: float
    stability_score: float
    prompt_xy: Tuple[float, float]
    prompt_box: Optional[Tuple[float, float, float, float]] = None

    @property
    def area(self) -> int:
        """Voxels in the mask."""
        return int(self.mask.sum())


def candidate_name(number: int, candidate: Candidate) -> str:
    """The segment name of the ``number``-th candidate (from 1): its rank and confidence."""
    return (
        f"candidate {number} (IoU {candidate.predicted_iou:.2f}, "
        f"stability {candidate.stability_score:.2f})"
    )


def check_slice(plane, volume, index) -> int:
    """``index`` as a slice of ``plane`` (a `SlicePlane` of ``volume``) that holds an image.

    Cheap, before any model work: PromptError for an index that is not an integer or lies
    outside the volume, and for a slice of one constant value (outside the scan, padding), where
    there is nothing to segment.
    """
    n = int(plane.num_slices)
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise PromptError(f"slice index must be an integer, got {index!r}")
    if not 0 <= int(index) < n:
        raise PromptError(
            f"slice {index} is outside the volume: {plane.orientation} slices run 0..{n - 1}"
        )
    index = int(index)
    grid = np.asarray(plane.grid(volume.array, index))
    if not np.isfinite(grid).all():
        raise PromptError(f"slice {index} holds NaN or infinite values")
    if float(grid.max()) == float(grid.min()):
        raise PromptError(
            f"{plane.orientation} slice {index} is empty: every voxel is {float(grid.flat[0]):g}, "
            "there is nothing to segment"
        )
    return index


def _box_trained(segmenter) -> bool:
    return segmenter.point_prompts == "box"


def segment_everything(
    segmenter,
    index: int,
    *,
    points_per_side: Optional[int] = None,
    pred_iou_thresh: Optional[float] = None,
    stability_score_thresh: Optional[float] = None,
    box_nms_thresh: Optional[float] = None,
    box_sides_mm: Sequence[float] = BOX_SIDES_MM,
    min_area: int = 4,
    prompt: Optional[str] = None,
) -> List[Candidate]:
    """The candidates of slice ``index`` of a `SlicerSAM.segmenter.Segmenter`, largest first.

    Parameters left None take the model's defaults (module docstring). Masks of fewer than
    ``min_area`` voxels on the slice grid are dropped (a mask resampled from the model image can
    shrink to nothing). ``prompt``: "points", "boxes" or "search" (each grid point a click, made
    a box by the click search, :mod:`SlicerSAM.box_search`); None: the model's default.
    """
    from sam_core.automatic_mask_generator import SamAutomaticMaskGenerator

    index = check_slice(segmenter.plane, segmenter.volume, index)
    box_mode = _box_trained(segmenter)
    if prompt not in (None, "points", "boxes", "search"):
        raise ValueError(f"prompt must be 'points', 'boxes' or 'search', got {prompt!r}")
    prompt = prompt or ("search" if box_mode else "points")
    iou_t, stab_t, nms_t = BOX_FILTERS if box_mode else (0.88, 0.95, 0.7)
    options = dict(
        points_per_side=points_per_side or (BOX_POINTS_PER_SIDE if box_mode else 32),
        pred_iou_thresh=iou_t if pred_iou_thresh is None else pred_iou_thresh,
        stability_score_thresh=stab_t if stability_score_thresh is None else stability_score_thresh,
        box_nms_thresh=nms_t if box_nms_thresh is None else box_nms_thresh,
    )
    plane = segmenter.plane
    if prompt == "search":
        return _searched(segmenter, index, options, min_area)
    if prompt == "boxes":
        longer_mm = max(plane.image_shape) * min(plane.pixel_spacing)
        sides = tuple(min(1.0, float(s) / longer_mm) for s in box_sides_mm)
        options.update(prompt="boxes", box_sizes=sides)
    embedding = segmenter.embedding(index)
    with segmenter.predictor_on(embedding) as predictor:
        records = SamAutomaticMaskGenerator(predictor, **options).generate_from_embedding(embedding)
    same_grid = tuple(plane.image_shape) == tuple(plane.grid_shape)
    candidates = []
    for record in records:
        mask = record["segmentation"]
        if not same_grid:
            mask = np.asarray(plane.to_grid(mask.astype(np.float32), order=1)) >= 0.5
        if mask.sum() < min_area:
            continue
        box = record.get("prompt_box")
        candidates.append(
            Candidate(
                mask=mask,
                predicted_iou=record["predicted_iou"],
                stability_score=record["stability_score"],
                prompt_xy=tuple(record["point_coords"][0]),
                prompt_box=None if box is None else tuple(box),
            )
        )
    candidates.sort(key=lambda c: -c.area)
    return candidates


def _searched(segmenter, index: int, options: dict, min_area: int) -> List[Candidate]:
    """Each grid point a click, answered as the engine answers a click (for a box-trained model
    the box search's surest box); filters and box NMS as the generator's."""
    import torch

    from sam_core.automatic_mask_generator import (
        box_nms,
        build_point_grid,
        mask_boxes,
        stability_scores,
    )
    from SlicerSAM.prompts import SlicePrompts

    h, w = segmenter.plane.image_shape
    threshold = segmenter.predictor.mask_threshold
    iou_t, stab_t = options["pred_iou_thresh"], options["stability_score_thresh"]
    found = []
    for x, y in build_point_grid(options["points_per_side"]) * [w, h]:
        prompts = SlicePrompts(
            index, points_xy=np.array([[x, y]], np.float32), point_labels=np.array([1], np.int32)
        )
        result = segmenter.segment(index, prompts)
        logits = torch.from_numpy(result.low_res_logits[result.best][None])
        stability = float(stability_scores(logits, threshold, 1.0)[0])
        iou = float(result.iou[result.best])
        if (iou_t > 0 and iou <= iou_t) or (stab_t > 0 and stability < stab_t):
            continue  # a threshold of 0 turns its filter off, as in the generator
        if result.mask.sum() >= min_area:
            found.append(Candidate(result.mask, iou, stability, (float(x), float(y))))
    if not found:
        return []
    boxes = mask_boxes(torch.from_numpy(np.stack([c.mask for c in found])))
    scores = torch.tensor([c.predicted_iou for c in found])
    keep = box_nms(boxes, scores, options["box_nms_thresh"]).tolist()
    return sorted((found[i] for i in keep), key=lambda c: -c.area)
