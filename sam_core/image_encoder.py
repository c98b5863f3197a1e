"""SAM's ViT image encoder (ViT-B/L/H): windowed attention with decomposed relative positions.

A ViTDet-style backbone: 16 x 16 patches, most blocks attend inside 14 x 14 windows, a few
"global" blocks attend over the whole token grid, and a small conv neck maps the tokens to the
256-channel image embedding (``B x 256 x 64 x 64`` for a 1024 x 1024 input). Parameter names
follow the official checkpoints (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.qkv``,
``blocks.N.attn.rel_pos_h``, ``neck.0`` ... ``neck.3``) so they load with ``strict=True``.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with the relative
position terms passed as an additive mask: the same maths as the explicit softmax, but it lets
PyTorch pick a fused kernel and avoids keeping the attention matrix for autograd.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock

NormFactory = Callable[[int], nn.Module]


class ImageEncoderViT(nn.Module):
    """ViT backbone of SAM.

    Args:
        img_size: side of the square input image (the absolute position embedding is built
            for ``img_size // patch_size`` tokens per side).
        patch_size: side of the square patches.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        out_chans: channels of the output embedding.
        qkv_bias: learnable bias on the q/k/v projection.
        norm_layer: factory for the token norms (the SAM builders pass LayerNorm with eps 1e-6).
        act_layer: MLP activation.
        use_abs_pos: add a learned absolute position embedding.
        use_rel_pos: add decomposed relative position terms to the attention logits.
        rel_pos_zero_init: accepted for signature parity; the relative tables always start at 0.
    Defaults are the upstream ones; :mod:`sam_core.build_sam` passes the SAM settings.
        window_size: side of the attention windows (0 = global attention everywhere).
        global_attn_indexes: blocks that use global attention.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: NormFactory = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        # B x grid x grid x C, channels last like the tokens themselves.
        self.pos_embed: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        )

        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_set else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x img_size x img_size`` (normalised, padded) -> ``B x out_chans x g x g``."""
        tokens = self.patch_embed(x)  # B x g x g x C
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.neck(tokens.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns channels-last tokens ``B x H' x W' x C``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when ``window_size > 0``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: NormFactory = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        # Relative tables cover the window for windowed blocks, the whole grid for global ones.
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=attn_size,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window_size > 0:
            height, width = h.shape[1], h.shape[2]
            # Padding happens after norm1: padded tokens are exact zeros that still act as keys,
            # which is what the released weights were trained with.
            windows, padded_hw = _to_windows(h, self.window_size)
            h = _from_windows(self.attn(windows), self.window_size, padded_hw, (height, width))
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention on a ``B x H x W x C`` grid, decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative position embeddings need the input size")
            # One row per possible offset along each axis: -(n-1) .. (n-1).
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, dim = x.shape
        n = height * width
        # qkv channels are laid out as (3, heads, head_dim).
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x heads x N x d

        bias = None
        if self.use_rel_pos:
            bias = _relative_position_bias(
                q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width)
            ).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, height, width, dim)
        return self.proj(out)


def _to_windows(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``B x H x W x C`` -> ``(B * nWindows) x window x window x C``, zero-padding bottom/right."""
    b, height, width, c = x.shape
    pad_h = -height % window
    pad_w = -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
    return windows, (hp, wp)


def _from_windows(
    windows: torch.Tensor, window: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`_to_windows`, dropping the padding."""
    hp, wp = padded_hw
    height, width = hw
    nh, nw = hp // window, wp // window
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    if hp != height or wp != width:
        x = x[:, :height, :width, :]
    return x.contiguous()


def _relative_table(q_len: int, k_len: int, table: torch.Tensor) -> torch.Tensor:
    """Embeddings for every (query, key) offset along one axis: ``q_len x k_len x d``.

    The table is linearly resampled when it was trained for another length, and offsets are
    rescaled when queries and keys have different lengths (both as in MViTv2/ViTDet).
    """
    span = 2 * max(q_len, k_len) - 1
    if table.shape[0] != span:
        resized = F.interpolate(table.t().unsqueeze(0), size=span, mode="linear")
        table = resized.squeeze(0).t()
    q_scale = max(k_len / q_len, 1.0)
    k_scale = max(q_len / k_len, 1.0)
    q_pos = torch.arange(q_len, device=table.device)[:, None] * q_scale
    k_pos = torch.arange(k_len, device=table.device)[None, :] * k_scale
    offsets = (q_pos - k_pos) + (k_len - 1) * k_scale
    return table[offsets.long()]


def _relative_position_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_hw: Tuple[int, int],
    k_hw: Tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias ``B x heads x (qh*qw) x (kh*kw)`` from decomposed rel. positions.

    bias[(y, x), (y', x')] = q(y, x) . Rh[y, y'] + q(y, x) . Rw[x, x'], with the *unscaled* query
    (the official implementation adds these terms to the already-scaled logits).
    """
    qh, qw = q_hw
    kh, kw = k_hw
    table_h = _relative_table(qh, kh, rel_pos_h).to(q.dtype)  # qh x kh x d
    table_w = _relative_table(qw, kw, rel_pos_w).to(q.dtype)  # qw x kw x d
    b, heads, _, d = q.shape
    grid_q = q.reshape(b, heads, qh, qw, d)
    along_h = torch.einsum("bnyxd,ykd->bnyxk", grid_q, table_h)  # ... x kh
    along_w = torch.einsum("bnyxd,xkd->bnyxk", grid_q, table_w)  # ... x kw
    bias = along_h[..., :, None] + along_w[..., None, :]  # b x n x qh x qw x kh x kw
    return bias.reshape(b, heads, qh * qw, kh * kw)
