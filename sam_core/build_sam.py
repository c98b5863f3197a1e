"""Builders for the supported architectures and the ``sam_model_registry``.

Each public builder only passes hyper-parameters to :func:`_assemble`. With a checkpoint, the
model is built on the ``meta`` device (no random initialisation, no second copy of the weights)
and the checkpoint's tensors are assigned to it after a strict key and shape check; any
mismatch raises :class:`~sam_core.errors.CheckpointError` naming the file and the architecture.
"""

from __future__ import annotations

import contextlib
import re
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import load_state_dict_safely
from .errors import CheckpointError
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer
from .transforms import Preprocessing

PathLike = Union[str, Path]

PROMPT_EMBED_DIM = 256
EMBEDDING_SIZE = 64  # side of the image embedding for every supported model
SAM_PREPROCESSING = Preprocessing(img_size=1024, normalization="imagenet")
LITEMEDSAM_PREPROCESSING = Preprocessing(img_size=256, normalization="minmax")
# MedSAM (ViT-B fine-tuned on medical images) was trained on 1024-px images min-max normalised to
# [0, 1] (MedSAM_Inference.py in bowang-lab/MedSAM), not on SAM's ImageNet mean/std.
MEDSAM_PREPROCESSING = Preprocessing(img_size=1024, normalization="minmax")

# ViT-B/L/H: (width, depth, heads, blocks with global attention), as released by Meta.
_VIT_CONFIGS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_VIT_DEPTHS = {depth: name for name, (_, depth, _, _) in _VIT_CONFIGS.items()}


def build_sam_vit_h(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM ViT-H (632M encoder); ``checkpoint`` e.g. ``sam_vit_h_4b8939.pth``."""
    return _build_vit_sam("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM ViT-L; ``checkpoint`` e.g. ``sam_vit_l_0b3195.pth``."""
    return _build_vit_sam("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM ViT-B; ``checkpoint`` e.g. ``sam_vit_b_01ec64.pth``."""
    return _build_vit_sam("vit_b", checkpoint)


def build_medsam(checkpoint: Optional[PathLike] = None) -> Sam:
    """MedSAM: SAM ViT-B weights fine-tuned on medical images, min-max normalised input;
    ``checkpoint`` e.g. ``medsam_vit_b.pth``."""
    return _build_vit_sam("vit_b", checkpoint, MEDSAM_PREPROCESSING)


def build_litemedsam(checkpoint: Optional[PathLike] = None) -> Sam:
    """LiteMedSAM: TinyViT encoder on 256 x 256 min-max normalised input; ``lite_medsam.pth``."""
    return _assemble(
        "litemedsam",
        image_encoder=partial(
            TinyViT,
            img_size=256,
            in_chans=3,
            embed_dims=(64, 128, 160, 320),
            depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10),
            window_sizes=(7, 7, 14, 7),
            mlp_ratio=4.0,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            out_chans=PROMPT_EMBED_DIM,
        ),
        preprocessing=LITEMEDSAM_PREPROCESSING,
        checkpoint=checkpoint,
    )


build_sam = build_sam_vit_h

sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "litemedsam": build_litemedsam,
    "medsam": build_medsam,
}


def vit_image_encoder(arch: str, img_size: int = 1024) -> ImageEncoderViT:
    """The image encoder of ``arch`` ("vit_b" | "vit_l" | "vit_h") for ``img_size`` input."""
    width, depth, heads, global_blocks = _VIT_CONFIGS[arch]
    return _vit_encoder(width, depth, heads, global_blocks, img_size)


def _vit_encoder(
    width: int, depth: int, heads: int, global_blocks: Sequence[int], img_size: int = 1024
) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        in_chans=3,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=tuple(global_blocks),
    )


def _build_vit_sam(
    arch: str, checkpoint: Optional[PathLike], preprocessing: Preprocessing = SAM_PREPROCESSING
) -> Sam:
    return _assemble(
        arch,
        image_encoder=partial(vit_image_encoder, arch, preprocessing.img_size),
        preprocessing=preprocessing,
        checkpoint=checkpoint,
    )


def _assemble(
    arch: str,
    image_encoder: Callable[[], nn.Module],
    preprocessing: Preprocessing,
    checkpoint: Optional[PathLike],
) -> Sam:
    """Build the model in eval mode, loading ``checkpoint`` strictly when given."""
    state = None
    if checkpoint is not None:
        state = load_state_dict_safely(checkpoint, arch)  # CheckpointError when unreadable
    # Built on "meta" when weights follow: no random init, no memory until they are assigned.
    where = torch.device("meta") if state is not None else contextlib.nullcontext()
    with where:
        size = preprocessing.img_size
        sam = Sam(
            image_encoder=image_encoder(),
            prompt_encoder=PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
                input_image_size=(size, size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
                ),
                transformer_dim=PROMPT_EMBED_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            preprocessing=preprocessing,
        )
    if state is not None:
        _assign_checkpoint(sam, state, Path(checkpoint), arch)
    return sam.eval()


def _assign_checkpoint(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Strictly load ``state`` into the meta-device ``model`` (tensors are assigned, not copied)."""
    problem = _describe_mismatch(model.state_dict(), state)
    if problem:
        guess = _guess_architecture(state)
        hint = f"; it looks like a {guess!r} checkpoint" if guess and guess != arch else ""
        raise CheckpointError(f"checkpoint {path} does not fit {arch!r}: {problem}{hint}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # pragma: no cover - the check above catches key/shape problems
        raise CheckpointError(f"checkpoint {path} does not fit {arch!r}: {exc}") from exc
    # Half-precision files become float32, as a copy into a float32 model would make them.
    model.float()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - every tensor of these models is in the state dict
        raise CheckpointError(f"checkpoint {path} leaves {arch!r} tensors unset: {left[:3]}")


def _describe_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> str:
    """Human-readable list of missing/unexpected/mis-shaped keys ("" when they fit)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} (file {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for count, label, examples in (
        (len(missing), "missing keys", missing),
        (len(unexpected), "unexpected keys", unexpected),
        (len(reshaped), "keys with a different shape", reshaped),
    ):
        if count:
            parts.append(f"{count} {label} such as {', '.join(examples[:2])}")
    return ", ".join(parts)


def _guess_architecture(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which supported architecture a state dict looks like, from its encoder keys."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "litemedsam"
    block_ids = [
        int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
    ]
    if block_ids:
        return _VIT_DEPTHS.get(max(block_ids) + 1)
    return None
