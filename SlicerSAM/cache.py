"""A memory-bounded, thread-safe LRU cache of slice embeddings, with an optional disk tier.

Encoding a slice is the expensive step (the image encoder); answering a prompt from a cached
embedding is cheap. Entries are keyed by everything that determines the embedding
(:class:`CacheKey`): the volume's content and geometry digest, the slicing orientation and index,
the intensity mapping, the model and the checkpoint's sha256. A change of any of them is a miss;
a stale embedding is never reused.

Memory: embeddings are held on the CPU (the budget is host memory; GPU memory is left to the
model) and, with ``half_precision`` (default), as float16: LiteMedSAM's (1, 256, 64, 64) embedding
is 2 MiB instead of 4 MiB. ``get`` returns float32 on the requested device. The masks differ from
float32 embeddings by far less than a voxel in practice (tested: Dice >= 0.995).

Disk (``disk_dir``, or ``persistent=True`` for the per-user default ``$SLICERSAM_CACHE`` or
``~/.cache/slicersam/embeddings``): one file per key, named by the sha256 of the key, written
atomically (temporary file + rename) with ``torch.save`` of plain tensors and strings, read with
``torch.load(weights_only=True)`` (no pickle code execution). A file whose stored key differs from
the requested one, whose tensor checksum fails, or which cannot be read (truncated, corrupt) is
deleted and counted as a miss: it is never trusted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

# Bump when the on-disk layout changes: old files then no longer match (their names differ).
DISK_FORMAT = 1


def default_cache_dir() -> Path:
    """Per-user embedding folder: ``$SLICERSAM_CACHE`` or ``~/.cache/slicersam/embeddings``."""
    env = os.environ.get("SLICERSAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slicersam" / "embeddings"


@dataclass(frozen=True)
class CacheKey:
    """Everything an embedding depends on. Any field change is a different embedding."""

    volume_digest: str  # Volume.digest(): array bytes, dtype, shape and ijk_to_ras
    orientation: str  # "axial" | "coronal" | "sagittal"
    axis: int  # array axis held fixed by the plane
    index: int  # slice index along that axis
    intensity: str  # IntensityMapping.signature()
    model: str  # model name ("litemedsam", ...)
    checkpoint_sha256: str  # weights identity
    # the encoder's precision (sam_core.runtimes): fp32 runtimes agree to ~1e-6 and share
    # embeddings; a reduced precision gives other embeddings
    precision: str = "fp32"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 hex of the key (the disk file name)."""
        fields = self.as_dict()
        if fields["precision"] == "fp32":
            del fields["precision"]  # the digest of keys made before precisions existed
        text = json.dumps({"format": DISK_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache (a snapshot; ``EmbeddingCache.stats`` returns a fresh one)."""

    hits: int = 0  # get() answered (memory or disk)
    misses: int = 0  # get() found nothing usable
    encodes: int = 0  # embeddings computed by users of the cache (Segmenter counts them)
    evictions: int = 0  # entries dropped from memory to respect the budget
    bytes: int = 0  # memory held by cached features now
    entries: int = 0  # entries in memory now
    disk_hits: int = 0  # hits served from disk (included in hits)
    disk_writes: int = 0
    disk_rejected: int = 0  # disk files deleted as corrupt / mismatched


def _tensor_checksum(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    # view as bytes: works for float16/float32 alike without numpy dtype support questions
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def _embedding_class():
    from sam_core.predictor import ImageEmbedding

    return ImageEmbedding


class EmbeddingCache:
    """Thread-safe LRU of ``ImageEmbedding`` bounded by ``budget_mb`` of memory.

    Args:
        budget_mb: memory budget for cached features (MiB). An entry larger than the whole budget
            is not kept in memory (only on disk when enabled).
        disk_dir: folder of the disk tier, or None (no disk unless ``persistent``).
        half_precision: store features as float16 (half the memory; float32 again on get).
        persistent: use :func:`default_cache_dir` when ``disk_dir`` is None.
    """

    def __init__(
        self,
        budget_mb: float = 512,
        disk_dir: Union[str, Path, None] = None,
        half_precision: bool = True,
        persistent: bool = False,
    ):
        if budget_mb < 0:
            raise ValueError(f"budget_mb must be >= 0, got {budget_mb}")
        self.budget_bytes = int(budget_mb * 2**20)
        self.half_precision = bool(half_precision)
        if disk_dir is None and persistent:
            disk_dir = default_cache_dir()
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()  # key -> (emb, nbytes)
        self._bytes = 0
        self._counts = collections.Counter()

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._counts["hits"],
                misses=self._counts["misses"],
                encodes=self._counts["encodes"],
                evictions=self._counts["evictions"],
                bytes=self._bytes,
                entries=len(self._entries),
                disk_hits=self._counts["disk_hits"],
                disk_writes=self._counts["disk_writes"],
                disk_rejected=self._counts["disk_rejected"],
            )

    def count_encode(self, n: int = 1) -> None:
        """Record ``n`` embeddings computed because of a miss (called by the Segmenter)."""
        with self._lock:
            self._counts["encodes"] += n

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        """In memory or on disk; touches neither the counters nor the LRU order."""
        with self._lock:
            if key in self._entries:
                return True
        return self._disk_path(key) is not None and self._disk_path(key).is_file()

    def get(self, key: CacheKey, device: Union[str, torch.device, None] = None):
        """The cached embedding (features float32 on ``device``, default CPU) or None."""
        with self._lock:
            item = self._entries.get(key)
            if item is not None:
                self._entries.move_to_end(key)
                self._counts["hits"] += 1
                return self._restore(item[0], device)
        stored = self._disk_read(key)  # outside the lock: file I/O must not block other threads
        with self._lock:
            if stored is None:
                self._counts["misses"] += 1
                return None
            self._counts["hits"] += 1
            self._counts["disk_hits"] += 1
            self._insert(key, stored)
        return self._restore(stored, device)

    def put(self, key: CacheKey, embedding, device: Union[str, torch.device, None] = None):
        """Store ``embedding``; returns it as later ``get`` calls will (float16-rounded when
        ``half_precision``), on ``device`` (default: the device of the given features), so a
        caller can use exactly what the cache holds."""
        if not isinstance(key, CacheKey):
            raise TypeError(f"key must be a CacheKey, got {type(key).__name__}")
        out_device = embedding.features.device if device is None else device
        stored = self._compress(embedding)
        with self._lock:
            self._insert(key, stored)
        if self.disk_dir is not None:
            self._disk_write(key, stored)
        return self._restore(stored, out_device)

    def clear(self, disk: bool = False) -> None:
        """Drop every entry from memory (and the disk files too when ``disk``)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        if disk and self.disk_dir is not None and self.disk_dir.is_dir():
            for f in self.disk_dir.glob("*.pt"):
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ memory tier
    def _compress(self, embedding):
        dtype = torch.float16 if self.half_precision else torch.float32
        features = embedding.features.detach().to(dtype=dtype).to("cpu").contiguous()
        return dataclasses.replace(embedding, features=features)

    @staticmethod
    def _restore(stored, device):
        features = stored.features.to(dtype=torch.float32)
        if device is not None:
            features = features.to(device)
        if features is stored.features:  # float32 on CPU already: never hand out our own tensor
            features = features.clone()
        return dataclasses.replace(stored, features=features)

    def _insert(self, key: CacheKey, stored) -> None:
        """Add under the lock, then evict least recently used entries down to the budget."""
        nbytes = stored.features.numel() * stored.features.element_size()
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (stored, nbytes)
        self._bytes += nbytes
        while self._bytes > self.budget_bytes and self._entries:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
            self._counts["evictions"] += 1

    # ------------------------------------------------------------------ disk tier
    def _disk_path(self, key: CacheKey) -> Optional[Path]:
        if self.disk_dir is None:
            return None
        return self.disk_dir / f"{key.digest()}.pt"

    def _disk_write(self, key: CacheKey, stored) -> None:
        path = self._disk_path(key)
        payload = {
            "format": DISK_FORMAT,
            "key": key.as_dict(),
            "features": stored.features,
            "original_size": [int(v) for v in stored.original_size],
            "input_size": [int(v) for v in stored.input_size],
            "checksum": _tensor_checksum(stored.features),
        }
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                # no fsync: a file cut short by a crash fails its checksum and is discarded
                torch.save(payload, fh)
            os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
            tmp = None
            with self._lock:
                self._counts["disk_writes"] += 1
        except OSError as exc:  # a full or read-only disk must not break segmentation
            logger.warning("embedding cache: cannot write %s: %s", path, exc)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _reject(self, path: Path, why: str) -> None:
        logger.warning("embedding cache: discarding %s (%s)", path, why)
        try:
            path.unlink()
        except OSError:
            pass
        with self._lock:
            self._counts["disk_rejected"] += 1

    def _disk_read(self, key: CacheKey):
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / corrupt / not a torch file: never trusted
            self._reject(path, f"unreadable: {type(exc).__name__}: {exc}")
            return None
        try:
            if not isinstance(payload, dict) or payload.get("format") != DISK_FORMAT:
                raise ValueError("unknown format")
            stored = payload.get("key")
            if isinstance(stored, dict):
                # files written before keys had a precision hold fp32 embeddings
                stored = {"precision": "fp32", **stored}
            if stored != key.as_dict():
                raise ValueError("stored key differs from the requested key")
            features = payload["features"]
            if not isinstance(features, torch.Tensor):
                raise ValueError("features are not a tensor")
            if _tensor_checksum(features) != payload.get("checksum"):
                raise ValueError("tensor checksum mismatch")
            original_size = tuple(int(v) for v in payload["original_size"])
            input_size = tuple(int(v) for v in payload["input_size"])
            if len(original_size) != 2 or len(input_size) != 2:
                raise ValueError("bad sizes")
        except (KeyError, TypeError, ValueError) as exc:
            self._reject(path, str(exc))
            return None
        dtype = torch.float16 if self.half_precision else torch.float32
        return _embedding_class()(
            features=features.to(dtype).contiguous(),
            original_size=original_size,
            input_size=input_size,
        )
