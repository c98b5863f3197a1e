"""EmbeddingCache: LRU under a budget, key sensitivity, float16, disk tier, corruption, threads."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from sam_core.predictor import ImageEmbedding
from SlicerSAM.cache import CacheKey, EmbeddingCache, default_cache_dir

FEATURES = (1, 256, 8, 8)  # small stand-in for (1, 256, 64, 64)
ENTRY_BYTES_F16 = 256 * 8 * 8 * 2


def _key(index=0, **changes) -> CacheKey:
    key = CacheKey(
        volume_digest="a" * 64,
        orientation="axial",
        axis=0,
        index=index,
        intensity="window:L40:W400",
        model="litemedsam",
        checkpoint_sha256="b" * 64,
    )
    return dataclasses.replace(key, **changes)


def _embedding(seed=0) -> ImageEmbedding:
    gen = torch.Generator().manual_seed(seed)
    return ImageEmbedding(torch.randn(FEATURES, generator=gen), (101, 122), (212, 256))


def test_lru_evicts_least_recently_used_under_a_tiny_budget():
    cache = EmbeddingCache(budget_mb=3 * ENTRY_BYTES_F16 / 2**20)  # room for exactly 3
    for i in range(3):
        cache.put(_key(i), _embedding(i))
    assert cache.get(_key(0)) is not None  # 0 is now the most recently used
    cache.put(_key(3), _embedding(3))  # evicts 1, the least recently used
    assert cache.get(_key(1)) is None
    assert all(cache.get(_key(i)) is not None for i in (0, 2, 3))
    stats = cache.stats
    assert stats.evictions == 1 and stats.entries == 3 and stats.bytes == 3 * ENTRY_BYTES_F16
    assert (stats.hits, stats.misses) == (4, 1)


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = EmbeddingCache(budget_mb=0.001)
    cache.put(_key(), _embedding())
    assert cache.get(_key()) is None and cache.stats.bytes == 0


@pytest.mark.parametrize(
    "change",
    [
        {"volume_digest": "c" * 64},
        {"orientation": "sagittal"},
        {"axis": 2},
        {"index": 1},
        {"intensity": "window:L-600:W1500"},
        {"model": "sam_vit_b"},
        {"checkpoint_sha256": "d" * 64},
    ],
)
def test_any_key_field_change_is_a_miss(tmp_path, change):
    cache = EmbeddingCache(disk_dir=tmp_path)
    cache.put(_key(), _embedding())
    assert cache.get(_key()) is not None
    other = _key(**change)
    assert other != _key() and other.digest() != _key().digest()
    assert cache.get(other) is None
    assert EmbeddingCache(disk_dir=tmp_path).get(other) is None  # nor from disk


def test_half_precision_halves_memory_and_returns_float32():
    emb = _embedding()
    half, full = EmbeddingCache(), EmbeddingCache(half_precision=False)
    stored = half.put(_key(), emb)
    full.put(_key(), emb)
    assert half.stats.bytes * 2 == full.stats.bytes
    got = half.get(_key())
    assert got.features.dtype == torch.float32
    assert torch.allclose(got.features, emb.features, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.features, stored.features)  # put returns what get will return
    assert torch.equal(full.get(_key()).features, emb.features)
    assert got.original_size == emb.original_size and got.input_size == emb.input_size
    # a caller modifying what it got cannot modify the cache
    full.get(_key()).features.zero_()
    assert torch.equal(full.get(_key()).features, emb.features)


def test_disk_round_trip_across_cache_instances(tmp_path):
    emb = _embedding(5)
    first = EmbeddingCache(disk_dir=tmp_path)
    first.put(_key(7), emb)
    files = list(tmp_path.glob("*.pt"))
    assert [f.stem for f in files] == [_key(7).digest()]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file
    second = EmbeddingCache(disk_dir=tmp_path)
    assert _key(7) in second
    got = second.get(_key(7))
    assert torch.equal(got.features, first.get(_key(7)).features)
    assert got.original_size == (101, 122) and got.input_size == (212, 256)
    assert second.stats.disk_hits == 1 and second.stats.entries == 1


def test_disk_file_written_before_keys_had_a_precision_is_still_an_fp32_hit(tmp_path):
    # files of earlier versions store their key without "precision" (their embeddings are fp32)
    EmbeddingCache(disk_dir=tmp_path).put(_key(3), _embedding(3))
    path = tmp_path / f"{_key(3).digest()}.pt"
    payload = torch.load(path, weights_only=True)
    del payload["key"]["precision"]
    torch.save(payload, path)
    cache = EmbeddingCache(disk_dir=tmp_path)
    assert cache.get(_key(3)) is not None
    assert cache.stats.disk_hits == 1 and cache.stats.disk_rejected == 0
    # a reduced precision never shares the fp32 file (its digest names another file)
    assert _key(3, precision="bf16").digest() != _key(3).digest()
    assert EmbeddingCache(disk_dir=tmp_path).get(_key(3, precision="bf16")) is None
    assert path.exists()


def test_default_disk_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICERSAM_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    cache = EmbeddingCache(persistent=True)
    cache.put(_key(), _embedding())
    assert len(list((tmp_path / "mine").glob("*.pt"))) == 1
    monkeypatch.delenv("SLICERSAM_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "slicersam", "embeddings")


def _corrupt_truncate(path, key):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_garbage(path, key):
    path.write_bytes(b"not a torch file at all")


def _corrupt_tensor(path, key):
    payload = torch.load(path, weights_only=True)
    payload["features"] = payload["features"] + 1  # checksum no longer matches
    torch.save(payload, path)


def _corrupt_wrong_key(path, key):
    # a file holding another key's embedding under this key's name
    other = EmbeddingCache(disk_dir=path.parent / "other")
    other.put(_key(99), _embedding(99))
    (path.parent / "other" / f"{_key(99).digest()}.pt").replace(path)


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_garbage, _corrupt_tensor, _corrupt_wrong_key]
)
def test_corrupt_or_mismatched_disk_file_is_a_miss_and_deleted(tmp_path, corrupt):
    EmbeddingCache(disk_dir=tmp_path).put(_key(), _embedding())
    path = tmp_path / f"{_key().digest()}.pt"
    corrupt(path, _key())
    cache = EmbeddingCache(disk_dir=tmp_path)
    assert cache.get(_key()) is None
    assert not path.exists()
    assert cache.stats.disk_rejected == 1 and cache.stats.misses == 1
    # recompute and store again: a clean file, trusted by the next instance
    cache.put(_key(), _embedding())
    assert EmbeddingCache(disk_dir=tmp_path).get(_key()) is not None


def test_concurrent_puts_and_gets_keep_the_cache_consistent():
    cache = EmbeddingCache(budget_mb=5 * ENTRY_BYTES_F16 / 2**20)
    embeddings = [_embedding(i) for i in range(12)]
    errors = []
    gets_per_thread = 300

    def work(seed):
        try:
            for n in range(gets_per_thread):
                i = (seed * 7 + n * 5) % 12
                got = cache.get(_key(i))
                if got is None:
                    cache.put(_key(i), embeddings[i])
                elif not torch.allclose(got.features, embeddings[i].features, atol=1e-2):
                    errors.append(f"wrong embedding for key {i}")
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats
    assert stats.hits + stats.misses == 6 * gets_per_thread
    assert stats.entries <= 5 and stats.bytes == stats.entries * ENTRY_BYTES_F16
    assert len(cache) == stats.entries


def test_encode_counter_and_key_validation():
    cache = EmbeddingCache()
    cache.count_encode()
    cache.count_encode(2)
    assert cache.stats.encodes == 3
    with pytest.raises(TypeError):
        cache.put(("not", "a", "key"), _embedding())
    with pytest.raises(ValueError):
        EmbeddingCache(budget_mb=-1)
