"""Every eval-mode fast path of sam_core against the plain (reference-formulation) path.

The fast paths (sam_core.optimize) compute the same functions with fewer memory passes: TinyViT
on channels-last tokens with row bands, windowed attention in window order with torch's fused
kernel, the mask decoder's low-rank cross-attentions, per-image decoder caches and the
transposed-conv up-scaling as matrix products. Each is compared with the plain path on the same
weights (seeded random weights with unit-gain scales, and the LiteMedSAM checkpoint on real CT).
No timings here: see Testing/benchmarks/bench_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_oracles import randomize_

import sam_core.tiny_vit as tiny_vit
from sam_core.build_sam import build_litemedsam
from sam_core.optimize import DerivedCache, intra_op_threads, set_fast_paths, use_fast_path
from sam_core.predictor import ImageEmbedding, SamPredictor
from sam_core.tiny_vit import TinyViT

TOL = 1e-4  # absolute, on LayerNorm-scaled embeddings and on mask logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _plain_and_fast(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the fast paths of its module off, then on."""
    module = getattr(fn, "__self__", fn)
    with torch.inference_mode():
        set_fast_paths(module, False)
        try:
            plain = fn(*args, **kwargs)
        finally:
            set_fast_paths(module, True)
        fast = fn(*args, **kwargs)
    return plain, fast


# --------------------------------------------------------------------------- TinyViT


@pytest.fixture(scope="module")
def small_tiny_vit():
    """A seeded TinyViT at 64 x 64 input: stages at 64, 32, 16, 16 tokens, so every stage pads
    its attention windows (32 % 7, 16 % 14, 16 % 7) and the bands have a remainder."""
    torch.manual_seed(0)
    model = TinyViT(img_size=64)
    return randomize_(model, seed=3).eval()


def test_tiny_vit_fast_path_matches_plain(small_tiny_vit):
    x = torch.rand(2, 3, 64, 64)
    plain, fast = _plain_and_fast(small_tiny_vit, x)
    assert fast.shape == (2, 256, 16, 16)
    assert fast.is_contiguous()
    assert _max_diff(fast, plain) <= TOL


@pytest.mark.parametrize("band_rows", [1, 3, 5, 64])
def test_tiny_vit_row_bands_do_not_change_the_result(small_tiny_vit, monkeypatch, band_rows):
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = small_tiny_vit.forward_plain(x)
        monkeypatch.setattr(tiny_vit, "BAND_ROWS", band_rows)
        monkeypatch.setattr(tiny_vit, "MLP_CHUNK", 37)  # chunks with a remainder
        got = small_tiny_vit.forward_fast(x)
    assert _max_diff(got, expected) <= TOL


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height", [9, 16, 17])
def test_banded_bottleneck_matches_the_modules(stride, height, monkeypatch):
    torch.manual_seed(stride * 100 + height)
    merging = randomize_(
        tiny_vit.PatchMerging((height, 11), 8, 12, torch.nn.GELU, stride=stride), seed=height
    ).eval()
    mbconv = randomize_(tiny_vit.MBConv(8, 8, 4.0, torch.nn.GELU), seed=height + 1).eval()
    x = torch.randn(2, height, 11, 8)
    monkeypatch.setattr(tiny_vit, "BAND_ROWS", 4)
    with torch.inference_mode():
        nchw = x.permute(0, 3, 1, 2).contiguous()
        expected = merging(nchw)  # tokens B x (H' W') x C'
        got = merging.forward_nhwc(x)
        assert _max_diff(got.reshape(expected.shape), expected) <= TOL
        expected = mbconv(nchw).permute(0, 2, 3, 1)
        assert _max_diff(mbconv.forward_nhwc(x), expected) <= TOL


@pytest.mark.parametrize("size", [(7, 7), (14, 21), (16, 16), (9, 20)])
def test_window_partition_round_trips_with_zero_padding(size):
    h, w = size
    ws = 7
    x = torch.randn(2, h, w, 5)
    windows = tiny_vit._to_windows(x, ws)
    nh, nw = -(-h // ws), -(-w // ws)
    assert windows.shape == (2 * nh * nw, ws * ws, 5)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nw * ws - w, 0, nh * ws - h))
    expected = padded.reshape(2, nh, ws, nw, ws, 5).transpose(2, 3).reshape(-1, ws * ws, 5)
    assert torch.equal(windows, expected)
    assert torch.equal(tiny_vit._from_windows(windows, 2, h, w, ws), x)


@pytest.mark.slow  # ~8 s on a busy 2-core CPU
def test_tiny_vit_training_mode_uses_the_plain_path(small_tiny_vit):
    model = small_tiny_vit
    x = torch.rand(1, 3, 64, 64)
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # BN statistics move
    model.train()
    try:
        assert not use_fast_path(model)
        out = model(x)
        out.square().mean().backward()
        assert model.layers[1].blocks[0].attn.attention_biases.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.load_state_dict(saved)
    with torch.no_grad():
        assert use_fast_path(model)
    assert not use_fast_path(model)  # autograd on: the derived weights are detached
    x.requires_grad_(True)
    model(x).sum().backward()  # eval mode with autograd: the plain path, differentiable
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.zero_grad(set_to_none=True)


