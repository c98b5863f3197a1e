"""SAM's prompt encoder: points, boxes and low-resolution masks to decoder embeddings.

Coordinates are ``(x, y)`` pixels of the padded model input (``input_image_size``, e.g. 1024 x 1024
for SAM, 256 x 256 for LiteMedSAM), pixel centres at integers; boxes are XYXY. Parameter names
follow the official checkpoints (``pe_layer.positional_encoding_gaussian_matrix``,
``point_embeddings.N``, ``not_a_point_embed``, ``mask_downscaling.N``, ``no_mask_embed``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm2d

# Point labels understood by the encoder.
LABEL_PADDING = -1  # "not a point": pads point-only prompts (no box) to a fixed layout
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1


class PromptEncoder(nn.Module):
    """Encodes prompts into sparse (``B x N x C``) and dense (``B x C x h x w``) embeddings.

    Args:
        embed_dim: prompt embedding width (256).
        image_embedding_size: ``(h, w)`` of the image embedding (64, 64).
        input_image_size: ``(H, W)`` of the padded model input (1024 or 256 square).
        mask_in_chans: hidden channels of the mask down-scaling convs (16).
        activation: activation of the mask down-scaling convs.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # Learned offsets: [0] background point, [1] foreground point, [2]/[3] box corners.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        # Mask prompts come at 4x the embedding resolution; two stride-2 convs bring them down.
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, ``1 x C x h x w``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``B x N x 2`` (x, y) pixels and ``B x N`` labels -> ``B x N(+1) x C``."""
        coords = coords + 0.5  # pixel centres -> continuous coordinates
        if pad:
            # Without a box, a "not a point" token is appended (the model was trained that way).
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), LABEL_PADDING)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        # Padding tokens carry no position, only the learned "not a point" vector.
        emb = torch.where(labels == LABEL_PADDING, self.not_a_point_embed.weight, emb)
        emb = emb + (labels == LABEL_BACKGROUND) * self.point_embeddings[0].weight
        emb = emb + (labels == LABEL_FOREGROUND) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``B x 4`` (or ``B x 1 x 4``) XYXY boxes -> ``B x 2 x C`` corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_offsets = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight]
        )
        return emb + corner_offsets

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x 4h x 4w`` mask logits -> ``B x C x h x w``."""
        return self.mask_downscaling(masks)

    @staticmethod
    def _batch_size(
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts.

        Args:
            points: ``(coords B x N x 2, labels B x N)``; coords ``(x, y)`` in model-input pixels,
                labels 1 foreground, 0 background, -1 ignored; or None.
            boxes: ``B x 4`` (or ``B x 1 x 4``) XYXY boxes in model-input pixels, or None.
            masks: ``B x 1 x 4h x 4w`` low-resolution mask logits, or None.

        Returns:
            sparse ``B x N' x C`` (points, then the two box corners) and dense ``B x C x h x w``.
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2D positions with a fixed random Gaussian projection."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` coordinates in [0, 1] -> ``... x 2F`` (sin features, then cos features)."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = (2 * math.pi) * projected
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an ``h x w`` grid, ``C x h x w``."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # h x w x (x, y)
        return self._pe_encoding(grid.to(matrix.dtype)).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: Tuple[int, int]
    ) -> torch.Tensor:
        """Encode ``B x N x 2`` (x, y) pixel coordinates of an ``(H, W)`` image, ``B x N x C``."""
        h, w = image_size
        extent = torch.tensor([float(w), float(h)], device=coords_input.device)
        coords = coords_input.to(torch.float32) / extent
        return self._pe_encoding(coords.to(self.positional_encoding_gaussian_matrix.dtype))
