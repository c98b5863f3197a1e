"""sam_core's SAM networks against Meta's segment-anything 1.0 (same random weights, fp32 CPU).

The oracle's ``modeling`` subpackage is loaded by path (see ``reference_oracles``). Its weights are
randomised with a seeded generator and copied into ours with ``strict=True``, so these tests also
pin the official state-dict key names.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from reference_oracles import (
    VIT_CONFIGS,
    load_sa_modeling,
    oracle_mask_decoder,
    oracle_prompt_encoder,
    oracle_sam,
    oracle_vit_encoder,
    randomize_,
)

from sam_core.build_sam import sam_model_registry, vit_image_encoder
from sam_core.mask_decoder import MaskDecoder
from sam_core.prompt_encoder import PromptEncoder
from sam_core.sam import Sam
from sam_core.transformer import TwoWayTransformer
from sam_core.transforms import Preprocessing

TOL = 1e-4


@pytest.fixture(scope="module")
def sa():
    module = load_sa_modeling()
    if module is None:
        pytest.skip("segment-anything==1.0 is not installed (pip install segment-anything==1.0)")
    return module


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _copy_weights(oracle: torch.nn.Module, ours: torch.nn.Module, assign: bool = False) -> None:
    ours.load_state_dict(oracle.state_dict(), strict=True, assign=assign)
    oracle.eval()
    ours.eval()


def _encoder_pair(sa, img_size: int, seed: int):
    # Both built on "meta" (skipping ViT-B's random init, the slow part); the oracle is then
    # given storage and seeded weights, and ours shares those tensors.
    with torch.device("meta"):
        oracle = oracle_vit_encoder(sa, "vit_b", img_size=img_size)
        ours = vit_image_encoder("vit_b", img_size=img_size)
    randomize_(oracle.to_empty(device="cpu"), seed=seed)
    _copy_weights(oracle, ours, assign=True)
    return oracle, ours


def test_vit_b_encoder_matches_official_on_small_input(sa):
    # ViT-B depth/width/heads and global blocks 2, 5, 8, 11 on a 256 input: the 16 x 16 token grid
    # is padded to 28 x 28 for the 14 x 14 windows, so padding and global blocks are exercised.
    oracle, ours = _encoder_pair(sa, img_size=256, seed=1)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = oracle(x)
        got = ours(x)
    assert got.shape == (1, 256, 16, 16)
    assert _max_diff(got, expected) <= TOL


@pytest.mark.slow
def test_vit_b_encoder_matches_official_at_1024(sa):
    oracle, ours = _encoder_pair(sa, img_size=1024, seed=3)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = oracle(x)
        got = ours(x)
    assert got.shape == (1, 256, 64, 64)
    assert _max_diff(got, expected) <= TOL


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_keys_and_shapes_match_official(sa, arch):
    # Built on the meta device: shapes only, no memory for ViT-H's 641M parameters.
    with torch.device("meta"):
        oracle = oracle_sam(sa, arch)
        ours = sam_model_registry[arch]()
    expected = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    width, depth, _, global_blocks = VIT_CONFIGS[arch]
    for i in range(depth):
        rel = ours.state_dict()[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
        assert rel.shape[0] == (127 if i in global_blocks else 27)


@pytest.fixture(scope="module", params=[1024, 256], ids=["sam", "litemedsam"])
def prompt_encoders(sa, request):
    size = request.param
    oracle = randomize_(oracle_prompt_encoder(sa, img_size=size), seed=5)
    ours = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(size, size),
        mask_in_chans=16,
    )
    _copy_weights(oracle, ours)
    return oracle, ours, size


def _prompts(size: int, case: str):
    gen = torch.Generator().manual_seed(6)
    coords = torch.rand(3, 4, 2, generator=gen) * (size - 1)
    labels = torch.tensor([[1, 0, 1, -1], [1, 1, 0, 0], [0, 1, -1, -1]])
    corners = torch.rand(3, 2, 2, generator=gen) * (size - 1)
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    masks = torch.randn(3, 1, 256, 256, generator=gen) * 5
    return {
        "points": ((coords, labels), None, None),
        "points_int_labels_float": ((coords, labels.float()), None, None),
        "box": (None, boxes, None),
        "box_bx1x4": (None, boxes[:, None, :], None),
        "points_and_box": ((coords, labels), boxes, None),
        "mask": (None, None, masks),
        "points_box_mask": ((coords, labels), boxes, masks),
        "none": (None, None, None),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "points",
        "points_int_labels_float",
        "box",
        "box_bx1x4",
        "points_and_box",
        "mask",
        "points_box_mask",
        "none",
    ],
)
def test_prompt_encoder_matches_official(prompt_encoders, case):
    oracle, ours, size = prompt_encoders
    points, boxes, masks = _prompts(size, case)
    with torch.inference_mode():
        sparse_ref, dense_ref = oracle(points=points, boxes=boxes, masks=masks)
        sparse, dense = ours(points=points, boxes=boxes, masks=masks)
    assert _max_diff(sparse, sparse_ref) <= TOL
    assert _max_diff(dense, dense_ref) <= TOL


def test_dense_positional_encoding_matches_official(prompt_encoders):
    oracle, ours, _ = prompt_encoders
    with torch.inference_mode():
        assert _max_diff(ours.get_dense_pe(), oracle.get_dense_pe()) <= TOL


@pytest.fixture(scope="module")
def decoders(sa):
    oracle = randomize_(oracle_mask_decoder(sa), seed=7)
    ours = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    _copy_weights(oracle, ours)
    oracle_pe = randomize_(oracle_prompt_encoder(sa), seed=8)
    return oracle, ours, oracle_pe


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches_official(decoders, multimask):
    # Two prompts sharing one image embedding (the predictor's case).
    oracle, ours, pe = decoders
    n_prompts = 2
    gen = torch.Generator().manual_seed(9)
    image_embedding = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.rand(n_prompts, 2, 2, generator=gen) * 1023
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    boxes = torch.tensor([[100.0, 200.0, 600.0, 900.0], [20.0, 40.0, 300.0, 200.0]])
    with torch.inference_mode():
        sparse, dense = pe(points=(coords, labels), boxes=boxes, masks=None)
        args = (image_embedding, pe.get_dense_pe(), sparse, dense, multimask)
        masks_ref, iou_ref = oracle(*args)
        masks, iou = ours(*args)
    n_out = 3 if multimask else 1
    assert masks.shape == (n_prompts, n_out, 256, 256)
    assert iou.shape == (n_prompts, n_out)
    assert _max_diff(masks, masks_ref) <= TOL
    assert _max_diff(iou, iou_ref) <= TOL


def test_mask_decoder_accepts_one_embedding_per_prompt(decoders):
    # The official decoder repeats the image embedding per prompt; ours also takes B embeddings for
    # B prompts (batched slices), equal to decoding each pair on its own.
    _, ours, pe = decoders
    gen = torch.Generator().manual_seed(10)
    embeddings = torch.randn(2, 256, 64, 64, generator=gen)
    boxes = torch.tensor([[10.0, 20.0, 500.0, 700.0], [300.0, 100.0, 900.0, 400.0]])
    with torch.inference_mode():
        sparse, dense = pe(points=None, boxes=boxes, masks=None)
        batched, _ = ours(embeddings, pe.get_dense_pe(), sparse, dense, True)
        for i in range(2):
            single, _ = ours(
                embeddings[i : i + 1], pe.get_dense_pe(), sparse[i : i + 1], dense[i : i + 1], True
            )
            assert _max_diff(batched[i : i + 1], single) <= TOL
        with pytest.raises(ValueError, match="image embeddings"):
            ours(
                embeddings,
                pe.get_dense_pe(),
                sparse[:1].repeat(3, 1, 1),
                dense[:1].repeat(3, 1, 1, 1),
                True,
            )


def test_sam_decode_matches_official_prompt_pipeline(sa, decoders):
    # Sam.decode = prompt encoder + mask decoder, as the official predictor chains them.
    oracle_decoder, our_decoder, oracle_pe = decoders
    our_pe = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(1024, 1024),
        mask_in_chans=16,
    )
    _copy_weights(oracle_pe, our_pe)
    sam = Sam(
        image_encoder=torch.nn.Identity(),
        prompt_encoder=our_pe,
        mask_decoder=our_decoder,
        preprocessing=Preprocessing(img_size=1024, normalization="imagenet"),
    ).eval()
    gen = torch.Generator().manual_seed(11)
    embedding = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.tensor([[[500.0, 400.0], [620.0, 380.0]]])
    labels = torch.tensor([[1, 0]])
    mask_input = torch.randn(1, 1, 256, 256, generator=gen)
    with torch.inference_mode():
        sparse, dense = oracle_pe(points=(coords, labels), boxes=None, masks=mask_input)
        expected, expected_iou = oracle_decoder(
            embedding, oracle_pe.get_dense_pe(), sparse, dense, False
        )
        got, got_iou = sam.decode(
            embedding,
            point_coords=coords,
            point_labels=labels,
            mask_input=mask_input,
            multimask_output=False,
        )
    assert got.shape == (1, 1, 256, 256)
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(got_iou, expected_iou) <= TOL
    assert sam.device == torch.device("cpu")
    assert sam.mask_threshold == 0.0


def test_importing_sam_core_is_lazy():
    # `import sam_core` must not import torch or any sibling module; names resolve on first use.
    code = (
        "import sys, sam_core\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
        "assert sam_core.Sam.__name__ == 'Sam'\n"
        "assert sam_core.TinyViT.__module__ == 'sam_core.tiny_vit'\n"
        "assert set(sam_core.sam_model_registry) == "
        "{'vit_b', 'vit_l', 'vit_h', 'litemedsam', 'medsam', 'default'}\n"
        "assert sam_core.sam_model_registry['default'] is sam_core.sam_model_registry['vit_h']\n"
        "assert 'load_model' in dir(sam_core)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