def test_folded_weights_follow_parameter_changes(small_tiny_vit):
    model = small_tiny_vit
    x = torch.rand(1, 3, 64, 64)
    conv_bn = model.layers[0].blocks[0].conv2
    attn = model.layers[1].blocks[0].attn
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.inference_mode():
            model(x)  # fills the derived caches
        with torch.no_grad():
            conv_bn.bn.running_var.mul_(2.0)  # in place: same tensor, new version
            attn.attention_biases.add_(0.5)
        # and a new tensor object, as load_state_dict(assign=True) would give
        conv_bn.c.weight = torch.nn.Parameter(conv_bn.c.weight.detach() * 0.5)
        plain, fast = _plain_and_fast(model, x)
        assert _max_diff(fast, plain) <= TOL
    finally:
        model.load_state_dict(saved)
    plain, fast = _plain_and_fast(model, x)
    assert _max_diff(fast, plain) <= TOL


def test_derived_cache_rebuilds_only_on_change():
    cache = DerivedCache()
    source = torch.ones(3)
    calls = []

    def build():
        calls.append(1)
        return source * 2

    first = cache.get("x", (source,), build)
    assert cache.get("x", (source,), build) is first
    source.add_(1)
    assert torch.equal(cache.get("x", (source,), build), torch.full((3,), 4.0))
    assert len(calls) == 2
    with torch.inference_mode():
        inference_source = torch.ones(2)  # no version counter: never cached
    cache.get("y", (inference_source,), lambda: calls.append(1))
    cache.get("y", (inference_source,), lambda: calls.append(1))
    assert len(calls) == 4


