"""The one place that decides which torch device and autocast precision SlicerSAM uses.

`select_device("auto")` prefers CUDA, then Apple MPS, then the CPU; an explicit device that is not
available raises `ValueError` naming the devices that are. `autocast_dtype(device)` says which
reduced precision to autocast to on that device (`None`: run in float32, as on the CPU).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

DeviceLike = Union[str, torch.device, None]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Names of the devices this machine can run on, e.g. ``["cuda:0", "mps", "cpu"]``."""
    names: list[str] = []
    if torch.cuda.is_available():
        names.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def _unavailable(requested: str) -> ValueError:
    return ValueError(
        f"Device {requested!r} is not available on this machine; "
        f"available devices: {', '.join(available_devices())} (or 'auto')."
    )


def select_device(device: DeviceLike = "auto") -> torch.device:
    """Return the torch device for ``device``.

    Args:
        device: ``"auto"`` (or None): CUDA if available, else MPS if available, else CPU;
            ``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"``, ``"mps"``, or a
            ``torch.device``.

    Raises:
        ValueError: the device is unknown or not available here; the message lists those that are.
    """
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device.strip().lower()
    else:
        raise ValueError(f"device must be a string or torch.device, not {type(device).__name__}")

    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' "
            f"(available here: {', '.join(available_devices())})."
        ) from exc

    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise _unavailable(text)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise _unavailable(text)
        return parsed
    if parsed.type == "mps":
        if not _mps_available():
            raise _unavailable(text)
        return torch.device("mps")
    raise ValueError(
        f"Unsupported device type {parsed.type!r} in {device!r}: use 'auto', 'cpu', 'cuda', "
        f"'cuda:N' or 'mps' (available here: {', '.join(available_devices())})."
    )


def autocast_dtype(device: DeviceLike) -> Optional[torch.dtype]:
    """The dtype to autocast to on ``device``, or None to run in float32.

    bfloat16 on CUDA GPUs with native bf16 (compute capability 8.0+, Ampere and newer: same range
    as float32, so no overflow in the ViT attention); float16 on older CUDA GPUs and on MPS; None on
    the CPU, where autocast brings little and changes results.
    """
    dev = device if isinstance(device, torch.device) else torch.device(str(device))
    if dev.type == "cuda":
        # Capability, not torch.cuda.is_bf16_supported(): the latter also reports emulated
        # (slow) bf16 on pre-Ampere GPUs.
        try:
            major, _minor = torch.cuda.get_device_capability(dev)
        except (RuntimeError, AssertionError, ValueError):
            return torch.float16
        return torch.bfloat16 if major >= 8 else torch.float16
    if dev.type == "mps":
        return torch.float16
    return None
