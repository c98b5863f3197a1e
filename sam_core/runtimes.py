"""Image-encoder runtimes: the encoder on PyTorch, OpenVINO or onnxruntime, at a precision.

The encoder is where the time goes (a slice on a CPU: hundreds of ms; a prompt: tens), so it is
the part that may run outside PyTorch. The prompt encoder and mask decoder always run on PyTorch
(:class:`sam_core.predictor.SamPredictor`'s cached decoder path is faster on a CPU core than
either runtime's graph of it).

A :class:`Runtime` is (backend, precision):

* ``torch``: the model's own encoder; ``bf16`` / ``fp16`` run it under ``torch.autocast``.
* ``openvino``: the encoder's ONNX graph (:mod:`sam_core.onnx_export`) compiled by OpenVINO for
  the CPU with ``INFERENCE_PRECISION_HINT`` = f32 / bf16 / f16.
* ``onnxruntime``: the same graph on onnxruntime's CPU provider (fp32 only).

Which reduced precisions a machine has is :func:`hardware_precisions`: bf16 on CPUs with AMX or
AVX-512 BF16 and on Ampere+ GPUs, fp16 on older GPUs and MPS (and for OpenVINO on CPUs with
AVX-512 FP16 / AMX FP16). Whether a reduced precision is *used* is decided by comparing masks
with fp32 (``SlicerSAM.backends``), never by the flags alone. Every encoder here takes the
preprocessed batch (B, 3, S, S) float32 and returns the embeddings (B, 256, S/16, S/16) float32
on the model's device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

BACKENDS = ("torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
# the pip extra that installs each optional backend (pyproject.toml)
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_OV_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# CPU flags that decide precisions and kernels, reported with every benchmark figure
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
)


class RuntimeUnavailable(ValueError):
    """A backend or precision this machine cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class Runtime:
    """An encoder runtime: ``backend`` in BACKENDS, ``precision`` in PRECISIONS."""

    backend: str = "torch"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise RuntimeUnavailable(
                f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)} or auto"
            )
        if self.precision not in PRECISIONS:
            raise RuntimeUnavailable(
                f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)} or auto"
            )

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"

    @classmethod
    def parse(cls, text: str) -> Runtime:
        """``"openvino-bf16"`` -> Runtime("openvino", "bf16")."""
        backend, _, precision = str(text).partition("-")
        return cls(backend, precision or "fp32")


@functools.lru_cache(maxsize=1)
def cpu_description() -> Dict[str, object]:
    """{"model": the CPU's model name, "flags": the flags of CPU_FLAGS it reports, "cpus": the
    logical CPUs this process may use} (Linux /proc/cpuinfo; elsewhere platform's answer)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "cpus": cpus}


def cpu_text() -> str:
    """One line for benchmark output: model, logical CPUs, the relevant flags."""
    cpu = cpu_description()
    flags = ", ".join(cpu["flags"]) or "none of " + "/".join(CPU_FLAGS[:3])
    return f"{cpu['model']}; {cpu['cpus']} logical CPUs; flags: {flags}"


def installed(backend: str) -> bool:
    """Whether ``backend``'s library can be imported here (torch always)."""
    if backend == "torch":
        return True
    try:
        _metadata.version(_MODULES[backend])
    except (KeyError, _metadata.PackageNotFoundError):
        return False
    return True


def require(backend: str) -> None:
    """RuntimeUnavailable naming the pip extra when ``backend`` is not installed."""
    Runtime(backend)  # an unknown name is refused first
    if not installed(backend):
        raise RuntimeUnavailable(
            f"backend {backend!r} is not installed: pip install 'slicersam[{EXTRAS[backend]}]' "
            f"(or pip install {_MODULES[backend]}), or use --backend torch"
        )


def library_versions() -> Dict[str, str]:
    """{library: version} of torch and the installed optional backends (calibration keys)."""
    out = {"torch": torch.__version__}
    for backend, module in _MODULES.items():
        if installed(backend):
            out[module] = _metadata.version(module)
    return out


