"""sam_core.predictor: shapes and validation on a small random-weight LiteMedSAM, and real
segmentation quality with the LiteMedSAM checkpoint on a CT slice from ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core.build_sam import build_litemedsam
from sam_core.predictor import ImageEmbedding, SamPredictor
from sam_core.sam import Sam

LIVER = 5  # labels.json


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def random_lite():
    """LiteMedSAM with random weights (no checkpoint)."""
    torch.manual_seed(0)
    return build_litemedsam()


@pytest.fixture(scope="module")
def random_predictor(random_lite):
    """The random LiteMedSAM's prompt encoder and decoder behind a one-layer image encoder
    (256 -> 64 x 64 x 256), so the state/batching/validation tests stay fast on a busy CPU."""
    torch.manual_seed(1)
    encoder = torch.nn.Conv2d(3, 256, kernel_size=4, stride=4)
    sam = Sam(
        encoder, random_lite.prompt_encoder, random_lite.mask_decoder, random_lite.preprocessing
    )
    return SamPredictor(sam.eval())


def fake_embedding(original_size=(20, 30), input_size=(171, 256)) -> ImageEmbedding:
    return ImageEmbedding(torch.randn(1, 256, 64, 64), original_size, input_size)


@pytest.fixture(scope="module")
def ct_slice():
    """(image uint8 H x W, liver mask) of the axial slice with the most liver, as Slicer shows
    it (rows anterior -> posterior, columns patient right -> left), window L40 / W400."""
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "ct-abdomen-3mm"
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (present in CI)")
    nib = pytest.importorskip("nibabel")
    ct = np.asarray(nib.load(str(folder / "ct.nii.gz")).dataobj).astype(np.float32)
    labels = np.asarray(nib.load(str(folder / "labels.nii.gz")).dataobj)
    k = int(np.argmax([(labels[:, :, k] == LIVER).sum() for k in range(labels.shape[2])]))
    # NIfTI (i, j, k) with a RAS-aligned affine: rows = j flipped (anterior first), columns =
    # i flipped (patient right on the left of the image).
    hu = ct[:, :, k].T[::-1, ::-1]
    liver = (labels[:, :, k] == LIVER).T[::-1, ::-1]
    lo, hi = 40 - 400 / 2, 40 + 400 / 2
    image = np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(liver)


@pytest.fixture(scope="module")
def lite_predictor(litemedsam_checkpoint, ct_slice):
    """LiteMedSAM with its checkpoint, the CT slice set (encoded once for the module)."""
    predictor = SamPredictor(build_litemedsam(litemedsam_checkpoint))
    predictor.set_image(ct_slice[0])
    return predictor


def tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


# -- random weights: shapes, state, validation --------------------------------------------------


def test_random_litemedsam_shapes(random_lite):
    p = SamPredictor(random_lite)
    p.set_image((np.random.default_rng(0).random((40, 70)) * 255).astype(np.uint8))
    assert p.get_image_embedding().shape == (1, 256, 64, 64)
    masks, iou, low = p.predict(box=[5, 5, 30, 20], multimask_output=False)
    assert masks.shape == (1, 40, 70) and iou.shape == (1,) and low.shape == (1, 256, 256)


def test_shapes_and_dtypes(random_predictor):
    p = random_predictor
    image = (np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8)
    p.set_image(image)
    assert p.is_image_set and p.original_size == (40, 70) and p.input_size == (146, 256)
    assert p.get_image_embedding().shape == (1, 256, 64, 64)

    masks, iou, low = p.predict(box=[5, 5, 30, 20])
    assert masks.shape == (3, 40, 70) and masks.dtype == np.bool_
    assert iou.shape == (3,) and iou.dtype == np.float32
    assert low.shape == (3, 256, 256) and low.dtype == np.float32

    masks, iou, low = p.predict(
        point_coords=[[10, 10], [50, 30]], point_labels=[1, 0], multimask_output=False
    )
    assert masks.shape == (1, 40, 70) and iou.shape == (1,) and low.shape == (1, 256, 256)

    logits, _, _ = p.predict(box=[5, 5, 30, 20], return_logits=True, output_size=(80, 140))
    assert logits.shape == (3, 80, 140) and logits.dtype == np.float32
    masks, _, _ = p.predict(box=[5, 5, 30, 20], output_size=(80, 140))
    assert np.array_equal(masks, logits > 0)

    masks, _, _ = p.predict(mask_input=low[:1], multimask_output=False)
    assert masks.shape == (1, 40, 70)
    prompt = p.mask_to_low_res(np.ones((40, 70), bool))
    assert prompt.shape == (1, 256, 256)


def test_encode_does_not_change_the_current_image(random_predictor):
    p = random_predictor
    p.set_embedding(fake_embedding())
    before = p.embedding
    emb = p.encode(np.full((50, 10), 9, np.uint8))
    assert p.embedding is before
    assert isinstance(emb, ImageEmbedding)
    assert emb.original_size == (50, 10) and emb.input_size == (256, 51)


def test_mask_features_average_the_embedding_under_the_mask(random_predictor):
    """A (20, 40) image fills (128, 256) of the input: embedding rows 0-31 hold it. Channel 0 is
    1 under its left half, channel 1 under its right half, channel 2 only in the padding."""
    features = torch.zeros(1, 256, 64, 64)
    features[0, 0, :32, :32] = 1.0
    features[0, 1, :32, 32:] = 1.0
    features[0, 2, 32:, :] = 5.0
    emb = ImageEmbedding(features, (20, 40), (128, 256))
    p = random_predictor  # the antialiased resize blurs the mask's edge over about one cell
    left = np.zeros((20, 40), bool)
    left[:, :20] = True
    v, cells = p.mask_features(left, emb)
    assert v.shape == (256,) and v.dtype == np.float32
    assert cells == pytest.approx(32 * 32, rel=0.02)  # half of the 32 x 64 cells of the image
    np.testing.assert_allclose(v[:3], [1.0, 0.0, 0.0], atol=0.01)
    whole, cells = p.mask_features(np.ones((20, 40), bool), emb)
    assert cells == pytest.approx(32 * 64, rel=1e-4)
    np.testing.assert_allclose(whole[:3], [0.5, 0.5, 0.0], atol=1e-4)
    assert p.mask_features(np.zeros((20, 40), bool), emb) is None
    # the current embedding is the default
    p.set_embedding(emb)
    np.testing.assert_array_equal(p.mask_features(left)[0], v)
    with pytest.raises(ValueError):
        p.mask_features(np.ones((2, 20, 40), bool), emb)


def test_encode_batch_matches_single_encodes(random_predictor):
    rng = np.random.default_rng(2)
    images = [(rng.random((30, 40)) * 255).astype(np.uint8) for _ in range(2)]
    images.append((rng.random((60, 20, 3)) * 255).astype(np.uint8))
    batch = random_predictor.encode_batch(images)
    chunked = random_predictor.encode_batch(images, batch_size=2)
    assert len(batch) == len(chunked) == 3
    for image, b, c in zip(images, batch, chunked):
        single = random_predictor.encode(image)
        assert b.original_size == single.original_size and b.input_size == single.input_size
        torch.testing.assert_close(b.features, single.features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c.features, single.features, atol=1e-4, rtol=1e-4)
    assert random_predictor.encode_batch([]) == []


def test_predict_torch_batches_boxes_like_predict(random_predictor):
    p = random_predictor
    p.set_image((np.random.default_rng(3).random((48, 64)) * 255).astype(np.uint8))
    boxes = np.array([[2, 3, 30, 40], [10, 10, 60, 45]], np.float32)
    masks, iou, low = p.predict_torch(boxes=torch.from_numpy(boxes), multimask_output=False)
    assert masks.shape == (2, 1, 48, 64) and iou.shape == (2, 1) and low.shape == (2, 1, 256, 256)
    for i, box in enumerate(boxes):
        m, s, lr = p.predict(box=box, multimask_output=False)
        torch.testing.assert_close(torch.from_numpy(lr), low[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(s), iou[i], atol=1e-4, rtol=1e-4)
        assert (m != masks[i].numpy()).mean() < 0.001


def test_invalid_inputs_raise_value_error(random_predictor):
    p = random_predictor
    p.set_embedding(fake_embedding())
    bad_calls = [
        dict(),  # no prompt
        dict(point_coords=[[1, 2]]),  # labels missing
        dict(point_labels=[1]),  # coords missing
        dict(point_coords=[[1, 2], [3, 4]], point_labels=[1]),  # length mismatch
        dict(point_coords=[1, 2], point_labels=[1]),  # not N x 2
        dict(point_coords=[[1, 2]], point_labels=[2]),  # label not 0/1
        dict(point_coords=[[np.nan, 2]], point_labels=[1]),
        dict(box=[1, 2, 3]),
        dict(box=[[1, 2, 3, 4], [1, 2, 3, 4]]),
        dict(box=[10, 2, 3, 4]),  # x1 < x0
        dict(mask_input=np.zeros((1, 64, 64))),
        dict(box=[1, 2, 3, 4], output_size=(0, 5)),
        dict(box=[1, 2, 3, 4], output_size=(5,)),
    ]
    for kwargs in bad_calls:
        with pytest.raises(ValueError):
            p.predict(**kwargs)
    with pytest.raises(ValueError):
        p.predict_torch(boxes=torch.zeros(4))
    with pytest.raises(ValueError):
        p.predict_torch(
            boxes=torch.zeros(2, 4),
            point_coords=torch.zeros(3, 1, 2),
            point_labels=torch.ones(3, 1),
        )
    with pytest.raises(ValueError):
        p.set_embedding(ImageEmbedding(torch.zeros(256, 64, 64), (20, 30), (171, 256)))
    with pytest.raises(ValueError):
        p.encode(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError):
        p.encode_batch(np.zeros((2, 10, 10), np.uint8))
    with pytest.raises(ValueError):
        p.mask_to_low_res(np.zeros((2, 3, 4), bool))


def test_predict_without_an_image_raises(random_predictor):
    p = SamPredictor(random_predictor.model)
    assert not p.is_image_set
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=[0, 0, 5, 5])
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


# -- LiteMedSAM checkpoint on real CT -----------------------------------------------------------


def test_box_on_a_ct_slice_segments_the_liver(lite_predictor, ct_slice):
    image, liver = ct_slice
    masks, iou, low = lite_predictor.predict(box=tight_box(liver), multimask_output=False)
    assert masks.shape == (1, *image.shape)
    assert dice(masks[0], liver) > 0.8
    assert 0.0 < float(iou[0]) <= 1.5


def test_encode_then_set_embedding_equals_set_image(lite_predictor, ct_slice):
    image, liver = ct_slice
    box = tight_box(liver)
    direct = lite_predictor.predict(box=box)  # the fixture used set_image
    other = SamPredictor(lite_predictor.model)
    other.set_embedding(lite_predictor.encode(image))
    cached = other.predict(box=box)
    for a, b in zip(direct, cached):
        assert np.array_equal(a, b)


def test_output_size_resizes_to_the_requested_grid(lite_predictor, ct_slice):
    image, liver = ct_slice
    h, w = image.shape
    masks, _, _ = lite_predictor.predict(
        box=tight_box(liver), multimask_output=False, output_size=(2 * h, 2 * w)
    )
    assert masks.shape == (1, 2 * h, 2 * w)
    liver_2x = np.repeat(np.repeat(liver, 2, axis=0), 2, axis=1)
    assert dice(masks[0], liver_2x) > 0.8


def test_multimask_returns_three_candidates_with_scores(lite_predictor, ct_slice):
    image, liver = ct_slice
    masks, iou, low = lite_predictor.predict(box=tight_box(liver), multimask_output=True)
    assert masks.shape == (3, *image.shape) and iou.shape == (3,) and low.shape == (3, 256, 256)
    assert max(dice(m, liver) for m in masks) > 0.8


def test_previous_logits_and_existing_segments_work_as_prompts(lite_predictor, ct_slice):
    image, liver = ct_slice
    box = tight_box(liver)
    first, _, low = lite_predictor.predict(box=box, multimask_output=False)
    refined, _, _ = lite_predictor.predict(box=box, mask_input=low, multimask_output=False)
    assert dice(refined[0], liver) > 0.8
    prompt = lite_predictor.mask_to_low_res(liver)
    from_segment, _, _ = lite_predictor.predict(box=box, mask_input=prompt, multimask_output=False)
    assert dice(from_segment[0], liver) > 0.8
