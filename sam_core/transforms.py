"""Image preprocessing, prompt-coordinate scaling and mask postprocessing for SAM-family models.

Three frames (shapes are (height, width), coordinates (x, y) = (column, row) pixels):

- the *original* image (H, W) given to the predictor;
- the *input* frame: the image resized so its longest side is ``img_size`` (h, w), then padded
  bottom/right with zeros to ``img_size x img_size`` (the model's input);
- the *low-res* frame: the mask decoder's 256 x 256 output, which covers the padded input frame,
  so its unpadded part is (h, w) scaled by ``256 / img_size``.

Points and boxes go original -> input by ``x * w / W``, ``y * h / H`` (as upstream SAM's
``ResizeLongestSide.apply_coords``). Masks come back by cropping the low-res logits to the unpadded
region and resizing bilinearly (``align_corners=False``) to the output size; foreground is
``logit > 0``. This is what the official LiteMedSAM inference does (there img_size = 256, so the
crop is exactly (h, w)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

LOW_RES_SIZE = 256
# Logit magnitude given to an existing segment used as a dense (mask) prompt: +20 inside, -20
# outside. SAM's own confident low-res logits are of this order (roughly 10 to 30), so the prompt
# looks like one of its earlier predictions; sigmoid(20) = 1 - 2e-9. Pixels on the boundary get
# intermediate values from the resampling, which keeps the edge soft as in real logits.
MASK_PROMPT_LOGIT = 20.0

Array = Union[np.ndarray, torch.Tensor]
Size = tuple[int, int]


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input image.

    Always: resize longest side to ``img_size`` keeping the aspect ratio, normalise, pad
    bottom/right with 0 after normalisation; boxes/points scaled by the same factor; low-res
    logits cropped to the unpadded region then resized bilinearly to the output size;
    foreground where logit > 0.
    """

    img_size: int  # 1024 for SAM/MedSAM, 256 for LiteMedSAM
    normalization: str  # "imagenet" (pixel mean/std, SAM) | "minmax" (to [0, 1])
    pixel_mean: tuple = (123.675, 116.28, 103.53)
    pixel_std: tuple = (58.395, 57.12, 57.375)


