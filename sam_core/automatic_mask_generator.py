"""Segment everything on an image: SAM's automatic mask generator, written for sam_core.

`SamAutomaticMaskGenerator` takes the parameters of the official
``segment_anything.SamAutomaticMaskGenerator`` and returns the same records, by the same steps:

1. **Prompts on a grid.** ``points_per_side`` x ``points_per_side`` points, at the centres of a
   regular grid over the image (or over each crop, see 4).
2. **Masks.** Each point is decoded (three candidates per point with ``multimask_output``), in
   batches of ``points_per_batch``.
3. **Filters.** A mask stays when the model's predicted IoU exceeds ``pred_iou_thresh`` and its
   stability score (the area where the logits exceed ``+stability_score_offset`` over the area
   where they exceed ``-stability_score_offset``) reaches ``stability_score_thresh``; then box
   non-maximum suppression at ``box_nms_thresh`` (score: predicted IoU) removes duplicates.
4. **Crops** (``crop_n_layers`` > 0): layer i cuts the image into 2^i x 2^i overlapping crops, each
   encoded and prompted with a grid of ``points_per_side / crop_n_points_downscale_factor^i``
   points per side; masks touching a crop's inner edge are dropped, and duplicates across crops
   removed preferring smaller crops (``crop_nms_thresh``).
5. **Small regions** (``min_mask_region_area`` > 0): holes and islands smaller than that many
   pixels are removed from each mask, then duplicates are removed again.

Box-trained models (LiteMedSAM, MedSAM) answer a bare point with a few pixels at a predicted IoU
of 0.1-0.2 (docs/propagation.md, "Clicks for box-trained models"), so every point-grid mask fails
the filters. For them ``prompt="boxes"`` prompts each grid point with a square box of each side in
``box_sizes`` (fractions of the longer side of the image or crop), centred on the point and
clipped to it, one mask per box; the filters and the records are the same, and each record also
carries the ``prompt_box``. docs/benchmarks.md ("Segment everything") measures both prompts and
the thresholds that suit box-trained models.

Records (one dict per mask, in the order that non-maximum suppression keeps them):
``segmentation`` ((H, W) bool, or COCO's uncompressed RLE ``{"size": [H, W], "counts": [...]}``
with ``output_mode="uncompressed_rle"``), ``area`` (pixels), ``bbox`` (XYWH of the mask, the
official convention: width = last column - first column), ``predicted_iou``,
``stability_score``, ``point_coords`` ([[x, y]] of the prompt), ``crop_box`` (XYWH), and in box
mode ``prompt_box`` (XYXY). Coordinates are (x, y) = (column, row) pixels of the image.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sam_core.predictor import ImageEmbedding, SamPredictor

__all__ = [
    "BOX_SIZES",
    "SamAutomaticMaskGenerator",
    "box_nms",
    "build_point_grid",
    "generate_crop_boxes",
    "mask_boxes",
    "remove_small_regions",
    "stability_scores",
]

#: Box sides for ``prompt="boxes"``, as fractions of the longer image side: on a 512-pixel CT
#: slice of a 350 mm field of view, 17 to 140 mm, a rib's cross-section to a liver's.
BOX_SIZES: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle")
PROMPTS = ("points", "boxes")
# A mask whose box lies within this many pixels of a crop's inner edge is cut by the crop.
_CROP_EDGE_PX = 20.0


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n^2, 2) (x, y) points at the centres of an n x n grid over [0, 1]^2, x varying fastest."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes of every layer for an (H, W) image, and each box's layer (0: the image)."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for layer in range(n_layers):
        n_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_side))
        crop_w, crop_h = crop_len(im_w, n_side, overlap), crop_len(im_h, n_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer + 1)
    return boxes, layers


def stability_scores(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """(N,) IoU between each (N, H, W) mask thresholded at threshold + offset and - offset."""
    high = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int64)
    low = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int64)
    return high.to(torch.float32) / low.clamp(min=1).to(torch.float32)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY of (N, H, W) bool masks: first and last column/row of each; 0s if empty."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    h, w = masks.shape[-2:]
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    col_idx = torch.arange(w, device=masks.device)[None]
    row_idx = torch.arange(h, device=masks.device)[None]
    x1 = torch.where(cols, col_idx, -1).amax(1)
    x0 = torch.where(cols, col_idx, w).amin(1)
    y1 = torch.where(rows, row_idx, -1).amax(1)
    y0 = torch.where(rows, row_idx, h).amin(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    return torch.where((x1 >= 0)[:, None], boxes, torch.zeros_like(boxes))


def _box_iou(boxes: torch.Tensor) -> torch.Tensor:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-9), torch.zeros_like(inter))


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the (N, 4) XYXY boxes that greedy non-maximum suppression keeps, best first.

    A box is dropped when its IoU with a better-scoring kept box exceeds ``iou_threshold`` (ties
    keep the earlier box). The IoU uses continuous areas ((x1 - x0) * (y1 - y0)), as
    torchvision's ``nms`` does, which the official generator calls.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = _box_iou(boxes[order].to(torch.float32)) > iou_threshold
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i]
    return order[torch.tensor(keep, dtype=torch.int64)]


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> Tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) under ``area_thresh`` pixels.

    8-connected regions, as the official generator (OpenCV there, scipy here). Dropping islands
    keeps the largest one when all are small. Returns (mask, whether it changed).
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = holes ^ mask.astype(bool)
    regions, n = ndimage.label(working, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask.astype(bool), False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def _rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE of an (H, W) bool mask (column-major runs, starting with 0s)."""
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