def hardware_precisions(backend: str, device: Union[str, torch.device] = "cpu") -> Tuple[str, ...]:
    """The precisions ``backend`` can run fast on ``device`` here, fp32 first.

    CPU: bf16 where the CPU has AMX-BF16 or AVX-512 BF16 (torch and OpenVINO), fp16 for OpenVINO
    where it has AVX-512 FP16 or AMX-FP16; onnxruntime: fp32. CUDA: bf16 on compute capability
    8.0+ else fp16; MPS: fp16. Other backends than torch run on the CPU only.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if backend != "torch":
            return ()
        from sam_core.device import autocast_dtype

        return ("fp32", "bf16" if autocast_dtype(device) == torch.bfloat16 else "fp16")
    if device.type == "mps":
        return ("fp32", "fp16") if backend == "torch" else ()
    flags = set(cpu_description()["flags"])
    out = ["fp32"]
    if backend in ("torch", "openvino") and flags & {"amx_bf16", "avx512_bf16"}:
        out.append("bf16")
    if backend == "openvino" and flags & {"avx512_fp16", "amx_fp16"}:
        out.append("fp16")
    return tuple(out)


def check_runtime(runtime: Runtime, device: Union[str, torch.device] = "cpu") -> None:
    """RuntimeUnavailable unless ``runtime`` is installed and can run on ``device``."""
    require(runtime.backend)
    device = torch.device(device)
    if runtime.backend != "torch" and device.type != "cpu":
        raise RuntimeUnavailable(
            f"backend {runtime.backend!r} runs on the CPU; on {device.type} use --backend torch"
        )
    have = hardware_precisions(runtime.backend, device)
    if runtime.precision not in have:
        raise RuntimeUnavailable(
            f"{runtime.name}: this {device.type} has no fast {runtime.precision} for "
            f"{runtime.backend} (it has {', '.join(have)}; CPU: {cpu_text()})"
        )


# -------------------------------------------------------------------------------- encoders
class TorchEncoder:
    """The model's own encoder; reduced precisions under ``torch.autocast``."""

    def __init__(self, sam, precision: str = "fp32") -> None:
        self.module = sam.image_encoder
        self.device = next(sam.parameters()).device
        self.runtime = Runtime("torch", precision)
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        autocast = (
            contextlib.nullcontext()
            if self._dtype is None
            else torch.autocast(device_type=self.device.type, dtype=self._dtype)
        )
        with torch.inference_mode(), autocast:
            return self.module(batch.to(self.device)).to(torch.float32)


class OnnxRuntimeEncoder:
    """The encoder's ONNX graph on onnxruntime's CPU provider (fp32)."""

    def __init__(self, onnx_path: Union[str, Path], threads: Optional[int] = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.runtime = Runtime("onnxruntime", "fp32")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"image": x})[0])


class OpenVinoEncoder:
    """The encoder's ONNX graph compiled by OpenVINO for the CPU at ``precision``."""

    def __init__(
        self, onnx_path: Union[str, Path], precision: str = "fp32", threads: Optional[int] = None
    ) -> None:
        import openvino

        config = {"INFERENCE_PRECISION_HINT": _OV_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = openvino.Core().compile_model(str(onnx_path), "CPU", config)
        self.runtime = Runtime("openvino", precision)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        # a fresh infer request per call: callers may encode from several threads
        out = self.compiled.create_infer_request().infer({0: x})
        return torch.from_numpy(next(iter(out.values())).copy())


Encoder = Callable[[torch.Tensor], torch.Tensor]


def load_encoder(
    sam, runtime: Runtime, onnx_path: Optional[Union[str, Path]] = None, threads=None
) -> Encoder:
    """An encoder callable for ``runtime``; OpenVINO and onnxruntime need ``onnx_path`` (the
    encoder.onnx of :func:`sam_core.onnx_export.export_encoder` for this very model)."""
    require(runtime.backend)
    if runtime.backend == "torch":
        return TorchEncoder(sam, runtime.precision)
    if onnx_path is None:
        raise RuntimeUnavailable(f"{runtime.name} needs the model's encoder.onnx")
    if runtime.backend == "onnxruntime":
        if runtime.precision != "fp32":
            raise RuntimeUnavailable(f"onnxruntime runs fp32 here, not {runtime.precision}")
        return OnnxRuntimeEncoder(onnx_path, threads)
    return OpenVinoEncoder(onnx_path, runtime.precision, threads)