def get_preprocess_shape(height: int, width: int, long_side: int) -> Size:
    """(h, w) of a (height, width) image resized so its longest side is ``long_side``.

    Rounded half up, as upstream SAM's ``ResizeLongestSide.get_preprocess_shape``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got ({height}, {width})")
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _image_to_tensor(image: np.ndarray, device: Optional[torch.device]) -> torch.Tensor:
    """(H, W) or (H, W, 3) array -> (1, 3, H, W) float32 tensor on ``device``."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, not {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        channels = 1
    elif image.ndim == 3 and image.shape[2] == 3:
        channels = 3
    else:
        raise ValueError(f"image must be H x W or H x W x 3, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"image must be numeric (uint8 expected), got dtype {image.dtype}")
    # Move the (small, usually uint8) array to the device first, convert there.
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    tensor = tensor.to(torch.float32)
    if channels == 1:
        tensor = tensor[None, None].expand(1, 3, -1, -1)
    else:
        tensor = tensor.permute(2, 0, 1)[None]
    return tensor


def _normalise(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    if pre.normalization == "minmax":
        # Over the whole resized image, all channels, as the official LiteMedSAM inference
        # ((x - min) / clip(max - min, 1e-8)).
        lo = x.amin()
        hi = x.amax()
        return (x - lo) / torch.clamp(hi - lo, min=1e-8)
    if pre.normalization == "imagenet":
        mean = torch.tensor(pre.pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    raise ValueError(
        f"unknown normalization {pre.normalization!r}: expected 'minmax' or 'imagenet'"
    )


def preprocess_image(
    image: np.ndarray, pre: Preprocessing, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, Size]:
    """Turn an image into the model's input.

    Args:
        image: H x W x 3 uint8 (RGB) or H x W uint8 (replicated to 3 channels). Other numeric
            dtypes are accepted and used as they are (values expected in 0..255).
        pre: the model's preprocessing.
        device: where the tensor is built (the model's device).

    Returns:
        (x, input_size): x is 1 x 3 x S x S float32 (S = ``pre.img_size``): resized longest
        side to S (bilinear, antialiased, values kept in the 0..255 range), normalised, padded
        bottom/right with zeros; input_size is the (h, w) before padding.
    """
    x = _image_to_tensor(image, device)
    height, width = x.shape[-2:]
    input_size = get_preprocess_shape(height, width, pre.img_size)
    if input_size != (height, width):
        x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=False, antialias=True)
    x = _normalise(x, pre)
    pad_h = pre.img_size - input_size[0]
    pad_w = pre.img_size - input_size[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    return x, input_size


def _scale_xy(original_size: Size, input_size: Size) -> tuple[float, float]:
    (old_h, old_w), (new_h, new_w) = original_size, input_size
    return new_w / old_w, new_h / old_h


def apply_coords(coords: Array, original_size: Size, input_size: Size) -> Array:
    """Scale (..., 2) (x, y) coordinates from original-image pixels to the input frame.

    Works on numpy arrays (returns float32) and tensors (returns float32 on the same device).
    """
    sx, sy = _scale_xy(original_size, input_size)
    if isinstance(coords, torch.Tensor):
        scale = torch.tensor([sx, sy], dtype=torch.float32, device=coords.device)
        return coords.to(torch.float32) * scale
    return np.asarray(coords, dtype=np.float32) * np.array([sx, sy], dtype=np.float32)


def apply_boxes(boxes: Array, original_size: Size, input_size: Size) -> Array:
    """Scale (..., 4) XYXY boxes from original-image pixels to the input frame."""
    sx, sy = _scale_xy(original_size, input_size)
    if isinstance(boxes, torch.Tensor):
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=boxes.device)
        return boxes.to(torch.float32) * scale
    return np.asarray(boxes, dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)


def low_res_region(input_size: Size, img_size: int, low_res_size: int = LOW_RES_SIZE):
    """(rows, cols) of the unpadded region in the low-res frame, as floats."""
    factor = low_res_size / img_size
    return input_size[0] * factor, input_size[1] * factor


def postprocess_masks(
    low_res_logits: torch.Tensor, input_size: Size, output_size: Size, img_size: int
) -> torch.Tensor:
    """Low-res logits (B, C, 256, 256) -> logits (B, C, *output_size), float32.

    Crops the low-res frame to the part covering the unpadded image ((h, w) * 256 / img_size),
    then resizes bilinearly (align_corners=False) to ``output_size``. When that region is not a
    whole number of low-res pixels (SAM at 1024 with h not a multiple of 4), the crop is exact:
    the resize maps output pixel centres onto the fractional region instead of rounding it.
    """
    if low_res_logits.dim() != 4:
        raise ValueError(f"low_res_logits must be B x C x h x w, got {tuple(low_res_logits.shape)}")
    out_h, out_w = int(output_size[0]), int(output_size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    logits = low_res_logits.to(torch.float32)
    low = logits.shape[-1]
    rh, rw = low_res_region(input_size, img_size, low)
    if float(rh).is_integer() and float(rw).is_integer():
        cropped = logits[..., : int(rh), : int(rw)]
        if cropped.shape[-2:] == (out_h, out_w):
            return cropped
        return F.interpolate(cropped, size=(out_h, out_w), mode="bilinear", align_corners=False)
    # Fractional region: crop whole pixels covering it and map with the exact scale
    # (source = (dest + 0.5) * region / output - 0.5), then trim the surplus rows/columns.
    ch, cw = min(math.ceil(rh), low), min(math.ceil(rw), low)
    cropped = logits[..., :ch, :cw]
    resized = F.interpolate(
        cropped,
        scale_factor=(out_h / rh, out_w / rw),
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )
    if resized.shape[-2] < out_h or resized.shape[-1] < out_w:  # pragma: no cover - float edge
        cropped = logits[..., : round(rh), : round(rw)]
        return F.interpolate(cropped, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return resized[..., :out_h, :out_w]


def mask_to_frame(
    mask: np.ndarray, input_size: Size, img_size: int, frame_size: int
) -> torch.Tensor:
    """A mask (H, W) -> its coverage (frame_size, frame_size) float32 in [0, 1] of a square frame
    that holds the model input at ``frame_size / img_size`` scale: the low-res mask frame (256)
    or the image embedding's grid (64).

    The mask is resized (bilinear, antialiased: each frame pixel gets roughly the fraction of it
    the mask covers) onto the unpadded region (``input_size`` scaled by frame_size / img_size);
    the padding is 0. The mask may be on any grid that covers the same field of view as the image
    (for example the slice grid when the model image was resampled to square pixels): only its
    extent matters, not its pixel count. Non-bool masks are foreground where > 0.5.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty H x W array, got shape {mask.shape}")
    rh, rw = low_res_region(input_size, img_size, frame_size)
    th = min(max(1, round(rh)), frame_size)
    tw = min(max(1, round(rw)), frame_size)
    m = torch.from_numpy(np.ascontiguousarray(mask.astype(np.float32, copy=False)))[None, None]
    m = (m > 0.5).to(torch.float32) if mask.dtype != np.bool_ else m
    if m.shape[-2:] != (th, tw):
        m = F.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    frame = torch.zeros((frame_size, frame_size), dtype=torch.float32)
    frame[:th, :tw] = m[0, 0]
    return frame


def mask_to_low_res(
    mask: np.ndarray,
    input_size: Size,
    img_size: int,
    magnitude: float = MASK_PROMPT_LOGIT,
    low_res_size: int = LOW_RES_SIZE,
) -> np.ndarray:
    """An existing segment (H, W) -> (1, 256, 256) float32 logits usable as ``mask_input``.

    The mask's coverage of the low-res frame (:func:`mask_to_frame`: the unpadded region, padded
    with background) is mapped linearly from [0, 1] to [-magnitude, +magnitude] (see
    MASK_PROMPT_LOGIT).
    """
    frame = mask_to_frame(mask, input_size, img_size, low_res_size)
    return ((frame * 2.0 - 1.0) * float(magnitude))[None].numpy()


def as_size(size: Sequence[int], what: str = "size") -> Size:
    """Validate a (height, width) pair of positive ints."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (height, width) pair, got {size!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(size):
        raise ValueError(f"{what} must be two positive integers, got {size!r}")
    return h, w