@pytest.mark.slow  # ~8 s on a busy 2-core CPU
def test_tiny_vit_fast_path_under_autocast(small_tiny_vit):
    # The GPU path autocasts to bf16/fp16 (sam_core.device); CPU bf16 exercises the same dtype
    # plumbing of the fast path (values agree to bf16 precision only).
    x = torch.rand(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast = _plain_and_fast(small_tiny_vit, x)
    assert torch.isfinite(fast).all()
    scale = plain.float().abs().max().item()
    assert _max_diff(fast, plain) <= 0.1 * scale


# --------------------------------------------------------------------------- mask decoder


@pytest.fixture(scope="module")
def random_sam():
    torch.manual_seed(0)
    return randomize_(build_litemedsam(), seed=5).eval()


def _prompts(seed: int = 0, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 40], dim=1)
    coords = torch.rand(n, 2, 2, generator=gen) * 250
    labels = torch.tensor([[1, 0]] * n)
    masks = torch.randn(n, 1, 256, 256, generator=gen) * 5
    return boxes, coords, labels, masks


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["box", "points", "points+box", "box+mask"])
@pytest.mark.parametrize("n_images", [1, 3])
def test_mask_decoder_fast_path_matches_plain(random_sam, multimask, prompt, n_images):
    boxes, coords, labels, masks = _prompts()
    kwargs = {"multimask_output": multimask}
    if "box" in prompt:
        kwargs["boxes"] = boxes
    if "points" in prompt:
        kwargs["point_coords"], kwargs["point_labels"] = coords, labels
    if "mask" in prompt:
        kwargs["mask_input"] = masks
    embeddings = torch.randn(n_images, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    (plain, plain_iou), (fast, fast_iou) = _plain_and_fast(random_sam.decode, embeddings, **kwargs)
    assert fast.shape == plain.shape == (3, 3 if multimask else 1, 256, 256)
    assert _max_diff(fast, plain) <= TOL
    assert _max_diff(fast_iou, plain_iou) <= TOL


def test_first_layer_projections_match_the_uncached_decoder(random_sam):
    decoder, prompt_encoder = random_sam.mask_decoder, random_sam.prompt_encoder
    boxes, _, _, _ = _prompts(seed=2, n=4)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        cache = decoder.prepare_image(embedding, prompt_encoder.get_dense_pe(), dense)
        projected = decoder.project_first_layer(cache)
        assert projected.first_layer is not None and cache.first_layer is None
        for multimask in (False, True):
            plain = decoder.forward_cached(cache, sparse, multimask)
            cached = decoder.forward_cached(projected, sparse, multimask)
            assert _max_diff(cached[0], plain[0]) <= TOL
            assert _max_diff(cached[1], plain[1]) <= TOL


@pytest.mark.slow  # ~8 s on a busy 2-core CPU
def test_mask_decoder_fast_path_under_autocast(random_sam):
    boxes, _, _, _ = _prompts(seed=4)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (plain, _), (fast, _) = _plain_and_fast(random_sam.decode, embedding, boxes=boxes)
    assert torch.isfinite(fast.float()).all()
    assert _max_diff(fast, plain) <= 0.1 * plain.float().abs().max().item()


# --------------------------------------------------------------------------- predictor


def _fake_embedding(seed: int) -> ImageEmbedding:
    gen = torch.Generator().manual_seed(seed)
    return ImageEmbedding(torch.randn(1, 256, 64, 64, generator=gen), (90, 120), (192, 256))


def test_predictor_fast_path_matches_plain(random_sam):
    predictor = SamPredictor(random_sam)
    predictor.set_embedding(_fake_embedding(7))
    box = np.array([10.0, 12.0, 70.0, 60.0])
    calls = [
        {"box": box, "multimask_output": False, "output_size": (180, 240)},
        {"box": box, "multimask_output": True},
        {"point_coords": np.array([[40.0, 30.0]]), "point_labels": np.array([1])},
        {"box": box, "mask_input": np.random.default_rng(0).normal(size=(1, 256, 256)) * 5},
    ]
    for kwargs in calls:
        set_fast_paths(random_sam, False)
        try:
            plain = predictor.predict(return_logits=True, **kwargs)
        finally:
            set_fast_paths(random_sam, True)
        fast = predictor.predict(return_logits=True, **kwargs)
        for a, b in zip(fast, plain):
            assert np.abs(a - b).max() <= TOL


def test_predictor_cached_decoder_inputs_are_deterministic(random_sam):
    # The per-image cache is built the same way on the first prompt, so repeating a prompt,
    # on the same predictor or a fresh one, gives identical logits.
    embedding = _fake_embedding(8)
    box = np.array([20.0, 5.0, 90.0, 80.0])
    first = SamPredictor(random_sam)
    first.set_embedding(embedding)
    a = first.predict(box=box, return_logits=True)
    first.predict(box=box + 3)
    b = first.predict(box=box, return_logits=True)
    fresh = SamPredictor(random_sam)
    fresh.set_embedding(embedding)
    c = fresh.predict(box=box, return_logits=True)
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    uncached = SamPredictor(random_sam, cache_image_projections=False)
    uncached.set_embedding(embedding)
    for x, y in zip(a, uncached.predict(box=box, return_logits=True)):
        assert np.abs(x - y).max() <= TOL


def test_predictor_decoder_cache_follows_the_embedding(random_sam):
    predictor = SamPredictor(random_sam)
    box = np.array([20.0, 5.0, 90.0, 80.0])
    predictor.set_embedding(_fake_embedding(9))
    predictor.predict(box=box)
    predictor.set_embedding(_fake_embedding(10))
    got = predictor.predict(box=box, return_logits=True)
    fresh = SamPredictor(random_sam)
    fresh.set_embedding(_fake_embedding(10))
    for x, y in zip(got, fresh.predict(box=box, return_logits=True)):
        assert np.array_equal(x, y)


def test_predictor_thread_settings_are_restored(random_sam):
    before = torch.get_num_threads()
    predictor = SamPredictor(random_sam, decode_threads=1)
    predictor.set_embedding(_fake_embedding(11))
    predictor.predict(box=np.array([1.0, 2.0, 30.0, 40.0]))
    assert torch.get_num_threads() == before
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- real checkpoint


@pytest.fixture(scope="module")
def ct_image(shared_data):
    nib = pytest.importorskip("nibabel")
    folder = shared_data / "ct-abdomen-3mm"
    ct = np.asarray(nib.load(str(folder / "ct.nii.gz")).dataobj).astype(np.float32)
    labels = np.asarray(nib.load(str(folder / "labels.nii.gz")).dataobj)
    k = 12
    u8 = np.round(np.clip((ct[:, :, k].T + 160.0) / 400.0, 0, 1) * 255).astype(np.uint8)
    label = labels[:, :, k].T
    boxes = []
    for value in np.unique(label)[1:]:
        rows, cols = np.nonzero(label == value)
        if rows.size >= 100:
            boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    return np.ascontiguousarray(u8), np.array(boxes, dtype=np.float32)


# Two TinyViT runs per path on a real slice: ~10 s of CPU.
@pytest.mark.slow
@pytest.mark.shared_data
def test_litemedsam_fast_paths_keep_the_masks(litemedsam_checkpoint, ct_image):
    image, boxes = ct_image
    sam = build_litemedsam(litemedsam_checkpoint)
    plain_predictor, fast_predictor = SamPredictor(sam), SamPredictor(sam)
    set_fast_paths(sam, False)
    try:
        plain_embedding = plain_predictor.encode(image)
        plain_predictor.set_embedding(plain_embedding)
        plain = [plain_predictor.predict(box=b, multimask_output=False) for b in boxes]
    finally:
        set_fast_paths(sam, True)
    fast_embedding = fast_predictor.encode(image)
    assert _max_diff(fast_embedding.features, plain_embedding.features) <= TOL
    fast_predictor.set_embedding(fast_embedding)
    fast = [fast_predictor.predict(box=b, multimask_output=False) for b in boxes]
    assert len(boxes) >= 5
    for (pm, piou, plow), (fm, fiou, flow) in zip(plain, fast):
        assert np.abs(flow - plow).max() <= 1e-3  # embeddings differ by ~1e-6 already
        assert np.abs(fiou - piou).max() <= 1e-4
        differing = int((pm != fm).sum())
        assert differing <= 2, f"{differing} mask pixels differ"
