"""sam_core: Segment Anything (SAM ViT-B/L/H, MedSAM, LiteMedSAM) in plain PyTorch.

The public names are imported lazily (PEP 562), so ``import sam_core`` is cheap and does not
import torch until a name is used::

    from sam_core import load_model, SamPredictor
    predictor = SamPredictor(load_model("litemedsam"))
"""

from __future__ import annotations

import importlib
from typing import Any, List

# public name -> submodule that defines it
_EXPORTS = {
    "sam_model_registry": "build_sam",
    "build_sam_vit_b": "build_sam",
    "build_sam_vit_l": "build_sam",
    "build_sam_vit_h": "build_sam",
    "build_litemedsam": "build_sam",
    "Sam": "sam",
    "ImageEncoderViT": "image_encoder",
    "TinyViT": "tiny_vit",
    "PromptEncoder": "prompt_encoder",
    "MaskDecoder": "mask_decoder",
    "TwoWayTransformer": "transformer",
    "Preprocessing": "transforms",
    "SamPredictor": "predictor",
    "ImageEmbedding": "predictor",
    "load_model": "zoo",
    "MODEL_SPECS": "zoo",
    "DEFAULT_MODEL": "zoo",
    "select_device": "device",
    "CheckpointError": "errors",
    "SamAutomaticMaskGenerator": "automatic_mask_generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
