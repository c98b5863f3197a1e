"""TinyViT image encoder as used by LiteMedSAM, in plain PyTorch (no timm).

LiteMedSAM's variant (TinyViT-5M widths, 256 x 256 input):

* ``patch_embed``: two 1 x 1 Conv-BN layers (no down-sampling), 3 -> 32 -> 64 channels;
* ``layers.0``: MBConv blocks at full resolution (256 x 256), then a stride-2 patch merging;
* ``layers.1`` .. ``layers.3``: TinyViT blocks (windowed attention with a learned bias per
  (|dy|, |dx|) offset, a depth-wise conv, an MLP); the merging into the last stage keeps the
  resolution, so the stages run at 256, 128, 64, 64;
* ``neck``: 1 x 1 conv, LayerNorm2d, 3 x 3 conv, LayerNorm2d -> ``B x 256 x 64 x 64``.

Parameter names follow the LiteMedSAM checkpoint (``layers.N.blocks.M.attn.attention_biases``,
``...local_conv.c``/``.bn``, ``...mlp.fc1`` ...). Drop-path is identity at inference and is
not implemented. Batch norms must be in eval mode for inference (the builders return eval models).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .optimize import DerivedCache, gelu_, use_fast_path

# Rows per band in the full-resolution stage of the fast path: the 4x expanded activations of a
# band (34 rows x 256 x 256 channels x 4 bytes, ~9 MB) are reused by the allocator from band to
# band instead of four 67 MB tensors per block that are page-faulted in on every call (glibc maps
# blocks over 32 MB afresh each time). 16 to 64 rows measured alike on one core; fewer bands
# mean fewer parallel regions, which matters when other processes hold cores.
BAND_ROWS = 32
# Tokens per chunk in the MLPs of the fast path (same reason: hidden activations <= ~21 MB).
MLP_CHUNK = 8192


class Conv2d_BN(nn.Sequential):  # noqa: N801 - the checkpoint's module layout (c, bn)
    """Convolution without bias followed by BatchNorm (submodules ``c`` and ``bn``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, ks, stride, pad, dilation, groups, bias=False)
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

        self._derived = DerivedCache()

    def fused(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The convolution with the (eval-mode) batch norm folded in: ``(weight, bias)``.

        Cached; rebuilt when a parameter or running statistic changes. The checkpoint layout
        (``c``, ``bn``) is untouched.
        """
        conv, bn = self.c, self.bn
        sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)

        def build():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.reshape(-1, 1, 1, 1)
            return weight.contiguous(), (bn.bias - bn.running_mean * scale).contiguous()

        return self._derived.get("fused", sources, build)

    def fused_linear(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """A 1 x 1 Conv-BN as ``F.linear`` weights on channels-last tokens: ``(out x in, out)``."""
        weight, bias = self.fused()
        return weight.reshape(weight.shape[0], -1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        # Eval: the batch norm folded into the convolution (saves a pass over the activations);
        # folded on the fly when autograd records (the cached weights are detached).
        conv, bn = self.c, self.bn
        if torch.is_grad_enabled():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.reshape(-1, 1, 1, 1)
            bias = bn.bias - bn.running_mean * scale
        else:
            weight, bias = self.fused()
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode convolution of ``B x H x W x C`` tokens -> ``B x H' x W' x C'``.

        1 x 1 kernels are a matrix product over channels; other kernels run on the
        channels-last view (oneDNN's NHWC kernels, several times faster than NCHW for depth-wise
        convolutions), whose output is again a ``B x H' x W' x C'`` contiguous tensor.
        """
        conv = self.c
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1:
            weight, bias = self.fused_linear()
            return F.linear(x, weight, bias)
        weight, bias = self.fused()
        y = F.conv2d(
            _channels_last_view(x),
            weight,
            bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        return y.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Pixel-wise stem: Conv-BN, activation, Conv-BN (1 x 1 kernels, stride 1)."""

    def __init__(
        self, in_chans: int, embed_dim: int, resolution: int, activation: Type[nn.Module]
    ) -> None:
        super().__init__()
        self.patches_resolution = (resolution, resolution)
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 1, 1, 0),
            activation(),
            Conv2d_BN(embed_dim // 2, embed_dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> ``B x H x W x embed_dim`` (eval mode)."""
        conv1, act, conv2 = self.seq
        y = conv1.forward_nhwc(x)
        y = gelu_(y) if isinstance(act, nn.GELU) and act.approximate == "none" else act(y)
        return conv2.forward_nhwc(y)


class MBConv(nn.Module):
    """Inverted residual: 1 x 1 expand, 3 x 3 depth-wise, 1 x 1 project, residual, activation."""

    def __init__(
        self, in_chans: int, out_chans: int, expand_ratio: float, activation: Type[nn.Module]
    ) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> same (eval mode), in row bands; see :func:`_banded_bottleneck`."""
        return _banded_bottleneck(x, self.conv1, self.conv2, self.conv3, residual=True)


class PatchMerging(nn.Module):
    """Down-sampling between stages: 1 x 1 conv, 3 x 3 depth-wise conv (stride), 1 x 1 conv.

    Accepts ``B x C x H x W`` or tokens ``B x (H*W) x C``; returns tokens ``B x (H'*W') x C'``.
    """

    def __init__(
        self,
        input_resolution: Tuple[int, int],
        dim: int,
        out_dim: int,
        activation: Type[nn.Module],
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` -> ``B x H' x W' x C'`` (eval mode), in row bands."""
        return _banded_bottleneck(x, self.conv1, self.conv2, self.conv3, residual=False)


class _Stage(nn.Module):
    """A TinyViT stage: ``blocks`` then an optional ``downsample`` (PatchMerging)."""

    blocks: nn.ModuleList
    downsample: Optional[nn.Module]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block.forward_nhwc(x)
        return self.downsample.forward_nhwc(x) if self.downsample is not None else x


class ConvLayer(_Stage):
    """First stage: MBConv blocks on ``B x C x H x W``, then an optional merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        activation: Type[nn.Module],
        conv_expand_ratio: float = 4.0,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim, dim, conv_expand_ratio, activation) for _ in range(depth)
        )
        self.downsample = downsample


class Mlp(nn.Module):
    """LayerNorm, fc1, activation, fc2 (the norm belongs to the MLP in TinyViT)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Type[nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))

    def add_to_(self, x: torch.Tensor) -> torch.Tensor:
        """``x += mlp(x)`` in place on ``... x C`` tokens the caller owns, in token chunks."""
        flat = x.reshape(-1, x.shape[-1])
        exact_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        for start in range(0, flat.shape[0], MLP_CHUNK):
            part = flat[start : start + MLP_CHUNK]
            hidden = self.fc1(self.norm(part))
            hidden = gelu_(hidden) if exact_gelu else self.act(hidden)
            part += self.fc2(hidden)
        return x


class Attention(nn.Module):
    """Windowed multi-head attention with a learned bias per head and per |offset| (LeViT style).

    ``attention_biases`` holds ``heads x (window * window)`` values: entry ``|dy| * window + |dx|``
    is the bias between two tokens ``dy`` rows and ``dx`` columns apart.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: Tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)  # value width per head
        self.dh = self.d * num_heads
        self.resolution = tuple(resolution)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        rows, cols = self.resolution
        # Offsets (|dy|, |dx|) are numbered in order of first appearance scanning from token
        # (0, 0), i.e. |dy| * cols + |dx|; that numbering is what the checkpoint's table uses.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, rows * cols))
        # Gather indices, cached per device (a plain attribute, not a buffer: nothing to load).
        self._bias_index: Dict[torch.device, torch.Tensor] = {}
        self._derived = DerivedCache()

    def _index(self, device: torch.device) -> torch.Tensor:
        index = self._bias_index.get(device)
        if index is None:
            rows, cols = self.resolution
            # A plain tensor even under inference_mode: training may index with it later.
            with torch.inference_mode(False):
                ys = torch.arange(rows, device=device).repeat_interleave(cols)
                xs = torch.arange(cols, device=device).repeat(rows)
                index = (ys[:, None] - ys[None, :]).abs() * cols
                index += (xs[:, None] - xs[None, :]).abs()
            self._bias_index[device] = index
        return index

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``heads x N x N`` attention bias, gathered once per parameter version (eval)."""
        table = self.attention_biases
        if self.training or torch.is_grad_enabled():
            return table[:, self._index(table.device)].to(dtype)

        def build():
            return table[:, self._index(table.device)].to(dtype).contiguous()

        return self._derived.get(f"bias-{dtype}", (table,), build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x C`` (N = window tokens) -> ``B x N x C``."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, -1)
        # Per head the channels are [q (key_dim), k (key_dim), v (d)].
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B x heads x N x d
        bias = self.attention_biases[:, self._index(x.device)].to(q.dtype)  # heads x N x N
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Window attention (residual), depth-wise ``local_conv``, MLP (residual) on tokens."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(
            dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size)
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)
        self.local_conv = Conv2d_BN(
            dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim
        )

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        ws = self.window_size
        b, n, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        grid = x.reshape(b, h, w, c)
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            # Zero tokens are padded *before* the attention's own LayerNorm and act as keys,
            # exactly as in the trained model.
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws
        windows = grid.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        out = self.attn(windows)
        out = out.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        if pad_b or pad_r:
            out = out[:, :h, :w]
        return out.reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x (H*W) x C`` tokens -> same shape."""
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w} tokens, got {n}")
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.reshape(b, c, n).transpose(1, 2)
        return x + self.mlp(x)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` tokens -> same (eval mode); the same function as :meth:`forward`.

        Differences in the computation (not the result): the tokens are copied once into
        window order (with the zero padding) and everything up to the residual add happens in
        that order, so neither q/k/v nor the attention output is ever re-arranged; attention is
        torch's fused kernel with the bias gathered once; the depth-wise conv runs
        channels-last; the MLP runs in token chunks, in place.
        """
        b, h, w, c = x.shape
        if (h, w) != self.input_resolution:
            raise ValueError(f"expected {self.input_resolution} tokens, got {h}x{w}")
        ws = self.window_size
        windows = _to_windows(x, ws)  # (B nh nw) x ws^2 x C, padding tokens are zeros
        attended = self._attention_windows(windows)
        attended += windows  # the residual, still in window order
        x = _from_windows(attended, b, h, w, ws)
        x = self.local_conv.forward_nhwc(x)
        return self.mlp.add_to_(x)

    def _attention_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """``attn`` on ``windows x N x C`` with the fused kernel; a new tensor of the same shape."""
        attn = self.attn
        n_win, n, _ = windows.shape
        heads, kd, d = attn.num_heads, attn.key_dim, attn.d
        qkv = attn.qkv(attn.norm(windows)).reshape(n_win, n, heads, 2 * kd + d)
        q, k, v = qkv.split([kd, kd, d], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # windows x heads x N x ch
        # A 4-D (expanded) mask lets torch pick its fused CPU attention kernel; with a 3-D mask
        # it falls back to the unfused maths path (about 3x slower here).
        bias = attn.bias(q.dtype).expand(n_win, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return attn.proj(out.transpose(1, 2).reshape(n_win, n, heads * d))


class BasicLayer(_Stage):
    """A TinyViT stage: blocks on tokens, then an optional merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                local_conv_size=local_conv_size,
                activation=activation,
            )
            for _ in range(depth)
        )
        self.downsample = downsample


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT encoder: ``B x 3 x S x S`` -> ``B x 256 x S/4 x S/4``.

    Args:
        img_size: input side (256 for LiteMedSAM).
        in_chans: input channels.
        embed_dims: stage widths.
        depths: blocks per stage (stage 0 is MBConv, the others TinyViT blocks).
        num_heads: attention heads per stage (stage 0 unused).
        window_sizes: attention window per stage (stage 0 unused).
        mlp_ratio: MLP hidden width as a multiple of the stage width.
        mbconv_expand_ratio: MBConv expansion in stage 0.
        local_conv_size: kernel of the depth-wise conv inside the TinyViT blocks.
        out_chans: channels of the neck output (256).
        drop_rate, drop_path_rate, use_checkpoint, layer_lr_decay: training-only options of the
            upstream signature; accepted and ignored (inference only).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 1.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.depths = tuple(depths)
        activation = nn.GELU
        n_stages = len(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], img_size, activation)
        resolution = img_size
        self.layers = nn.ModuleList()
        for i in range(n_stages):
            downsample = None
            next_resolution = resolution
            if i < n_stages - 1:
                # The merging into the last stage keeps the resolution (stride 1), so the output
                # grid is img_size / 4 with three stages of attention.
                stride = 1 if i == n_stages - 2 else 2
                downsample = PatchMerging(
                    (resolution, resolution),
                    dim=embed_dims[i],
                    out_dim=embed_dims[i + 1],
                    activation=activation,
                    stride=stride,
                )
                next_resolution = (resolution - 1) // stride + 1
            if i == 0:
                layer: nn.Module = ConvLayer(
                    embed_dims[0],
                    depths[0],
                    activation,
                    conv_expand_ratio=mbconv_expand_ratio,
                    downsample=downsample,
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    (resolution, resolution),
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    local_conv_size=local_conv_size,
                    activation=activation,
                    downsample=downsample,
                )
            self.layers.append(layer)
            resolution = next_resolution
        self.out_resolution = resolution

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_weights)

    # Eval-mode fast path switch (see sam_core.optimize.set_fast_paths).
    fast_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` (min-max normalised, padded) -> ``B x 256 x S/4 x S/4``."""
        if use_fast_path(self):
            return self.forward_fast(x)
        return self.forward_plain(x)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode forward on channels-last tokens; same result as :meth:`forward_plain`."""
        x = x.permute(0, 2, 3, 1)  # B x S x S x 3
        x = self.patch_embed.forward_nhwc(x)
        for layer in self.layers:
            x = layer.forward_nhwc(x)
        b, r = x.shape[0], self.out_resolution
        x = x.reshape(b, r, r, x.shape[-1])
        conv1, norm1, conv2, norm2 = self.neck
        x = F.linear(x, conv1.weight.reshape(conv1.out_channels, -1), conv1.bias)
        x = F.layer_norm(x, (x.shape[-1],), norm1.weight, norm1.bias, norm1.eps)
        x = conv2(_channels_last_view(x)).permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), norm2.weight, norm2.bias, norm2.eps)
        return x.permute(0, 3, 1, 2).contiguous()

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The reference formulation (NCHW, token sequences), used in training."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        r = self.out_resolution
        x = x.transpose(1, 2).reshape(b, c, r, r)
        return self.neck(x)


def _channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """``B x H x W x C`` -> ``B x C x H x W`` in channels-last memory (a view when contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _window_regions(h: int, w: int, ws: int):
    """Rectangles ``(rows, cols)`` of an ``h x w`` grid that map to whole window slabs.

    Yields ``(r0, r1, c0, c1)``: full windows first, then the partial last row/column of windows.
    """
    hf, wf = h // ws * ws, w // ws * ws
    for r0, r1 in ((0, hf), (hf, h)):
        for c0, c1 in ((0, wf), (wf, w)):
            if r1 > r0 and c1 > c0:
                yield r0, r1, c0, c1


def _grid_view(windows: torch.Tensor, b: int, nh: int, nw: int, ws: int) -> torch.Tensor:
    """``(B nh nw) x ws^2 x C`` windows as a ``B x nh x ws x nw x ws x C`` grid view."""
    return windows.reshape(b, nh, nw, ws, ws, windows.shape[-1]).transpose(2, 3)


def _to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``B x H x W x C`` -> ``(B nh nw) x ws^2 x C`` in one copy, zero-padded bottom/right."""
    b, h, w, c = x.shape
    nh, nw = -(-h // ws), -(-w // ws)
    if h % ws == 0 and w % ws == 0:
        return x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
    windows = x.new_empty((b * nh * nw, ws * ws, c))
    grid = _grid_view(windows, b, nh, nw, ws)
    for r0, r1, c0, c1 in _window_regions(h, w, ws):
        i0, i1, j0, j1 = r0 // ws, -(-r1 // ws), c0 // ws, -(-c1 // ws)
        rh, cw = min(ws, r1 - r0), min(ws, c1 - c0)
        grid[:, i0:i1, :rh, j0:j1, :cw] = x[:, r0:r1, c0:c1].reshape(b, i1 - i0, rh, j1 - j0, cw, c)
        if rh < ws:
            grid[:, i0:i1, rh:, j0:j1] = 0
        if cw < ws:
            grid[:, i0:i1, :, j0:j1, cw:] = 0
    return windows


def _from_windows(windows: torch.Tensor, b: int, h: int, w: int, ws: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``B x H x W x C`` (contiguous), padding dropped."""
    c = windows.shape[-1]
    nh, nw = -(-h // ws), -(-w // ws)
    if h % ws == 0 and w % ws == 0:
        return windows.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, h, w, c)
    out = windows.new_empty((b, h, w, c))
    grid = _grid_view(windows, b, nh, nw, ws)
    for r0, r1, c0, c1 in _window_regions(h, w, ws):
        i0, i1, j0, j1 = r0 // ws, -(-r1 // ws), c0 // ws, -(-c1 // ws)
        rh, cw = min(ws, r1 - r0), min(ws, c1 - c0)
        out[:, r0:r1, c0:c1] = grid[:, i0:i1, :rh, j0:j1, :cw].reshape(b, r1 - r0, c1 - c0, c)
    return out


def _banded_bottleneck(
    x: torch.Tensor, conv1: Conv2d_BN, conv2: Conv2d_BN, conv3: Conv2d_BN, residual: bool
) -> torch.Tensor:
    """1 x 1 expand + GELU, 3 x 3 depth-wise (stride s) + GELU, 1 x 1 project, on tokens.

    ``x`` is ``B x H x W x C``. With ``residual`` (MBConv): ``GELU(project(...) + x)``, else
    (PatchMerging) the projection alone. The output rows are computed in bands of
    ``BAND_ROWS``: each band expands only the input rows its depth-wise window needs (a one-row
    halo, recomputed), so the expanded activations never exist at full size.
    """
    b, h, w, _ = x.shape
    dw = conv2.c
    stride, pad = dw.stride[0], dw.padding[0]
    kernel = dw.kernel_size[0]
    if kernel != 2 * pad + 1 or dw.stride[1] != stride or dw.padding[1] != pad:
        raise ValueError("banded bottleneck expects a square, 'same'-padded depth-wise kernel")
    w1, b1 = conv1.fused_linear()
    wd, bd = conv2.fused()
    w3, b3 = conv3.fused_linear()
    h_out = (h + 2 * pad - kernel) // stride + 1
    w_out = (w + 2 * pad - kernel) // stride + 1
    out = x.new_empty((b, h_out, w_out, w3.shape[0]))
    rows = max(1, BAND_ROWS // stride)
    for o0 in range(0, h_out, rows):
        o1 = min(h_out, o0 + rows)
        # Input rows [lo, hi) hold every window of output rows [o0, o1). lo is a multiple of
        # the stride away from o0's window centre so that the conv's own symmetric padding
        # lines up; the output rows whose window reaches that artificial padding at an inner
        # band edge are dropped below.
        lo = max(0, stride * o0 - max(stride, pad))
        hi = min(h, stride * (o1 - 1) + pad + 1)
        hidden = gelu_(F.linear(x[:, lo:hi], w1, b1))
        y = F.conv2d(_channels_last_view(hidden), wd, bd, stride, pad, 1, dw.groups)
        first = (stride * o0 - lo) // stride
        y = gelu_(y[:, :, first : first + (o1 - o0)].permute(0, 2, 3, 1))
        y = F.linear(y, w3, b3)
        if residual:
            y += x[:, o0:o1]
            gelu_(y)
        out[:, o0:o1] = y
    return out


def _init_weights(module: nn.Module) -> None:
    """Initialisation for training from scratch; checkpoints overwrite all of it."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
