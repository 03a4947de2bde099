"""The one place that names the compute device.

Every tensor the trainer builds for the model, a loss or a collective goes through
:func:`to_device` (or is created with ``device=compute_device()``). On GPUs that is
``cuda:LOCAL_RANK``; under the CPU backend it is the host (``cpu:0`` in strict device mode,
see :mod:`megatron_pr2.platform.strict_device`).
"""

from __future__ import annotations

import os

import torch

from megatron_pr2.platform.strict_device import (
    STRICT_COMPUTE_DEVICE,
    strict_device_enabled,
)

_device: torch.device | None = None


def set_compute_device(device: str) -> torch.device:
    """Fix the compute device for this process (``"cpu"`` or ``"cuda"``); returns it."""
    global _device
    if device == "cuda":
        _device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(_device)
    elif device == "cpu":
        _device = torch.device("cpu")
    else:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    return _device


def compute_device() -> torch.device:
    """The device model inputs, losses and collectives live on."""
    if _device is None:
        raise RuntimeError("the compute device is not set: call "
                           "megatron_pr2.platform.init_process_group first")
    if _device.type == "cpu" and strict_device_enabled():
        return STRICT_COMPUTE_DEVICE
    return _device


def to_device(tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
    """``tensor`` on the compute device (a no-op when it is already there)."""
    return tensor.to(compute_device(), non_blocking=non_blocking)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A detached host copy of ``tensor``: pinned memory filled asynchronously from a GPU (move
    it back with :func:`to_device` before use), a plain copy on the host."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return out.copy_(tensor, non_blocking=True)
    return tensor.cpu().clone()


def module_to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer of ``module`` to the compute device; returns it.

    Megatron-Core allocates its own layers on the current CUDA device, but parameters that
    project modules create (norms, the PR2 predictor) start on the host until moved here.
    """
    return module.to(compute_device())
