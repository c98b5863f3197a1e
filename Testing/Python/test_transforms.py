"""sam_core.transforms: resize/normalise/pad, coordinate scaling and mask postprocessing on cases
small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_core.transforms import (
    MASK_PROMPT_LOGIT,
    Preprocessing,
    apply_boxes,
    apply_coords,
    as_size,
    get_preprocess_shape,
    mask_to_frame,
    mask_to_low_res,
    postprocess_masks,
    preprocess_image,
)

LITE = Preprocessing(img_size=256, normalization="minmax")
SAM = Preprocessing(img_size=1024, normalization="imagenet")


def test_preprocessing_is_a_frozen_value():
    assert LITE == Preprocessing(256, "minmax")
    with pytest.raises(AttributeError):
        LITE.img_size = 512  # type: ignore[misc]


def test_longest_side_resize_shape():
    assert get_preprocess_shape(512, 256, 256) == (256, 128)
    assert get_preprocess_shape(256, 512, 256) == (128, 256)
    assert get_preprocess_shape(101, 122, 256) == (212, 256)  # 101 * 256 / 122 = 211.9 -> 212
    assert get_preprocess_shape(3, 1024, 1024) == (3, 1024)
    with pytest.raises(ValueError):
        get_preprocess_shape(0, 5, 256)


def test_512x256_image_becomes_256x128_padded_with_zeros():
    image = np.zeros((512, 256, 3), np.uint8)
    image[:256] = 200  # top half bright
    x, input_size = preprocess_image(image, LITE)
    assert input_size == (256, 128)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    # min-max to [0, 1] over the resized image, then zero padding on the right
    assert float(x[..., :, :128].max()) == pytest.approx(1.0)
    assert float(x[..., :, :128].min()) == pytest.approx(0.0)
    assert torch.all(x[..., :, 128:] == 0)
    assert torch.allclose(x[0, :, 10, 5], torch.ones(3))  # top stays bright
    assert torch.allclose(x[0, :, 250, 5], torch.zeros(3))  # bottom stays dark


def test_grayscale_is_replicated_to_three_channels():
    gray = (np.arange(64 * 32).reshape(64, 32) % 251).astype(np.uint8)
    x_gray, size_gray = preprocess_image(gray, LITE)
    x_rgb, size_rgb = preprocess_image(np.repeat(gray[:, :, None], 3, axis=2), LITE)
    assert size_gray == size_rgb == (256, 128)
    assert torch.equal(x_gray, x_rgb)


def test_minmax_uses_the_resized_image_and_handles_constant_images():
    image = np.full((20, 10), 7, np.uint8)
    x, _ = preprocess_image(image, LITE)
    assert torch.all(x == 0)  # (x - min) / clip(0, 1e-8) = 0, no NaN


def test_imagenet_normalisation_then_zero_padding():
    image = np.zeros((4, 8, 3), np.uint8)
    image[..., 0] = 124  # close to the red mean
    x, input_size = preprocess_image(image, SAM)
    assert input_size == (512, 1024)
    mean = torch.tensor(SAM.pixel_mean).view(3, 1)
    std = torch.tensor(SAM.pixel_std).view(3, 1)
    expected = (torch.tensor([124.0, 0.0, 0.0]).view(3, 1) - mean) / std
    assert torch.allclose(x[0, :, 100, 100:101], expected, atol=1e-4)
    assert torch.all(x[..., 512:, :] == 0)  # padding after normalisation is exactly zero


def test_resize_keeps_the_0_255_range():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = 255
    x, _ = preprocess_image(image, Preprocessing(img_size=8, normalization="imagenet"))
    red = x[0, 0] * SAM.pixel_std[0] + SAM.pixel_mean[0]
    assert float(red.max()) <= 255.0 + 1e-3 and float(red.min()) >= -1e-3


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4,), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_bad_images_raise(bad):
    with pytest.raises(ValueError):
        preprocess_image(bad, LITE)


def test_coordinates_scale_by_the_resize_factor():
    # 512 x 256 (H x W) original -> 256 x 128 input: factor 0.5 on both axes
    coords = np.array([[100.0, 300.0], [0.0, 511.0]])
    np.testing.assert_allclose(
        apply_coords(coords, (512, 256), (256, 128)), [[50, 150], [0, 255.5]]
    )
    box = np.array([10.0, 20.0, 30.0, 40.0])
    np.testing.assert_allclose(apply_boxes(box, (512, 256), (256, 128)), [5, 10, 15, 20])
    # x by new_w / W, y by new_h / H separately (101 x 122 -> 212 x 256)
    np.testing.assert_allclose(
        apply_coords(np.array([[122.0, 101.0]]), (101, 122), (212, 256)), [[256, 212]], rtol=1e-6
    )
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0, 0, 1, 1]])
    out = apply_boxes(boxes, (512, 256), (256, 128))
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out[0], torch.tensor([5.0, 10.0, 15.0, 20.0]))


def test_postprocess_crops_padding_and_returns_original_size():
    # a 256 x 256 low-res map for a 512 x 256 image: the left 128 columns are the image
    low = torch.full((1, 1, 256, 256), -10.0)
    low[..., :128, :64] = 10.0  # top-left quarter of the image region
    out = postprocess_masks(low, (256, 128), (512, 256), 256)
    assert out.shape == (1, 1, 512, 256)
    fg = (out > 0)[0, 0].numpy()
    expected = np.zeros((512, 256), bool)
    expected[:256, :128] = True
    assert (fg == expected).all()


def test_postprocess_identity_when_sizes_match():
    low = torch.randn(2, 3, 256, 256)
    out = postprocess_masks(low, (256, 256), (256, 256), 256)
    assert torch.equal(out, low)


def test_postprocess_fractional_region_matches_upsample_then_crop():
    # SAM at 1024: a 101 x 122 image has input (424, 512) -> low-res region (106, 128) exact,
    # while 100 x 122 gives (420, 512) -> (105, 128); 1000 x 1021 gives (1003, 1024) -> 250.75.
    # The exact fractional crop must agree with upsampling to 1024, cropping, resizing.
    torch.manual_seed(0)
    low = torch.randn(1, 1, 256, 256)
    low = F.avg_pool2d(low, 5, stride=1, padding=2)  # smooth, so interpolation orders agree
    for original in [(100, 122), (1000, 1021), (37, 200)]:
        input_size = get_preprocess_shape(*original, 1024)
        ours = postprocess_masks(low, input_size, original, 1024)
        big = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
        big = big[..., : input_size[0], : input_size[1]]
        ref = F.interpolate(big, original, mode="bilinear", align_corners=False)
        assert ours.shape == ref.shape
        # differs only by the double interpolation of the reference, most at the border
        scale = float(low.abs().max())
        assert float((ours - ref).abs().max()) < 0.1 * scale
        assert float((ours - ref).abs().mean()) < 0.01 * scale


def test_mask_to_low_res_geometry_and_magnitude():
    mask = np.zeros((512, 256), bool)
    mask[:256, :128] = True  # top-left quarter
    low = mask_to_low_res(mask, (256, 128), 256)
    assert low.shape == (1, 256, 256) and low.dtype == np.float32
    assert low.max() == pytest.approx(MASK_PROMPT_LOGIT)
    assert low.min() == pytest.approx(-MASK_PROMPT_LOGIT)
    assert (low[0, :120, :60] > 0).all()
    assert (low[0, 136:, :] < 0).all()
    assert (low[0, :, 128:] == -MASK_PROMPT_LOGIT).all()  # padding is background
    # round trip: low-res prompt -> postprocess -> the same mask (up to the resampled edge)
    back = postprocess_masks(torch.from_numpy(low)[None], (256, 128), (512, 256), 256)[0, 0] > 0
    assert (back.numpy() != mask).mean() < 0.01


def test_mask_to_frame_covers_the_unpadded_region_at_the_frame_scale():
    """The image embedding's grid (64 x 64 for a 256 input): a (40, 80) image fills the
    (128, 256) input, so (32, 64) embedding cells; the padding is never covered."""
    full = mask_to_frame(np.ones((40, 80), bool), (128, 256), 256, 64)
    assert full.shape == (64, 64) and full.dtype == torch.float32
    assert torch.allclose(full[:32], torch.ones(32, 64), atol=1e-4)
    assert torch.all(full[32:] == 0.0)
    left = np.zeros((40, 80), bool)
    left[:, :20] = True  # the left quarter: 16 of the 64 columns
    frame = mask_to_frame(left, (128, 256), 256, 64)
    assert float(frame.sum()) == pytest.approx(32 * 16, rel=0.02)
    assert torch.all(frame[:32, :15] > 0.99) and torch.all(frame[:, 17:] < 0.01)
    # any grid covering the same field of view gives the same coverage
    finer = np.repeat(np.repeat(left, 2, axis=0), 2, axis=1)
    assert torch.allclose(mask_to_frame(finer, (128, 256), 256, 64), frame, atol=0.05)


def test_mask_to_low_res_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mask_to_low_res(np.zeros((2, 3, 4), bool), (256, 256), 256)


def test_as_size():
    assert as_size((3, 4)) == (3, 4)
    assert as_size(np.array([3, 4])) == (3, 4)
    for bad in [(3,), (0, 4), (3.5, 4), "ab", None]:
        with pytest.raises(ValueError):
            as_size(bad)
