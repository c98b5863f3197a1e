"""Inference fast paths: switches, derived-weight caches, thread settings, optional compile.

The networks in sam_core have two forward paths where speed matters on the CPU:

* the *plain* path, written like the official code (NCHW tensors, the original module order); it
  is what training uses and what the oracle tests pin;
* a *fast* path, used in eval mode, that computes the same function with fewer memory passes:
  channels-last tokens, batch norms folded into the convolutions, attention biases gathered once,
  fused attention, row bands in the full-resolution stage, and for the mask decoder the per-image
  work done once per embedding (see :class:`sam_core.mask_decoder.DecoderImageCache`).

Every fast path is checked against the plain one in ``Testing/Python/test_speed_paths.py``.
:func:`set_fast_paths` switches them for a model (benchmarks and tests use it to get the plain
baseline). Derived tensors (folded weights, gathered biases) are cached per module and
invalidated when a source parameter changes (new tensor, in-place update, device or dtype).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

FAST_PATH_ATTR = "fast_path"


def set_fast_paths(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the eval-mode fast paths of every sub-module of ``model`` on or off (in place)."""
    for module in model.modules():
        if hasattr(type(module), FAST_PATH_ATTR):
            setattr(module, FAST_PATH_ATTR, bool(enabled))
    return model


def use_fast_path(module: nn.Module) -> bool:
    """True when ``module`` should run its fast path: eval mode, autograd off (``no_grad`` or
    ``inference_mode``: the derived weights are detached), and not switched off."""
    return (
        not module.training
        and not torch.is_grad_enabled()
        and bool(getattr(module, FAST_PATH_ATTR, True))
    )


def _tensor_key(t: torch.Tensor) -> Optional[Tuple]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: never cache them
        return None
    return (t.data_ptr(), version, t.device, t.dtype, tuple(t.shape))


class DerivedCache:
    """Tensors derived from parameters (folded weights ...), rebuilt when a source changes.

    A plain attribute, not a buffer: nothing here is part of the state dict.
    """

    def __init__(self) -> None:
        self._entries: Dict[str, Tuple[Tuple, object]] = {}

    def get(self, name: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
        """``build()``'s value, cached under ``name`` until a tensor in ``sources`` changes."""
        keys = [_tensor_key(t) for t in sources]
        if any(k is None for k in keys):
            return build()
        key = tuple(keys)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        # Plain (non-inference) tensors even when first built under inference_mode, so that
        # they stay usable anywhere autograd is off.
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._entries[name] = (key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place; ``x`` must be a tensor the caller owns."""
    return torch.ops.aten.gelu_(x)


def env_num_threads() -> Optional[int]:
    """``$SLICERSAM_NUM_THREADS`` as a positive int, or None (unset or invalid)."""
    env = os.environ.get("SLICERSAM_NUM_THREADS")
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        logger.warning("ignoring SLICERSAM_NUM_THREADS=%r (not an integer)", env)
        return None
    return value if value >= 1 else None


@contextlib.contextmanager
def intra_op_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads in the *calling* thread (None: as is).

    With torch's OpenMP backend the count is per calling thread, so a prefetch thread encoding
    with all cores is not affected by a decode limited to one. Restored on exit.
    """
    if num_threads is None or num_threads < 1:
        yield
        return
    previous = torch.get_num_threads()
    if previous == num_threads:
        yield
        return
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
