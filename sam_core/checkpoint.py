"""Reading and fetching checkpoint files safely: hashing, weights-only loading, verified downloads.

- `sha256_file` hashes a file in chunks.
- `load_state_dict_safely` loads with ``torch.load(weights_only=True)`` (no arbitrary pickles) and
  turns every failure into a `CheckpointError` that names the file and the model.
- `download` streams a URL into a temporary file beside the destination, verifies its size and
  sha256 and only then moves it into place with `os.replace` (atomic on one file system), so a
  half-written or corrupted file never sits under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from sam_core.errors import CheckpointError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ProgressCallback = Callable[[int, int, str], None]

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 60.0


def _no_progress(done: int, total: int, message: str) -> None:
    pass


def sha256_file(path: PathLike, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the file at ``path``, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _unwrap(obj: object) -> object:
    # Training scripts save {"model": state_dict, "optimizer": ..., "epoch": ...}; Lightning and
    # others use "state_dict". Unwrap repeatedly ({"model": {"state_dict": ...}} also occurs).
    for _ in range(3):
        if isinstance(obj, Mapping):
            for key in ("model", "state_dict"):
                inner = obj.get(key)
                if isinstance(inner, Mapping):
                    obj = inner
                    break
            else:
                return obj
    return obj


def load_state_dict_safely(path: PathLike, expected_arch_name: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint's state dict on the CPU without executing pickled code.

    Args:
        path: the checkpoint file (``torch.save`` output).
        expected_arch_name: the model the file should hold, used in error messages.

    Returns:
        ``{parameter name: tensor}``, unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}``
        and with a DataParallel ``"module."`` prefix removed when every key has it.

    Raises:
        CheckpointError: the file is missing, truncated, not a torch checkpoint, holds pickled
            objects other than tensors, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file {path} for model {expected_arch_name!r} does not exist."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused what the pickle would build: code or objects, never run. Torch's
        # message advises turning weights_only off; that advice is not passed on.
        found = re.search(r"(Unsupported global: [^\n]*|GLOBAL [\w.]+)", str(exc))
        raise CheckpointError(
            f"Checkpoint {path} for model {expected_arch_name!r} holds Python code or objects "
            "besides weights, which SlicerSAM does not load (it reads tensors only, so nothing "
            f"in the file ran){': ' + found.group(1) if found else ''}. Use the model's "
            "official weights file."
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"Cannot read checkpoint {path} for model {expected_arch_name!r} "
            f"({path.stat().st_size} bytes): the file is truncated, corrupted or not a PyTorch "
            f"weights file ({type(exc).__name__}: {first})"
        ) from exc
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"Checkpoint {path} holds no state dict for model {expected_arch_name!r} "
            f"(found {type(obj).__name__})."
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"Checkpoint {path} holds no tensors for model {expected_arch_name!r}: "
            f"keys {list(obj)[:5]}..."
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. a Windows file still open elsewhere
        logger.warning("Could not remove temporary file %s: %s", path, exc)


def download(
    url: str,
    dest: PathLike,
    sha256: str,
    size_bytes: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    name: Optional[str] = None,
    chunk: int = CHUNK_BYTES,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` (and ``size_bytes`` if given).

    An existing ``dest`` whose sha256 matches is reused without any request. Otherwise the body is
    streamed into a temporary file in ``dest``'s folder, checked, and moved into place atomically;
    on any failure (network error, early end of the body, size or checksum mismatch, an exception
    from ``progress`` or a KeyboardInterrupt) the temporary file is deleted and ``dest`` is left
    as it was.

    Args:
        url: http(s) URL of the file.
        dest: final path.
        sha256: expected hex sha256 (required: unverified downloads are refused).
        size_bytes: expected size; used for progress when the server sends no Content-Length.
        progress: ``progress(done_bytes, total_bytes, message)``; total is 0 when unknown.
        timeout: socket timeout in seconds (per blocking operation, not the whole transfer).
        name: the model name, for messages.

    Returns:
        ``dest`` as a Path.

    Raises:
        CheckpointError: naming the URL, the file and (on mismatch) expected and actual sha256.
    """
    dest = Path(dest)
    report = progress or _no_progress
    expected = (sha256 or "").strip().lower()
    what = f" for model {name!r}" if name else ""
    if len(expected) != 64:
        raise CheckpointError(
            f"Refusing to download {url} to {dest}{what}: no valid sha256 to verify it against."
        )

    if dest.is_file():
        actual = sha256_file(dest, chunk)
        if actual == expected:
            size = dest.stat().st_size
            report(size, size, f"{dest.name}: already downloaded and verified")
            return dest
        logger.warning(
            "%s exists but its sha256 %s is not the expected %s; downloading it again.",
            dest,
            actual,
            expected,
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "SlicerSAM"})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except (urllib.error.URLError, OSError) as exc:
                raise CheckpointError(
                    f"Cannot download {url} to {dest}{what}: {exc}. Check the network "
                    f"connection, or download the file yourself and pass its path."
                ) from exc
            with response:
                header = response.headers.get("Content-Length")
                content_length = int(header) if header and header.isdigit() else None
                total = content_length or size_bytes or 0
                report(0, total, f"Downloading {dest.name}")
                while True:
                    try:
                        block = response.read(chunk)
                    except (OSError, ValueError) as exc:  # includes socket timeouts, IncompleteRead
                        raise CheckpointError(
                            f"Download of {url} to {dest}{what} was interrupted after {done} "
                            f"bytes: {exc}"
                        ) from exc
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    report(done, total, f"Downloading {dest.name}")
            out.flush()
            os.fsync(out.fileno())

        # http.client returns an empty read when the server closes early, without raising:
        # compare with the announced and the expected sizes ourselves.
        if content_length is not None and done != content_length:
            raise CheckpointError(
                f"Download of {url} to {dest}{what} ended early: got {done} of "
                f"{content_length} bytes."
            )
        if size_bytes is not None and done != size_bytes:
            raise CheckpointError(
                f"Download of {url} to {dest}{what} has {done} bytes, expected {size_bytes}."
            )
        actual = digest.hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"Checksum mismatch for {url} (to {dest}){what}: expected sha256 {expected}, "
                f"got {actual}. The download was discarded."
            )
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    report(done, done, f"{dest.name}: downloaded and verified")
    logger.info("Downloaded %s to %s (%d bytes, sha256 verified)", url, dest, done)
    return dest
