"""The one place that names the compute device.

Every tensor the trainer builds for the model, a loss or a collective goes through
:func:`to_device` (or is created with ``device=compute_device()``). On GPUs that is
``cuda:LOCAL_RANK``; under the CPU backend it is the host.
"""

from __future__ import annotations

import os

import torch

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
    return _device


def to_device(tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
    """``tensor`` on the compute device (a no-op when it is already there)."""
    return tensor.to(compute_device(), non_blocking=non_blocking)
