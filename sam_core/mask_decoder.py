"""SAM's mask decoder: prompt + image embeddings -> low-resolution mask logits and IoU scores.

Parameter names follow the official checkpoints (``iou_token``, ``mask_tokens``,
``output_upscaling.N``, ``output_hypernetworks_mlps.N.layers.M``, ``iou_prediction_head.layers.M``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .optimize import DerivedCache, gelu_, use_fast_path
from .transformer import ImageProjections


@dataclass(frozen=True, eq=False)
class DecoderImageCache:
    """Per-image decoder inputs that do not depend on the prompt (see
    :meth:`MaskDecoder.prepare_image`): with no mask prompt the dense embedding is the constant
    no-mask vector, so ``src = image + no_mask`` and ``src + pe`` are computed once per image."""

    src_tokens: torch.Tensor  # 1 x (h*w) x C: image embedding + dense prompt embedding
    pe_tokens: torch.Tensor  # 1 x (h*w) x C: dense positional encoding
    src_pe_tokens: torch.Tensor  # src_tokens + pe_tokens
    size: Tuple[int, int]  # (h, w) of the embedding grid
    # The first two-way block's projections of src (MaskDecoder.project_first_layer), or None.
    first_layer: Optional[ImageProjections] = None


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
        self._derived = DerivedCache()

    # Eval-mode fast path switch (see sam_core.optimize.set_fast_paths).
    fast_path: bool = True

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
        if use_fast_path(self):
            cache = self.prepare_image(image_embeddings, image_pe, dense_prompt_embeddings)
            return self.forward_cached(cache, sparse_prompt_embeddings, multimask_output)
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

    # -- eval-mode fast path ----------------------------------------------------------------------

    def prepare_image(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: Optional[torch.Tensor] = None,
    ) -> DecoderImageCache:
        """The prompt-independent decoder inputs as image tokens.

        Args:
            image_embeddings: ``B' x C x h x w``.
            image_pe: ``1 x C x h x w``, or already as tokens ``1 x (h*w) x C`` (callers that
                prepare many images keep it in that form).
            dense_prompt_embeddings: ``B' x C x h x w``, a ``1 x C x h x w`` expanded view (the
                no-mask embedding), or None for no dense prompt (added as is otherwise).
        """
        src = image_embeddings
        b, c, h, w = src.shape
        tokens = src.flatten(2).transpose(1, 2)  # a view; made contiguous by the add below
        if dense_prompt_embeddings is not None:
            dense = dense_prompt_embeddings
            if dense.shape[0] != b and dense.stride(0) == 0:
                dense = dense[:1]  # the same no-mask embedding for every prompt
            if dense.shape[0] != b and b != 1:
                raise ValueError(
                    f"{b} image embeddings for {dense.shape[0]} dense prompts: "
                    "give one embedding for all prompts or one per prompt"
                )
            dense_tokens = dense.flatten(2).transpose(1, 2)
            n_src = max(b, dense.shape[0])
            dtype = torch.promote_types(src.dtype, dense.dtype)
            src_tokens = src.new_empty((n_src, h * w, c), dtype=dtype)
            torch.add(tokens, dense_tokens, out=src_tokens)
        else:
            src_tokens = tokens.contiguous()
        if image_pe.dim() == 3:
            pe_tokens = image_pe
        else:
            pe_tokens = image_pe.flatten(2).transpose(1, 2).contiguous()
        return DecoderImageCache(src_tokens, pe_tokens, src_tokens + pe_tokens, (int(h), int(w)))

    def project_first_layer(self, cache: DecoderImageCache) -> DecoderImageCache:
        """``cache`` with the first block's image-side projections added (one image only).

        Costs three image-token projections once (~10 ms on a CPU core) and makes the first
        block's cross-attentions nearly free on every prompt on this image (~5 ms each).
        """
        if cache.first_layer is not None or cache.src_tokens.shape[0] != 1:
            return cache
        if not hasattr(self.transformer, "project_first_layer"):
            return cache
        projections = self.transformer.project_first_layer(cache.src_tokens, cache.src_pe_tokens)
        return dataclasses.replace(cache, first_layer=projections)

    def forward_cached(
        self,
        cache: DecoderImageCache,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from a :meth:`prepare_image` result (eval-mode fast path)."""
        keep = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        return self.predict_masks_tokens(cache, sparse_prompt_embeddings, keep)

    def predict_masks_tokens(
        self,
        cache: DecoderImageCache,
        sparse_prompt_embeddings: torch.Tensor,
        mask_indices: Sequence[int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Masks ``mask_indices`` and their IoUs; the same function as :meth:`predict_masks`.

        Only the hypernetworks of the requested masks run; the up-scaling runs as two matrix
        products on channels-last tokens (see :meth:`_upscale_tokens`).
        """
        n_prompts = sparse_prompt_embeddings.shape[0]
        n_src = cache.src_tokens.shape[0]
        if n_src not in (1, n_prompts):
            raise ValueError(
                f"{n_src} image embeddings for {n_prompts} prompts: "
                "give one embedding for all prompts or one per prompt"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings], dim=1
        )
        src, pe, src_pe = cache.src_tokens, cache.pe_tokens, cache.src_pe_tokens
        dtype = tokens.dtype
        first_layer = cache.first_layer
        if first_layer is not None and first_layer.k_t2i.dtype != dtype:
            first_layer = ImageProjections(*(t.to(dtype) for t in first_layer))
        hs, keys = self.transformer.forward_tokens(
            src.to(dtype), pe.to(dtype), tokens, src_pe.to(dtype), first_layer
        )
        if keys.shape[0] != n_prompts:  # only with a transformer of depth 0
            keys = keys.expand(n_prompts, -1, -1)
        indices = list(mask_indices)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in indices], dim=1
        )  # B x M x C/8
        masks = self._upscale_tokens(keys, hyper_in, cache.size)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, indices]
        return masks, iou_pred

    def _upscale_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both transposed convs as matrices from input channels to (dy, dx, out channel)."""
        up1, up2 = self.output_upscaling[0], self.output_upscaling[3]
        sources = (up1.weight, up1.bias, up2.weight, up2.bias)

        def as_matrix(conv: nn.ConvTranspose2d) -> Tuple[torch.Tensor, torch.Tensor]:
            c_in, c_out, kh, kw = conv.weight.shape
            weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, kh * kw * c_out)
            return weight.contiguous(), conv.bias.repeat(kh * kw)

        return self._derived.get("upscale", sources, lambda: (*as_matrix(up1), *as_matrix(up2)))

    def _upscale_tokens(
        self, keys: torch.Tensor, hyper_in: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """``output_upscaling`` + hypernetwork product on ``B x (h*w) x C`` tokens.

        A 2 x 2 stride-2 transposed conv maps each input pixel to its own 2 x 2 output block, so
        it is one matrix product per pixel; keeping the (dy, dx) offsets as extra token axes
        until the end avoids the pixel shuffles between the layers.

        Returns:
            ``B x M x 4h x 4w`` mask logits.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        ok = (
            isinstance(up1, nn.ConvTranspose2d)
            and isinstance(up2, nn.ConvTranspose2d)
            and up1.kernel_size == up1.stride == (2, 2)
            and up2.kernel_size == up2.stride == (2, 2)
            and isinstance(norm, LayerNorm2d)
        )
        b, n, c = keys.shape
        h, w = size
        if not ok:  # pragma: no cover - every SAM decoder has this layout
            grid = keys.transpose(1, 2).reshape(b, c, h, w)
            up = self.output_upscaling(grid)
            _, c_up, h_up, w_up = up.shape
            return (hyper_in @ up.reshape(b, c_up, h_up * w_up)).reshape(b, -1, h_up, w_up)
        w1, b1, w2, b2 = self._upscale_weights()
        dtype = keys.dtype
        c1 = up1.out_channels
        x = torch.addmm(b1.to(dtype), keys.reshape(b * n, c), w1.to(dtype))  # (B N) x (4 C1)
        x = F.layer_norm(
            x.reshape(-1, c1), (c1,), norm.weight.to(dtype), norm.bias.to(dtype), norm.eps
        )
        x = _activation_(act1, x)
        c2 = up2.out_channels
        x = torch.addmm(b2.to(dtype), x, w2.to(dtype))  # (B N 4) x (4 C2)
        x = _activation_(act2, x).reshape(b, n * 16, c2)
        m = hyper_in.shape[1]
        masks = torch.bmm(x, hyper_in.transpose(1, 2).to(dtype))  # B x (N 16) x M
        # token (i, j, a, b, c, d) is output pixel (4 i + 2 a + c, 4 j + 2 b + d)
        masks = masks.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * h, 4 * w)


def _activation_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an activation module, in place for the exact GELU (``x`` owned by the caller)."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return gelu_(x)
    return act(x)


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
