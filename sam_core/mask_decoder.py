"""SAM's mask decoder: prompt + image embeddings -> low-resolution mask logits and IoU scores.

Parameter names follow the official checkpoints (``iou_token``, ``mask_tokens``,
``output_upscaling.N``, ``output_hypernetworks_mlps.N.layers.M``, ``iou_prediction_head.layers.M``).
"""

from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts ``1 + num_multimask_outputs`` masks per prompt with a two-way transformer.

    Output token 0 is the single-mask answer (used when ``multimask_output`` is False); tokens
    1..3 are the three candidates for ambiguous prompts.

    Args:
        transformer_dim: channel width of the transformer (256).
        transformer: a :class:`~sam_core.transformer.TwoWayTransformer`.
        num_multimask_outputs: candidates for ambiguous prompts (3).
        activation: activation of the up-scaling convs.
        iou_head_depth: layers of the IoU prediction MLP (3).
        iou_head_hidden_dim: hidden width of the IoU prediction MLP (256).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        # Two transposed convs: embedding resolution x4 (64 -> 256), channels / 8.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for a batch of prompts.

        Args:
            image_embeddings: ``1 x C x h x w`` (shared by all prompts) or ``B x C x h x w``
                (one image per prompt).
            image_pe: ``1 x C x h x w`` from ``PromptEncoder.get_dense_pe()``.
            sparse_prompt_embeddings: ``B x N x C``.
            dense_prompt_embeddings: ``B x C x h x w``.
            multimask_output: return the three candidates instead of the single mask.

        Returns:
            mask logits ``B x M x 4h x 4w`` and predicted IoUs ``B x M`` (M = 3 or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoUs; see :meth:`forward`."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, n_prompts):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {n_prompts} prompts: "
                "give one embedding for all prompts or one per prompt"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings], dim=1
        )

        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != n_prompts:
            src = src.expand(n_prompts, -1, -1, -1)
        pos_src = image_pe.expand(n_prompts, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # B x M x C/8
        b, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c_up, h_up * w_up)).reshape(b, -1, h_up, w_up)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (``layers.0`` ... ``layers.{n-1}``)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