class SamAutomaticMaskGenerator:
    """Every mask the model finds on an image (the official generator's parameters and records).

    Args:
        model: a `sam_core.sam.Sam` or a `SamPredictor` around one.
        points_per_side: grid points per side (ignored when ``point_grids`` is given).
        points_per_batch: prompts decoded together (memory: batch x 3 x H x W float32 logits).
        pred_iou_thresh: keep masks whose predicted IoU exceeds this.
        stability_score_thresh: keep masks whose stability score reaches this.
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which the lower-scoring of two masks is a duplicate.
        crop_n_layers, crop_nms_thresh, crop_overlap_ratio, crop_n_points_downscale_factor:
            crops, as in the official generator (module docstring, step 4).
        point_grids: explicit (N, 2) grids in [0, 1] per crop layer, instead of points_per_side.
        min_mask_region_area: remove holes and islands under this many pixels (0: off).
        output_mode: ``"binary_mask"`` or ``"uncompressed_rle"``.
        prompt: ``"points"`` (SAM) or ``"boxes"`` (box-trained models, module docstring).
        box_sizes: box sides for ``prompt="boxes"``, fractions of the longer image/crop side.
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        prompt: str = "points",
        box_sizes: Sequence[float] = BOX_SIZES,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None and points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r} "
                "(COCO's compressed RLE needs pycocotools: convert the uncompressed RLE with it)"
            )
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be 'points' or 'boxes', got {prompt!r}")
        box_sizes = tuple(float(s) for s in box_sizes)
        if prompt == "boxes" and (not box_sizes or not all(0 < s <= 1 for s in box_sizes)):
            raise ValueError(f"box_sizes must be fractions in (0, 1], got {box_sizes}")
        if point_grids is None:
            scale = crop_n_points_downscale_factor
            point_grids = [
                build_point_grid(max(1, int(points_per_side / scale**i)))
                for i in range(crop_n_layers + 1)
            ]
        elif len(point_grids) != crop_n_layers + 1:
            raise ValueError(
                f"point_grids holds {len(point_grids)} grids for {crop_n_layers + 1} crop layers"
            )
        self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
        self.point_grids = [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in point_grids]
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        self.prompt = prompt
        self.box_sizes = box_sizes

    # -- entry points -------------------------------------------------------------------------

    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Records for every mask on an (H, W, 3) uint8 RGB (or (H, W) grey) image."""
        image = np.asarray(image)
        if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"image must be H x W or H x W x 3, got shape {image.shape}")
        size = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        data = self._merge_crops(
            [self._process_crop(image, box, layer, size) for box, layer in zip(crop_boxes, layers)],
            crop_boxes,
        )
        return self._records(self._small_regions(data))

    def generate_from_embedding(self, embedding: ImageEmbedding) -> List[Dict[str, Any]]:
        """Records for an image already encoded (no crops: they need their own encodings)."""
        if self.crop_n_layers:
            raise ValueError("crops need the image itself: call generate(image)")
        h, w = embedding.original_size
        data = self._process_crop(None, [0, 0, w, h], 0, (h, w), embedding=embedding)
        return self._records(self._small_regions(data))

    # -- steps --------------------------------------------------------------------------------

    def _prompts(self, points: np.ndarray, crop_w: int, crop_h: int) -> Tuple[np.ndarray, ...]:
        """(prompt points (P, 2), boxes (P, 4) or None) in crop pixels for grid points (N, 2)."""
        if self.prompt == "points":
            return points, None
        side = max(crop_w, crop_h)
        centres = np.repeat(points, len(self.box_sizes), axis=0)
        half = np.tile(np.asarray(self.box_sizes) * side / 2.0, len(points))[:, None]
        lo = np.clip(centres - half, 0, None)
        hi = np.minimum(centres + half, [crop_w - 1, crop_h - 1])
        return centres, np.concatenate([lo, hi], axis=1)

    def _process_crop(
        self,
        image: Optional[np.ndarray],
        crop_box: List[int],
        layer: int,
        orig_size: Tuple[int, int],
        embedding: Optional[ImageEmbedding] = None,
    ) -> Dict[str, torch.Tensor]:
        x0, y0, x1, y1 = crop_box
        if embedding is None:
            embedding = self.predictor.encode(np.ascontiguousarray(image[y0:y1, x0:x1]))
        self.predictor.set_embedding(embedding)
        crop_h, crop_w = embedding.original_size
        points, boxes = self._prompts(self.point_grids[layer] * [crop_w, crop_h], crop_w, crop_h)
        parts = []
        for start in range(0, len(points), self.points_per_batch):
            stop = start + self.points_per_batch
            parts.append(
                self._process_batch(
                    points[start:stop],
                    None if boxes is None else boxes[start:stop],
                    crop_box,
                    orig_size,
                )
            )
        self.predictor.reset_image()
        data = _cat(parts)
        keep = box_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh)
        data = _take(data, keep)
        # Back to the full image: boxes, points and masks shift by the crop's corner.
        offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + offset[:2].to(torch.float64)
        if data.get("prompt_boxes") is not None:
            data["prompt_boxes"] = data["prompt_boxes"] + offset.to(torch.float64)
        h, w = orig_size
        if (x0, y0, x1, y1) != (0, 0, w, h):
            full = torch.zeros((data["masks"].shape[0], h, w), dtype=torch.bool)
            full[:, y0:y1, x0:x1] = data["masks"]
            data["masks"] = full
        data["crop_boxes"] = torch.tensor([crop_box] * data["masks"].shape[0], dtype=torch.float32)
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        boxes: Optional[np.ndarray],
        crop_box: List[int],
        orig_size: Tuple[int, int],
    ) -> Dict[str, torch.Tensor]:
        p = self.predictor
        if boxes is None:
            coords = torch.as_tensor(points, dtype=torch.float32)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int64)
            logits, iou, _ = p.predict_torch(
                point_coords=coords, point_labels=labels, multimask_output=True, return_logits=True
            )
        else:
            logits, iou, _ = p.predict_torch(
                boxes=torch.as_tensor(boxes, dtype=torch.float32),
                multimask_output=False,
                return_logits=True,
            )
        per_prompt = logits.shape[1]
        logits = logits.flatten(0, 1).cpu()
        iou = iou.flatten().cpu()
        pts = torch.as_tensor(points, dtype=torch.float64).repeat_interleave(per_prompt, 0)
        keep = torch.ones_like(iou, dtype=torch.bool)
        if self.pred_iou_thresh > 0:  # 0 turns a filter off, as in the official generator
            keep = keep & (iou > self.pred_iou_thresh)
        stability = stability_scores(logits, p.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            keep = keep & (stability >= self.stability_score_thresh)
        masks = logits > p.mask_threshold
        masks_any = masks.flatten(1).any(1)
        keep &= masks_any
        mboxes = mask_boxes(masks)
        keep &= ~self._near_crop_edge(mboxes, crop_box, orig_size)
        data = {
            "masks": masks[keep],
            "iou_preds": iou[keep],
            "stability": stability[keep],
            "boxes": mboxes[keep],
            "points": pts[keep],
        }
        if boxes is not None:
            data["prompt_boxes"] = torch.as_tensor(boxes, dtype=torch.float64)[keep]
        return data

    @staticmethod
    def _near_crop_edge(boxes: torch.Tensor, crop_box, orig_size) -> torch.Tensor:
        """Masks (boxes in crop pixels) cut by an inner edge of the crop (not the image's)."""
        h, w = orig_size
        crop = torch.tensor(crop_box, dtype=torch.float32)
        if tuple(crop_box) == (0, 0, w, h):
            return torch.zeros(boxes.shape[0], dtype=torch.bool)
        shifted = boxes + torch.tensor([crop_box[0], crop_box[1]] * 2, dtype=torch.float32)
        image = torch.tensor([0, 0, w, h], dtype=torch.float32)
        near_crop = torch.isclose(shifted, crop[None], atol=_CROP_EDGE_PX, rtol=0)
        near_image = torch.isclose(shifted, image[None], atol=_CROP_EDGE_PX, rtol=0)
        return (near_crop & ~near_image).any(1)

    def _merge_crops(self, parts: List[Dict[str, torch.Tensor]], crop_boxes) -> Dict:
        data = _cat(parts)
        if len(crop_boxes) > 1 and data["masks"].shape[0]:
            # Prefer masks from smaller crops: they saw the object at a higher resolution.
            cb = data["crop_boxes"]
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data = _take(data, box_nms(data["boxes"], scores, self.crop_nms_thresh))
        return data

    def _small_regions(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.min_mask_region_area <= 0 or data["masks"].shape[0] == 0:
            return data
        masks, unchanged = [], []
        for mask in data["masks"].numpy():
            mask, holes = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, islands = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(mask)
            unchanged.append(not (holes or islands))
        data["masks"] = torch.from_numpy(np.stack(masks))
        data["boxes"] = mask_boxes(data["masks"])
        # Prefer the masks that needed no cleaning (the official generator's rule).
        scores = torch.tensor(unchanged, dtype=torch.float32)
        keep = box_nms(data["boxes"], scores, self.box_nms_thresh)
        data = _take(data, keep)
        nonempty = data["masks"].flatten(1).any(1)
        return _take(data, torch.nonzero(nonempty).flatten())

    def _records(self, data: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
        records = []
        for i in range(data["masks"].shape[0]):
            mask = data["masks"][i].numpy()
            x0, y0, x1, y1 = (float(v) for v in data["boxes"][i])
            cx0, cy0, cx1, cy1 = (float(v) for v in data["crop_boxes"][i])
            record = {
                "segmentation": mask if self.output_mode == "binary_mask" else _rle(mask),
                "area": int(mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [[float(v) for v in data["points"][i]]],
                "stability_score": float(data["stability"][i]),
                "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
            }
            if data.get("prompt_boxes") is not None:
                record["prompt_box"] = [float(v) for v in data["prompt_boxes"][i]]
            records.append(record)
        return records


def _cat(parts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = parts[0].keys()
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def _take(data: Dict[str, torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {k: v[index] for k, v in data.items()}
