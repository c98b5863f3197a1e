"""ONNX export of a SAM-family model: the image encoder and SAM's prompt-to-mask graph.

Two files per model, so that other runtimes (onnxruntime, OpenVINO) and viewers can run it:

``encoder.onnx``
    input ``image`` (B, 3, S, S) float32: the preprocessed, zero-padded image exactly as
    :func:`sam_core.transforms.preprocess_image` makes it (S = the model's ``img_size``: 256 for
    LiteMedSAM, 1024 for SAM and MedSAM); output ``image_embeddings`` (B, 256, S/16, S/16).
``decoder.onnx``
    SAM's own ONNX signature (``segment_anything/utils/onnx.py``, ``SamOnnxModel``): inputs
    ``image_embeddings`` (1, 256, E, E), ``point_coords`` (1, N, 2) float32 (x, y) in the
    resized frame (:func:`sam_core.transforms.apply_coords`; N is dynamic), ``point_labels``
    (1, N) float32 (1 positive, 0 negative, 2 / 3 a box's top-left / bottom-right corner, -1 a
    padding point, which prompts without a box need), ``mask_input`` (1, 1, 4E, 4E) logits,
    ``has_mask_input`` (1,) 0 or 1, ``orig_im_size`` (2,) float32 (H, W); outputs ``masks``
    (1, 4, H, W) logits at the original size (threshold at the model's ``mask_threshold``, 0),
    ``iou_predictions`` (1, 4) and ``low_res_masks`` (1, 4, 4E, 4E). Mask 0 is the single-mask
    output, masks 1-3 the multimask candidates.

Both graphs are traced from the plain (official-layout) forward paths: the eval fast paths
(:mod:`sam_core.optimize`) use data-dependent caches that do not trace. Each file carries the
model's name, checkpoint sha256 and preprocessing in its metadata
(``slicersam.model``, ``slicersam.checkpoint_sha256``, ``slicersam.img_size``,
``slicersam.normalization``), which :func:`read_metadata` returns, so that a runtime refuses an
ONNX file of another model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from sam_core.optimize import set_fast_paths

PathLike = Union[str, Path]
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 17
METADATA_PREFIX = "slicersam."


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + resize to the original image, in SAM's ONNX signature
    (see the module docstring). Written without data-dependent control flow so that it traces."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.sam = sam
        self.img_size = int(sam.preprocessing.img_size)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prompt_encoder = self.sam.prompt_encoder
        coords = (coords + 0.5) / self.img_size  # pixel centres -> [0, 1]
        embedding = prompt_encoder.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i in range(prompt_encoder.num_point_embeddings):
            embedding = embedding + prompt_encoder.point_embeddings[i].weight * (labels == i)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
        prompt_encoder = self.sam.prompt_encoder
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def _to_original(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        size = self.img_size
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        scale = size / torch.max(orig_im_size.to(torch.float32))
        resized = torch.floor(orig_im_size.to(torch.float32) * scale + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        h, w = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        low_res, iou = self.sam.mask_decoder.predict_masks(
            image_embeddings, self.sam.prompt_encoder.get_dense_pe(), sparse, dense
        )
        return self._to_original(low_res, orig_im_size), iou, low_res


@contextlib.contextmanager
def _plain_paths(sam) -> Iterator[None]:
    """The plain forward paths while tracing (the fast paths' caches do not trace)."""
    modes = {m: m.fast_path for m in sam.modules() if hasattr(type(m), "fast_path")}
    training = {m: m.training for m in sam.modules()}
    set_fast_paths(sam, False)
    try:
        with warnings.catch_warnings():
            # the tracer warns at every shape check of the plain path (constant here: fixed
            # image size) and the legacy exporter about itself; neither concerns the user
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        # torch.onnx.export restores the exported module's mode on its whole tree: put back
        # each module's own (an exported wrapper made in train mode would leave the model in it)
        for module, mode in training.items():
            module.training = mode
        for module, mode in modes.items():
            module.fast_path = mode


def model_metadata(sam, name: Optional[str] = None, sha256: Optional[str] = None) -> Dict:
    """The metadata written into both files: what a runtime checks before using them."""
    spec = getattr(sam, "spec", None)
    return {
        "model": name or getattr(spec, "name", None) or "unknown",
        "checkpoint_sha256": sha256 or getattr(sam, "_slicersam_identity", None) or "unknown",
        "img_size": str(int(sam.preprocessing.img_size)),
        "normalization": str(sam.preprocessing.normalization),
    }


def _write_metadata(path: Path, metadata: Dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, str(value)
    onnx.save(proto, str(path))


def read_metadata(path: PathLike) -> Dict[str, str]:
    """{key: value} of the ``slicersam.*`` metadata of an ONNX file ({} when it has none)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def export_encoder(sam, path: PathLike, metadata: Optional[Dict] = None) -> Path:
    """Write the image encoder to ``path`` (batch size dynamic); returns the path."""
    path = Path(path)
    size = int(sam.preprocessing.img_size)
    example = torch.zeros(1, 3, size, size, dtype=torch.float32)
    encoder = sam.image_encoder.eval()
    with _plain_paths(sam), torch.no_grad():
        torch.onnx.export(
            encoder,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["image_embeddings"],
            dynamic_axes={"image": {0: "batch"}, "image_embeddings": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    _write_metadata(path, metadata or model_metadata(sam))
    return path


def export_decoder(sam, path: PathLike, metadata: Optional[Dict] = None) -> Path:
    """Write :class:`SamOnnxDecoder` to ``path`` (the number of points dynamic)."""
    path = Path(path)
    grid = sam.prompt_encoder.image_embedding_size
    low = sam.prompt_encoder.mask_input_size
    inputs = (
        torch.zeros(1, 256, *grid, dtype=torch.float32),
        torch.zeros(1, 3, 2, dtype=torch.float32),
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.zeros(1, 1, *low, dtype=torch.float32),
        torch.zeros(1, dtype=torch.float32),
        torch.tensor([float(sam.preprocessing.img_size)] * 2),
    )
    decoder = SamOnnxDecoder(sam).eval()
    with _plain_paths(sam), torch.no_grad():
        torch.onnx.export(
            decoder,
            inputs,
            str(path),
            input_names=[
                "image_embeddings",
                "point_coords",
                "point_labels",
                "mask_input",
                "has_mask_input",
                "orig_im_size",
            ],
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={
                "point_coords": {1: "num_points"},
                "point_labels": {1: "num_points"},
                "masks": {2: "height", 3: "width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    _write_metadata(path, metadata or model_metadata(sam))
    return path


def export_model(sam, directory: PathLike, metadata: Optional[Dict] = None) -> Dict[str, Path]:
    """Both files into ``directory`` (created), plus ``model.json`` with the metadata; written
    under temporary names and renamed at the end, so that a failed export leaves nothing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = metadata or model_metadata(sam)
    written = {}
    temporary = []
    try:
        for name, export in ((ENCODER_FILE, export_encoder), (DECODER_FILE, export_decoder)):
            partial = directory / f".{name}.partial"
            temporary.append(partial)
            export(sam, partial, metadata)
            written[name] = partial
        card = directory / ".model.json.partial"
        temporary.append(card)
        card.write_text(json.dumps(metadata, indent=2) + "\n")
        written["model.json"] = card
        final = {}
        for name, partial in written.items():
            target = directory / name
            partial.replace(target)
            final[name] = target
        return final
    finally:
        for partial in temporary:
            if partial.exists():
                partial.unlink()
