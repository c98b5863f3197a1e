"""The composite Segment Anything model: image encoder, prompt encoder, mask decoder.

``Sam`` only holds the three networks and the model's :class:`~sam_core.transforms.Preprocessing`
(input size and normalisation, not part of the state dict). Image preprocessing, coordinate
scaling and mask postprocessing live in :mod:`sam_core.transforms`; :class:`sam_core.predictor.
SamPredictor` drives the submodules (embed an image once, decode many prompts).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transforms import Preprocessing


class Sam(nn.Module):
    """Segment Anything model (SAM ViT-B/L/H, MedSAM, LiteMedSAM).

    Args:
        image_encoder: ``B x 3 x S x S`` preprocessed images -> ``B x 256 x 64 x 64`` embeddings
            (``S = preprocessing.img_size``).
        prompt_encoder: points/boxes/masks -> sparse and dense prompt embeddings.
        mask_decoder: embeddings -> low-resolution (256 x 256) mask logits and IoU predictions.
        preprocessing: input size and normalisation the image encoder expects.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.preprocessing = preprocessing

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.prompt_encoder.no_mask_embed.weight.device

    @property
    def image_embedding_size(self) -> Tuple[int, int]:
        """``(h, w)`` of the image embedding (64, 64 for every supported model)."""
        return self.prompt_encoder.image_embedding_size

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` preprocessed (normalised, padded) images -> ``B x 256 x h x w``."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for prompts in model-input pixels.

        Args:
            image_embeddings: ``1 x 256 x h x w`` (shared) or ``B x 256 x h x w``.
            point_coords: ``B x N x 2`` (x, y) in model-input pixels, with ``point_labels``
                ``B x N`` (1 foreground, 0 background, -1 ignored); or None.
            boxes: ``B x 4`` XYXY in model-input pixels, or None.
            mask_input: ``B x 1 x 256 x 256`` low-resolution logits, or None.
            multimask_output: three candidates (True) or the single mask (False).

        Returns:
            low-resolution logits ``B x M x 256 x 256`` and IoU predictions ``B x M``.
        """
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            points = (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
