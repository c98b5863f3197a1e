"""sam_core.device: every branch of device selection and autocast precision, with the accelerator
probes monkeypatched (so they run on any machine)."""

from __future__ import annotations

import pytest
import torch

from sam_core.device import autocast_dtype, available_devices, select_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has `cuda` CUDA devices and MPS or not."""

    def configure(cuda: int = 0, mps: bool = False, capability=(8, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return configure


def test_auto_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=1, mps=True)
    assert select_device("auto") == torch.device("cuda")
    machine(cuda=0, mps=True)
    assert select_device("auto") == torch.device("mps")
    machine(cuda=0, mps=False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device(None) == torch.device("cpu")


def test_explicit_devices_when_available(machine):
    machine(cuda=2, mps=True)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cuda") == torch.device("cuda")
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert select_device(" CUDA:0 ") == torch.device("cuda", 0)
    assert select_device("mps") == torch.device("mps")
    assert select_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_unavailable_cuda_names_the_devices_that_exist(machine):
    machine(cuda=0, mps=False)
    with pytest.raises(ValueError, match=r"'cuda' is not available.*available devices: cpu"):
        select_device("cuda")


def test_cuda_index_out_of_range_raises(machine):
    machine(cuda=1)
    with pytest.raises(ValueError, match=r"cuda:1.*cuda:0, cpu"):
        select_device("cuda:1")


def test_unavailable_mps_raises(machine):
    machine(cuda=1, mps=False)
    with pytest.raises(ValueError, match=r"'mps' is not available.*cuda:0, cpu"):
        select_device("mps")


def test_unknown_device_raises(machine):
    machine()
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        select_device("tpu")
    with pytest.raises(ValueError, match="Unsupported device type 'meta'"):
        select_device("meta")
    with pytest.raises(ValueError, match="string or torch.device"):
        select_device(3)


def test_available_devices_lists_everything(machine):
    machine(cuda=2, mps=True)
    assert available_devices() == ["cuda:0", "cuda:1", "mps", "cpu"]
    machine()
    assert available_devices() == ["cpu"]


def test_autocast_dtype_per_device(machine):
    machine(cuda=1, capability=(9, 0))
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    machine(cuda=1, capability=(7, 5))  # Turing: no native bf16
    assert autocast_dtype("cuda:0") is torch.float16
    assert autocast_dtype("mps") is torch.float16
    assert autocast_dtype("cpu") is None
    assert autocast_dtype(torch.device("cpu")) is None
