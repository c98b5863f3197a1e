"""Segmenter: lazy per-slice encoding, cache reuse, prompts landing where placed, prefetch races.

Two kinds of tests: fast ones with a stand-in predictor (counts encodes, sleeps to expose races),
and ones with the real LiteMedSAM on the shared CT and on an awkward synthetic volume (each real
encode costs about a second on a busy CPU, so they share a model and encode as little as they can).
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch
from synthetic import (
    MARKER_LABEL,
    awkward_volume,
    bounding_box_ras,
    nifti_like_volume,
    synthetic_labels,
)

from sam_core.predictor import ImageEmbedding
from SlicerSAM.cache import EmbeddingCache
from SlicerSAM.errors import PromptError
from SlicerSAM.intensity import IntensityMapping
from SlicerSAM.prompts import Box, Point, Prompts, SlicePrompts, prompts_on_slice
from SlicerSAM.segmenter import Segmenter, SliceResult


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ----------------------------------------------------------------------------------------------
# A stand-in predictor: same interface as sam_core.predictor.SamPredictor, no network
# ----------------------------------------------------------------------------------------------
class StubSam(torch.nn.Module):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.delay = delay
        self.checkpoint_sha256 = "stub"


class FakePredictor:
    def __init__(self, sam):
        self.model = sam
        self.device = torch.device("cpu")
        self.delay = sam.delay
        self.encoded = collections.Counter()  # image digest -> times encoded
        self.batches = []
        self.calls = []
        self.low_res_inputs = []
        self._lock = threading.Lock()

    def encode(self, image):
        return self.encode_batch([image])[0]

    def encode_batch(self, images):
        time.sleep(self.delay)
        out = []
        for image in images:
            with self._lock:
                self.encoded[hashlib.sha1(image.tobytes()).hexdigest()] += 1
            features = torch.full((1, 256, 4, 4), float(image.mean()))
            out.append(ImageEmbedding(features, image.shape[:2], image.shape[:2]))
        with self._lock:
            self.batches.append(len(images))
        return out

    def set_embedding(self, embedding):
        self.embedding = embedding

    def mask_to_low_res(self, mask):
        self.low_res_inputs.append(mask.shape)
        return np.zeros((1, 256, 256), np.float32)

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, **kwargs):
        multimask_output, output_size = kwargs["multimask_output"], kwargs["output_size"]
        self.calls.append({"multimask": multimask_output, "mask_input": mask_input is not None})
        c = 3 if multimask_output else 1
        masks = np.zeros((c, *output_size), dtype=bool)
        masks[:, :2, :3] = True
        iou = np.array([0.2, 0.9, 0.5] if c == 3 else [0.7], dtype=np.float32)
        return masks, iou, np.zeros((c, 256, 256), np.float32)


@pytest.fixture
def stub_segmenter(monkeypatch):
    monkeypatch.setattr("sam_core.predictor.SamPredictor", FakePredictor)

    def make(delay=0.0, volume=None, **kwargs):
        volume = volume if volume is not None else nifti_like_volume(shape=(30, 34, 40))
        return Segmenter(volume, StubSam(delay), **kwargs)

    return make


def _point_prompt(seg, index):
    return SlicePrompts(index=index, points_xy=[[5.0, 6.0]], point_labels=[1])


def test_index_outside_the_volume_is_a_prompt_error(stub_segmenter):
    seg = stub_segmenter()
    for bad in (-1, 30, 2.5, True):
        with pytest.raises(PromptError):
            seg.segment(bad, _point_prompt(seg, 0))
    with pytest.raises(PromptError, match="slices run 0..29"):
        seg.embedding(30)
    with pytest.raises(PromptError, match="for slice 3, not slice 4"):
        seg.segment(4, _point_prompt(seg, 3))
    with pytest.raises(PromptError, match="no prompt"):
        seg.segment(4, SlicePrompts(index=4))
    assert seg.stats.slices_encoded == 0


def test_multimask_only_for_a_single_point_and_masks_on_the_grid(stub_segmenter):
    seg = stub_segmenter(orientation="sagittal")
    fake = seg.predictor
    result = seg.segment(3, _point_prompt(seg, 3))
    assert isinstance(result, SliceResult)
    assert result.masks.shape == (3, *seg.plane.grid_shape) and result.best == 1
    assert result.mask.shape == seg.plane.grid_shape and result.best_logits.shape == (1, 256, 256)
    two_points = SlicePrompts(index=3, points_xy=[[1, 2], [3, 4]], point_labels=[1, 0])
    assert seg.segment(3, two_points).masks.shape[0] == 1
    box = SlicePrompts(index=3, box_xyxy=[1, 2, 8, 9])
    assert seg.segment(3, box).masks.shape[0] == 1
    assert seg.segment(3, box, multimask=True).masks.shape[0] == 3
    mask = SlicePrompts(index=3, mask=np.ones(seg.plane.grid_shape, bool))
    seg.segment(3, mask)
    assert [c["multimask"] for c in fake.calls] == [True, False, False, True, False]
    assert fake.calls[-1]["mask_input"] and fake.low_res_inputs == [seg.plane.image_shape]
    assert sum(fake.encoded.values()) == 1  # five prompts, one slice, one encode
    timing = seg.timing()
    assert timing["slices_encoded"] == 1 and timing["decode_ms_per_prompt"] is not None


def test_model_image_is_three_channel_uint8_of_the_square_pixel_image(stub_segmenter):
    seg = stub_segmenter(volume=awkward_volume(), orientation="coronal")
    image = seg.model_image(4)
    assert image.dtype == np.uint8 and image.shape == (*seg.plane.image_shape, 3)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_foreground_and_prefetch_never_encode_a_slice_twice(stub_segmenter):
    seg = stub_segmenter(delay=0.02)
    fake = seg.predictor
    future = seg.prefetch(range(30))
    threads = [
        threading.Thread(target=lambda order=order: [seg.embedding(i) for i in order])
        for order in (range(29, -1, -1), range(0, 30, 3))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    future.result(timeout=30)
    assert len(fake.encoded) == 30 and set(fake.encoded.values()) == {1}
    assert seg.stats.slices_encoded == 30 and seg.cache.stats.encodes == 30
    seg.close()


def test_cancel_prefetch_leaves_the_cache_consistent(stub_segmenter):
    seg = stub_segmenter(delay=0.03)
    fake = seg.predictor
    future = seg.prefetch(range(30))
    deadline = time.monotonic() + 10
    while len(seg.cache) < 2 and time.monotonic() < deadline:  # let it start, however busy
        time.sleep(0.005)
    seg.cancel_prefetch(wait=True)
    done = future.result(timeout=5)
    assert 0 < done < 30
    assert len(seg.cache) == done == sum(fake.encoded.values())
    assert all(seg.cache_key(i) in seg.cache for i in range(done))
    seg.encode_many(range(30))  # the rest, nothing twice
    assert len(fake.encoded) == 30 and set(fake.encoded.values()) == {1}
    seg.close()


def test_a_new_prefetch_supersedes_the_previous_one(stub_segmenter):
    seg = stub_segmenter(delay=0.03)
    first = seg.prefetch(range(30))
    time.sleep(0.05)
    second = seg.prefetch([29, 28])
    assert second.result(timeout=10) == 2
    assert first.cancelled() or first.result(timeout=5) < 30
    seg.close()


def test_encode_many_batches_and_skips_cached_slices(stub_segmenter):
    seg = stub_segmenter()
    seg.embedding(1)
    embeddings = seg.encode_many([0, 1, 2, 3, 4], batch_size=2)
    assert len(embeddings) == 5 and all(isinstance(e, ImageEmbedding) for e in embeddings)
    assert seg.predictor.batches == [1, 2, 2]  # slice 1 came from the cache
    seg.encode_many([4, 3])
    assert seg.stats.slices_encoded == 5 and seg.stats.embedding_hits == 3


def test_threads_prompting_one_slice_encode_it_once(stub_segmenter):
    seg = stub_segmenter(delay=0.05)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(seg.segment(7, _point_prompt(seg, 7))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and sum(seg.predictor.encoded.values()) == 1


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(litemedsam_checkpoint):
    from sam_core.zoo import load_model

    return load_model("litemedsam", litemedsam_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ct(shared_data):
    from SlicerSAM.volume import load_volume

    folder = shared_data / "ct-abdomen-3mm"
    names = json.loads((folder / "labels.json").read_text())
    values = {name: int(value) for value, name in names.items()}
    return load_volume(folder / "ct.nii.gz"), load_volume(folder / "labels.nii.gz"), values


@pytest.fixture(scope="module")
def ct_cache():
    """One cache shared by the CT tests, so a slice encoded by one is a hit for the next."""
    return EmbeddingCache()


def _largest_slice(plane, mask3d) -> int:
    return int(np.argmax([plane.grid(mask3d, i).sum() for i in range(plane.num_slices)]))


def _label_box(volume, mask3d, plane, index) -> Prompts:
    """A RAS box around a structure on one slice (what a user drags in a slice view)."""
    grid = plane.stack({index: plane.grid(mask3d, index)}, bool)
    kji = np.argwhere(grid)
    ras = volume.kji_to_ras(np.array([kji.min(axis=0), kji.max(axis=0)], dtype=float))
    return Prompts(box=Box(ras[0], ras[1]))


@pytest.mark.slow
@pytest.mark.shared_data
def test_liver_box_gives_the_liver_and_a_second_prompt_is_a_cache_hit(ct, model, ct_cache):
    volume, labels, values = ct
    seg = Segmenter(volume, model, cache=ct_cache)
    liver = np.asarray(labels.array) == values["liver"]
    index = _largest_slice(seg.plane, liver)
    sp = prompts_on_slice(_label_box(volume, liver, seg.plane, index), volume, seg.plane)
    assert sp.index == index
    result = seg.segment(index, sp)
    assert result.masks.shape == (1, *seg.plane.grid_shape)
    assert dice(result.mask, seg.plane.grid(liver, index)) > 0.8
    encoded = seg.stats.slices_encoded
    assert encoded <= 1  # 0 when another test already put this slice in the shared cache
    # a second prompt (one click in the liver) reuses the embedding: ambiguous, so 3 candidates
    centre = np.argwhere(seg.plane.stack({index: seg.plane.grid(liver, index)}, bool)).mean(0)
    click = Prompts(points=(Point(volume.kji_to_ras(np.round(centre))),))
    second = seg.segment_prompts(click)
    assert second.index == index and second.masks.shape[0] == 3
    assert seg.stats.slices_encoded == encoded and seg.stats.embedding_hits >= 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_mask_features_tell_one_tissue_from_another(ct, model, ct_cache):
    """The encoder's mean vector under the liver on one slice points the liver's way on the next
    slice too, and away from the vertebra beside it (what StopRules.max_feature_drop uses)."""
    volume, labels, values = ct
    seg = Segmenter(volume, model, cache=ct_cache)
    array = np.asarray(labels.array)
    liver, bone = array == values["liver"], array == values["vertebrae_L1"]
    index = _largest_slice(seg.plane, bone)
    this, below = seg.plane.grid(liver, index), seg.plane.grid(liver, index - 1)
    v, cells = seg.mask_features(index, this)
    assert v.shape == (256,) and v.dtype == np.float32
    # the liver's pixels, at (256 / 122 / 4)^2 embedding cells per pixel (axial, 3 mm pixels)
    assert cells == pytest.approx(this.sum() * (256 / 122 / 4) ** 2, rel=0.05)

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    same = cosine(v, seg.mask_features(index - 1, below)[0])
    other = cosine(v, seg.mask_features(index, seg.plane.grid(bone, index))[0])
    assert same > 0.9 and other < same - 0.2, (same, other)
    assert seg.mask_features(index, np.zeros(seg.plane.grid_shape, bool)) is None
    with pytest.raises(PromptError, match="slice grid"):
        seg.mask_features(index, np.ones((3, 4), bool))


@pytest.mark.slow
@pytest.mark.shared_data
def test_single_slice_prompt_encodes_one_slice_of_112(shared_data, model):
    from SlicerSAM.volume import load_volume

    volume = load_volume(shared_data / "ct-abdomen-3mm" / "ct-112-slices.nii.gz")
    seg = Segmenter(volume, model)
    assert seg.num_slices == 112 and seg.stats.slices_encoded == 0  # nothing encoded up front
    kji = np.array([20.0, 50.0, 40.0])
    first = seg.segment_prompts(Prompts(points=(Point(kji),), frame="kji"))
    assert first.index == 20
    assert seg.stats.slices_encoded == 1 and seg.cache.stats.encodes == 1 and len(seg.cache) == 1
    box = Prompts(box=Box((20, 30, 20), (20, 70, 60)), frame="kji")
    seg.segment_prompts(box)
    assert seg.stats.slices_encoded == 1 and seg.cache.stats.encodes == 1
    assert seg.cache.stats.hits >= 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_changing_intensity_or_orientation_encodes_again(ct, model, ct_cache):
    volume, _, _ = ct
    index = 24
    Segmenter(volume, model, cache=ct_cache).embedding(index)  # present from here on
    before = ct_cache.stats.encodes
    same = Segmenter(volume, model, cache=ct_cache)  # a new segmenter, same settings
    same.embedding(index)
    assert ct_cache.stats.encodes == before and same.stats.slices_encoded == 0
    lung = Segmenter(
        volume, model, cache=ct_cache, intensity=IntensityMapping(level=-600, width=1500)
    )
    lung.embedding(index)
    assert ct_cache.stats.encodes == before + 1
    sagittal = Segmenter(volume, model, cache=ct_cache, orientation="sagittal")
    sagittal.embedding(index)
    assert ct_cache.stats.encodes == before + 2
    assert sagittal.cache_key(index) != same.cache_key(index) != lung.cache_key(index)


@pytest.mark.slow
@pytest.mark.shared_data
def test_float16_cache_gives_the_masks_of_float32(ct, model):
    volume, labels, values = ct
    full = Segmenter(volume, model, cache=EmbeddingCache(half_precision=False))
    half = Segmenter(volume, model, cache=EmbeddingCache(half_precision=True))
    liver = np.asarray(labels.array) == values["liver"]
    index = _largest_slice(full.plane, liver)
    half.cache.put(half.cache_key(index), full.embedding(index))  # one encode for both
    prompts = []
    for name in ("liver", "stomach", "spleen", "aorta", "vertebrae_T12", "kidney_right"):
        mask = np.asarray(labels.array) == values[name]
        if full.plane.grid(mask, index).sum() >= 20:
            prompts.append(_label_box(volume, mask, full.plane, index))
    centre = volume.kji_to_ras(np.array([index, 50.0, 60.0]))
    prompts.append(Prompts(points=(Point(centre),)))  # a single click: 3 candidates
    assert len(prompts) >= 4
    for p in prompts:
        a = full.segment_prompts(p, index=index)
        b = half.segment_prompts(p, index=index)
        for c in range(a.masks.shape[0]):  # every candidate, not only the chosen one
            assert dice(a.masks[c], b.masks[c]) >= 0.995
    assert half.stats.slices_encoded == 0 and full.stats.slices_encoded == 1


@pytest.mark.slow
@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_a_ras_prompt_segments_the_structure_where_it_is(model, orientation):
    """On an oblique, anisotropic, flipped volume, a box + click placed in RAS around the
    off-centre marker segments the marker: its centroid in voxel space is the marker's."""
    volume = awkward_volume()
    labels = synthetic_labels(volume) == MARKER_LABEL
    low, high = bounding_box_ras(volume)
    centre = (low + high) / 2 + 0.25 * (high - low)  # synthetic.py's marker centre
    radii = 0.12 * (high - low)
    seg = Segmenter(
        volume, model, orientation=orientation, intensity=IntensityMapping(level=300, width=800)
    )
    prompts = Prompts(points=(Point(centre),), box=Box(centre - 1.2 * radii, centre + 1.2 * radii))
    slice_coord, _ = seg.plane.voxel_to_xy(volume.ras_to_kji(centre[None]))
    index = int(np.floor(slice_coord[0] + 0.5))
    result = seg.segment_prompts(prompts, index=index)
    reference = seg.plane.grid(labels, index)
    assert reference.sum() > 10
    assert dice(result.mask, reference) > 0.8
    got = np.argwhere(seg.plane.stack({index: result.mask}, bool)).mean(axis=0)
    expected = np.argwhere(seg.plane.stack({index: reference}, bool)).mean(axis=0)
    np.testing.assert_allclose(got, expected, atol=1.0)  # voxels (k, j, i)
