"""Embed an image once, answer many prompts: the seam where the per-slice embedding cache plugs in.

`SamPredictor.encode` turns an image into an `ImageEmbedding` (the expensive encoder call, without
touching the predictor's state); `set_embedding` makes one current; `predict` decodes prompts
against it (the cheap per-click path). `set_image` is `set_embedding(encode(image))`.

All coordinates given to `predict` and `predict_torch` are (x, y) = (column, row) pixels of the
original image (the one given to `set_image`/`encode`), pixel centres at integers; boxes are XYXY.
Everything runs under ``torch.inference_mode()``, with autocast on GPUs only
(`sam_core.device.autocast_dtype`). Results are numpy float32 / bool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sam_core.device import autocast_dtype
from sam_core.optimize import env_num_threads, intra_op_threads, use_fast_path
from sam_core.transforms import (
    LOW_RES_SIZE,
    MASK_PROMPT_LOGIT,
    Size,
    apply_boxes,
    apply_coords,
    as_size,
    get_preprocess_shape,
    mask_to_frame,
    postprocess_masks,
    preprocess_image,
)
from sam_core.transforms import mask_to_low_res as _mask_to_low_res


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """The encoder's output for one image, with the sizes needed to map prompts and masks.

    ``eq=False``: instances compare by identity (comparing tensors element-wise is not a bool).
    """

    features: torch.Tensor  # (1, 256, E, E) (E = 64), float32, on the model's device
    original_size: tuple[int, int]  # (H, W) of the image given to set_image / encode
    input_size: tuple[int, int]  # (h, w) after resize-longest-side, before padding


def _autocast(device: torch.device):
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Intra-op threads for decoding on the CPU. The decoder is ~100 small operations per prompt; with
# torch's OpenMP threads spinning at every barrier, a core taken by another process (or by our
# own background prefetch encoding) made a 2-thread decode ~15x slower here (600 ms instead of
# 40 ms per prompt, docs/benchmarks.md); one thread keeps a click at ~40 ms whatever the load.
DEFAULT_DECODE_THREADS = 1


class SamPredictor:
    """Prompt a SAM-family model (`sam_core.sam.Sam`) on one image at a time.

    Args:
        sam: the model.
        encode_threads: intra-op CPU threads for the image encoder (None:
            ``$SLICERSAM_NUM_THREADS``, else torch's count in the constructing thread, which is
            the number of physical cores unless changed). Applied per call, in the calling
            thread only.
        decode_threads: intra-op CPU threads for prompt decoding (default 1, see
            ``DEFAULT_DECODE_THREADS``; None: leave torch's setting).
        cache_image_projections: with the first prompt on an image, also cache the first
            decoder block's projections of it (pays from the second prompt on that image).
    """

    def __init__(
        self,
        sam,
        encode_threads: Optional[int] = None,
        decode_threads: Optional[int] = DEFAULT_DECODE_THREADS,
        cache_image_projections: bool = True,
    ) -> None:
        self.model = sam
        if encode_threads is None:
            encode_threads = env_num_threads() or torch.get_num_threads()
        self.encode_threads: Optional[int] = encode_threads
        self.decode_threads: Optional[int] = decode_threads
        self.preprocessing = sam.preprocessing
        self.mask_threshold = float(getattr(sam, "mask_threshold", 0.0))
        mask_input_size = getattr(sam.prompt_encoder, "mask_input_size", None)
        self.low_res_size = int(mask_input_size[0]) if mask_input_size else LOW_RES_SIZE
        self._dense_pe: Optional[torch.Tensor] = None
        self._dense_pe_tokens: Optional[tuple] = None
        self._embedding: Optional[ImageEmbedding] = None
        # (embedding, decoder inputs) for prompts without a mask: built on the first such
        # prompt, reused by the next ones on the same embedding (see MaskDecoder.prepare_image).
        self._decoder_cache: Optional[tuple] = None
        self.cache_image_projections = cache_image_projections
        # the image encoder's runtime (sam_core.runtimes): None runs the model's own encoder,
        # autocast as ``sam_core.device.autocast_dtype`` says
        self.encoder = None

    # -- state -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The model's device (where embeddings and prompts live)."""
        return next(self.model.parameters()).device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def embedding(self) -> Optional[ImageEmbedding]:
        """The current `ImageEmbedding`, or None."""
        return self._embedding

    @property
    def original_size(self) -> Optional[Size]:
        return None if self._embedding is None else self._embedding.original_size

    @property
    def input_size(self) -> Optional[Size]:
        return None if self._embedding is None else self._embedding.input_size

    def reset_image(self) -> None:
        """Forget the current image."""
        self._embedding = None
        self._decoder_cache = None

    def _require_image(self) -> ImageEmbedding:
        if self._embedding is None:
            raise RuntimeError(
                "No image is set: call set_image(image) or set_embedding(embedding) first."
            )
        return self._embedding

    @staticmethod
    def _threads(device: torch.device, count: Optional[int]):
        """Intra-op thread count for a CPU call (no-op on accelerators)."""
        return intra_op_threads(count if device.type == "cpu" else None)

    def _image_pe_tokens(self, device: torch.device) -> torch.Tensor:
        """The dense positional encoding as ``1 x (h*w) x C`` tokens, cached like `_image_pe`."""
        pe = self._image_pe(device)
        tokens = self._dense_pe_tokens
        if tokens is None or tokens[0] is not pe:
            tokens = self._dense_pe_tokens = (pe, pe.flatten(2).transpose(1, 2).contiguous())
        return tokens[1]

    def _image_pe(self, device: torch.device) -> torch.Tensor:
        # The dense positional encoding depends only on the (frozen) prompt encoder: compute it
        # once per device instead of on every click.
        pe = self._dense_pe
        if pe is None or pe.device != device:
            with torch.inference_mode():
                pe = self.model.prompt_encoder.get_dense_pe().to(device)
            self._dense_pe = pe
        return pe

    def _decoder_inputs(self, emb: ImageEmbedding, device: torch.device):
        """The decoder's per-image inputs for prompts without a mask, cached per embedding.

        With ``cache_image_projections`` the first decoder block's projections of the image are
        part of them (built with the first prompt, ~10 ms on a CPU core, then ~5 ms saved on
        every prompt). Built the same way whatever the history, so a prompt gives the same
        logits bit for bit on its first and on its tenth try.
        """
        cached = self._decoder_cache
        if cached is not None and cached[0] is emb:
            return cached[1]
        decoder = self.model.mask_decoder
        no_mask = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        inputs = decoder.prepare_image(emb.features, self._image_pe_tokens(device), no_mask)
        if self.cache_image_projections and hasattr(decoder, "project_first_layer"):
            inputs = decoder.project_first_layer(inputs)
        self._decoder_cache = (emb, inputs)
        return inputs

    # -- encoding ----------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> ImageEmbedding:
        """Embed ``image`` (H x W x 3 uint8, or H x W uint8) without changing the current image."""
        return self.encode_batch([image])[0]

    @torch.inference_mode()
    def encode_batch(
        self, images: Sequence[np.ndarray], batch_size: Optional[int] = None
    ) -> list[ImageEmbedding]:
        """Embed several images with batched encoder calls.

        Args:
            images: H x W x 3 / H x W uint8 arrays (sizes may differ).
            batch_size: images per encoder call; None runs them all in one call.

        Returns:
            One `ImageEmbedding` per image, in order (each owns its memory).
        """
        if isinstance(images, np.ndarray):
            raise ValueError("encode_batch expects a list of images; use encode() for one image")
        images = list(images)
        if not images:
            return []
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        step = batch_size or len(images)
        out: list[ImageEmbedding] = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            tensors, sizes = [], []
            for image in chunk:
                x, input_size = preprocess_image(image, self.preprocessing, device)
                tensors.append(x)
                sizes.append((input_size, (int(image.shape[0]), int(image.shape[1]))))
            batch = torch.cat(tensors, dim=0)
            if self.encoder is not None:
                with self._threads(device, self.encode_threads):
                    features = self.encoder(batch).to(device)
            else:
                with self._threads(device, self.encode_threads), _autocast(device):
                    features = self.model.image_encoder(batch)
            features = features.to(torch.float32)
            for i, (input_size, original_size) in enumerate(sizes):
                feats = features[i : i + 1]
                if len(sizes) > 1:
                    feats = feats.clone()  # do not keep the whole batch alive through one view
                out.append(ImageEmbedding(feats, original_size, input_size))
        return out

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``image`` and make it current for `predict`."""
        self.set_embedding(self.encode(image))

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make a previously computed embedding current (moved to the model's device if needed)."""
        if not isinstance(embedding, ImageEmbedding):
            raise ValueError(f"expected an ImageEmbedding, got {type(embedding).__name__}")
        feats = embedding.features
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[0] != 1:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"embedding features must be 1 x C x E x E, got {shape}")
        device = self.device
        if feats.device != device:
            embedding = ImageEmbedding(
                feats.to(device), embedding.original_size, embedding.input_size
            )
        self._embedding = embedding
        self._decoder_cache = None

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's features, (1, 256, 64, 64)."""
        return self._require_image().features

    # -- prompts -----------------------------------------------------------------------------

    def mask_to_low_res(self, mask: np.ndarray) -> np.ndarray:
        """An existing segment (H, W) bool -> (1, 256, 256) logits to pass as ``mask_input``.

        Uses the current image's input frame when an image is set (the mask may then be on any
        grid covering the same field of view), else derives it from the mask's own shape.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be H x W, got shape {mask.shape}")
        img_size = self.preprocessing.img_size
        if self._embedding is not None:
            input_size = self._embedding.input_size
        else:
            input_size = get_preprocess_shape(mask.shape[0], mask.shape[1], img_size)
        return _mask_to_low_res(
            mask, input_size, img_size, magnitude=MASK_PROMPT_LOGIT, low_res_size=self.low_res_size
        )

    def mask_features(self, mask: np.ndarray, embedding: Optional[ImageEmbedding] = None):
        """The mean image-embedding vector under a mask, and how much of the embedding it covers.

        ``mask`` (H, W) may be on any grid covering the image's field of view (as for
        :meth:`mask_to_low_res`); each embedding cell is weighted by the fraction of it the mask
        covers. ``embedding`` defaults to the current one. Two masks whose features point the same
        way (cosine similarity near 1) hold what the encoder sees as the same kind of tissue.

        Returns:
            (features (C,) float32 numpy, cells: the number of embedding cells the mask covers,
            fractions summed: a mean over a few cells is noisy), or None for an empty mask.
        """
        emb = embedding if embedding is not None else self._require_image()
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be H x W, got shape {mask.shape}")
        features = emb.features[0]  # (C, E, E)
        weights = mask_to_frame(
            mask, emb.input_size, self.preprocessing.img_size, int(features.shape[-1])
        )
        cells = float(weights.sum())
        if cells <= 0.0:
            return None
        with torch.inference_mode():
            weights = weights.to(device=features.device, dtype=torch.float32)
            pooled = torch.einsum("chw,hw->c", features.float(), weights) / cells
        return pooled.cpu().numpy().astype(np.float32, copy=False), cells

    def _check_points(self, point_coords, point_labels):
        if point_coords is None and point_labels is None:
            return None, None
        if point_coords is None or point_labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        coords = np.asarray(point_coords, dtype=np.float32)
        labels = np.asarray(point_labels)
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
            raise ValueError(f"point_coords must be N x 2 (x, y) with N >= 1, got {coords.shape}")
        if labels.ndim != 1 or labels.shape[0] != coords.shape[0]:
            raise ValueError(
                f"point_labels must have one label per point: {coords.shape[0]} points, "
                f"labels of shape {labels.shape}"
            )
        if not np.all(np.isfinite(coords)):
            raise ValueError("point_coords must be finite")
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError(f"point_labels must be 1 (foreground) or 0 (background): {labels}")
        return coords, labels.astype(np.int64)

    def _check_box(self, box):
        if box is None:
            return None
        box = np.asarray(box, dtype=np.float32)
        if box.shape == (1, 4):
            box = box[0]
        if box.shape != (4,):
            raise ValueError(f"box must be 4 numbers XYXY (or 1 x 4), got shape {box.shape}")
        if not np.all(np.isfinite(box)):
            raise ValueError("box must be finite")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"box must be XYXY with x0 <= x1 and y0 <= y1, got {box.tolist()}")
        return box

    def _check_mask_input(self, mask_input):
        if mask_input is None:
            return None
        m = np.asarray(mask_input, dtype=np.float32)
        n = self.low_res_size
        if m.shape == (n, n):
            m = m[None]
        if m.shape != (1, n, n):
            raise ValueError(
                f"mask_input must be 1 x {n} x {n} low-res logits (from predict or "
                f"mask_to_low_res), got shape {m.shape}"
            )
        return m

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        output_size: Optional[Sequence[int]] = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one set of prompts on the current image.

        Args:
            point_coords: (N, 2) (x, y) pixels of the original image.
            point_labels: (N,) 1 foreground / 0 background.
            box: (4,) XYXY pixels of the original image.
            mask_input: (1, 256, 256) low-res logits of an earlier `predict` (or
                `mask_to_low_res`).
            multimask_output: three candidates (in the decoder's order, not sorted) instead of one.
            return_logits: return float32 logits instead of bool masks.
            output_size: (h, w) to resize the masks to instead of the original size.

        Returns:
            (masks (C, H, W) bool, iou_predictions (C,) float32, low_res_logits (C, 256, 256)
            float32), C = 3 with multimask_output else 1.
        """
        emb = self._require_image()
        coords, labels = self._check_points(point_coords, point_labels)
        box_np = self._check_box(box)
        mask_np = self._check_mask_input(mask_input)
        if coords is None and box_np is None and mask_np is None:
            raise ValueError("give at least one prompt: points, a box or mask_input")
        size = emb.original_size if output_size is None else as_size(output_size, "output_size")

        device = emb.features.device
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords_in = apply_coords(coords, emb.original_size, emb.input_size)
            coords_t = torch.from_numpy(coords_in).to(device)[None]
            labels_t = torch.from_numpy(labels).to(device)[None]
        if box_np is not None:
            box_t = torch.from_numpy(apply_boxes(box_np, emb.original_size, emb.input_size))
            box_t = box_t.to(device)[None]
        if mask_np is not None:
            mask_t = torch.from_numpy(mask_np).to(device)[None]

        masks, iou, low_res = self._decode(
            emb, coords_t, labels_t, box_t, mask_t, multimask_output, return_logits, size
        )
        return (
            masks[0].cpu().numpy(),
            iou[0].to(torch.float32).cpu().numpy(),
            low_res[0].cpu().numpy(),
        )

    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        output_size: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts (B of them) on the current image, as tensors.

        Unlike upstream SAM's ``predict_torch``, coordinates are in original-image pixels here too
        (the same convention as `predict`); they are scaled to the input frame inside.

        Args:
            point_coords: (B, N, 2) (x, y) pixels; point_labels: (B, N) 1 / 0.
            boxes: (B, 4) XYXY pixels.
            mask_input: (B, 1, 256, 256) low-res logits.
            multimask_output, return_logits, output_size: as in `predict`.

        Returns:
            (masks (B, C, H, W) bool (or float32 logits), iou_predictions (B, C) float32,
            low_res_logits (B, C, 256, 256) float32), on the model's device.
        """
        emb = self._require_image()
        device = emb.features.device
        batch = None
        coords_t = labels_t = boxes_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("point_coords and point_labels must be given together")
            coords_t = torch.as_tensor(point_coords, dtype=torch.float32, device=device)
            labels_t = torch.as_tensor(point_labels, device=device).to(torch.int64)
            if coords_t.dim() != 3 or coords_t.shape[-1] != 2 or coords_t.shape[1] == 0:
                raise ValueError(f"point_coords must be B x N x 2, got {tuple(coords_t.shape)}")
            if labels_t.shape != coords_t.shape[:2]:
                raise ValueError(
                    f"point_labels must be B x N matching point_coords {tuple(coords_t.shape)}, "
                    f"got {tuple(labels_t.shape)}"
                )
            if not bool(((labels_t == 0) | (labels_t == 1)).all()):
                raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
            coords_t = apply_coords(coords_t, emb.original_size, emb.input_size)
            batch = coords_t.shape[0]
        if boxes is not None:
            boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=device)
            if boxes_t.dim() != 2 or boxes_t.shape[1] != 4:
                raise ValueError(f"boxes must be B x 4 XYXY, got {tuple(boxes_t.shape)}")
            if bool(((boxes_t[:, 2] < boxes_t[:, 0]) | (boxes_t[:, 3] < boxes_t[:, 1])).any()):
                raise ValueError("boxes must be XYXY with x0 <= x1 and y0 <= y1")
            if batch is not None and boxes_t.shape[0] != batch:
                raise ValueError(f"{boxes_t.shape[0]} boxes for {batch} point sets")
            boxes_t = apply_boxes(boxes_t, emb.original_size, emb.input_size)
            batch = boxes_t.shape[0]
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float32, device=device)
            n = self.low_res_size
            if mask_t.dim() != 4 or tuple(mask_t.shape[1:]) != (1, n, n):
                raise ValueError(f"mask_input must be B x 1 x {n} x {n}, got {tuple(mask_t.shape)}")
            if batch is not None and mask_t.shape[0] != batch:
                raise ValueError(f"{mask_t.shape[0]} mask inputs for a batch of {batch} prompts")
            batch = mask_t.shape[0]
        if batch is None:
            raise ValueError("give at least one prompt: points, boxes or mask_input")
        if batch == 0:
            raise ValueError("empty prompt batch")
        size = emb.original_size if output_size is None else as_size(output_size, "output_size")
        return self._decode(
            emb, coords_t, labels_t, boxes_t, mask_t, multimask_output, return_logits, size
        )

    @torch.inference_mode()
    def _decode(
        self,
        emb: ImageEmbedding,
        coords: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        return_logits: bool,
        output_size: Size,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts already in the input frame -> (masks, iou, low-res logits), batched."""
        device = emb.features.device
        points = (coords, labels) if coords is not None else None
        decoder = self.model.mask_decoder
        with self._threads(device, self.decode_threads), _autocast(device):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
            if masks is None and use_fast_path(decoder) and hasattr(decoder, "forward_cached"):
                low_res, iou = decoder.forward_cached(
                    self._decoder_inputs(emb, device), sparse, multimask_output
                )
            else:
                low_res, iou = decoder(
                    image_embeddings=emb.features,
                    image_pe=self._image_pe(device),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                )
            low_res = low_res.to(torch.float32)
            # Crop + resize of only the masks asked for (one without multimask_output).
            logits = postprocess_masks(
                low_res, emb.input_size, output_size, self.preprocessing.img_size
            )
            out = logits if return_logits else logits > self.mask_threshold
        return out, iou.to(torch.float32), low_res
