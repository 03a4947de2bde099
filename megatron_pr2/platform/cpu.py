"""CPU backend: lets Megatron-Core run on a machine without CUDA.

Megatron-Core assumes CUDA in a handful of places (device placement through
``torch.cuda.current_device()``, the CUDA RNG tracker, ``torch.cuda.synchronize``,
``device="cuda"`` in factory calls, TransformerEngine's GEMM in the router, ``Tensor.type()``
string checks for ``torch.cuda.*Tensor`` in the optimizers and gradient clipping, the alltoall
dispatcher's device-to-host stream and event, and its split sizes moved to the host).
:func:`enable_cpu_backend` adapts exactly those places and nothing else. It must be
called explicitly, and it refuses to run on a machine where CUDA is available, so it
can never change the behaviour of a GPU run. Every adaptation is recorded and
:func:`disable_cpu_backend` undoes them all (:func:`cpu_backend` scopes them to a block).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_DEVICE_MODE: TorchFunctionMode | None = None
_MISSING = object()
_PATCHES: list[tuple[object, str, object]] = []  # (owner, attribute, original value)
_BEFORE_DISABLE: list = []  # callables disable_cpu_backend runs first, last registered first


class CpuBackendError(RuntimeError):
    """Raised when the CPU backend is asked for on a machine where it must not run."""


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Maps ``device="cuda"`` (or ``torch.device("cuda")``) in tensor factory calls to CPU,
    ``Tensor.cuda()`` to the tensor itself, and ``Tensor.type()`` (no argument) to the CUDA type
    name of the host tensor (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``), which is what
    Megatron's optimizers and ``clip_grads`` check."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # e.g. tied embeddings across pipeline stages
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Named RNG states on the CPU default generator, the CPU twin of Megatron's CUDA tracker.

    ``fork(name)`` swaps the default CPU generator to the named state for the duration of the
    block and saves the advanced state back, as Megatron's tracker does for the CUDA generator.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _patch(owner, name: str, value) -> None:
    """Set ``owner.name = value``, remembering the original for :func:`disable_cpu_backend`."""
    _PATCHES.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    _patch(mp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    _patch(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


def _patch_torch_cuda() -> None:
    _patch(torch.cuda, "current_device", lambda: "cpu")
    _patch(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    _patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(torch.cuda, "get_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state",
           lambda state, *args, **kwargs: torch.set_rng_state(state))


class _HostStream:
    """A stand-in for ``torch.cuda.Stream`` on the host, where every operation is synchronous."""

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def wait_stream(self, stream) -> None:
        del stream

    def record_event(self, event=None):
        return event or _HostEvent()

    def synchronize(self) -> None:
        return None


class _HostEvent:
    """A stand-in for ``torch.cuda.Event``: host work has always completed."""

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def record(self, stream=None) -> None:
        del stream

    def synchronize(self) -> None:
        return None

    def wait(self, stream=None) -> None:
        del stream


def _host_splits(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for host tensors (the original skips non-CUDA
    ones, leaving the alltoall dispatcher's split sizes as tensors where it expects numpy)."""
    del record_stream
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_torch_cuda_streams() -> None:
    # classes, so type annotations such as `torch.cuda.Stream | None` still work
    _patch(torch.cuda, "Stream", _HostStream)
    _patch(torch.cuda, "Event", _HostEvent)
    _patch(torch.cuda, "current_stream", lambda *args, **kwargs: _HostStream())
    _patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Without TransformerEngine this name is never bound in 0.16.1 (NameError on use).
    _patch(moe_utils, "te_general_gemm", None)
    _patch(moe_utils, "maybe_move_tensor_to_cpu", _host_splits)
    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", _host_splits)
    _patch(mp_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(mp_random, "_set_cuda_rng_state",
           lambda state, *args, **kwargs: torch.set_rng_state(state))


def _patch_recompute_backward() -> None:
    """Re-enter the device mode in activation-recompute backward (autograd runs it elsewhere)."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    original = CheckpointFunction.backward

    def backward(ctx, *grads):
        with _CudaToCpuDeviceMode():
            return original(ctx, *grads)

    _patch(CheckpointFunction, "backward", staticmethod(backward))


def enable_cpu_backend() -> None:
    """Make Megatron-Core run on CPU with gloo. Idempotent; refuses when CUDA is available.

    Raises:
        CpuBackendError: if CUDA is available (the GPU path must stay native).
    """
    global _ENABLED, _DEVICE_MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise CpuBackendError(
            "enable_cpu_backend() was called on a machine with CUDA; the CPU backend only "
            "adapts Megatron-Core for CPU-only machines. Use --device cuda."
        )
    _patch_torch_cuda()
    _patch_torch_cuda_streams()
    _patch_megatron()
    _patch_recompute_backward()
    _install_rng_tracker()
    _DEVICE_MODE = _CudaToCpuDeviceMode()
    _DEVICE_MODE.__enter__()
    _ENABLED = True
    logger.info("Megatron-Core CPU backend enabled (gloo, CPU RNG tracker).")


def disable_cpu_backend() -> None:
    """Undo :func:`enable_cpu_backend`: leave the device mode, restore every patched name.

    Idempotent. The device mode must be the innermost torch-function mode still active.
    """
    global _ENABLED, _DEVICE_MODE
    if not _ENABLED:
        return
    while _BEFORE_DISABLE:  # modes stacked above the device mode (strict device mode)
        _BEFORE_DISABLE.pop()()
    _DEVICE_MODE.__exit__(None, None, None)
    _DEVICE_MODE = None
    for owner, name, original in reversed(_PATCHES):
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _PATCHES.clear()
    _ENABLED = False
    logger.info("Megatron-Core CPU backend disabled.")


@contextlib.contextmanager
def cpu_backend():
    """The CPU backend for the duration of a block (left on if it was on before)."""
    was_enabled = _ENABLED
    enable_cpu_backend()
    try:
        yield
    finally:
        if not was_enabled:
            disable_cpu_backend()


def run_before_disable(callback) -> None:
    """Have :func:`disable_cpu_backend` call ``callback`` before it leaves the device mode
    (a mode stacked above it, such as strict device mode); once per registration."""
    _BEFORE_DISABLE.append(callback)


def cpu_backend_enabled() -> bool:
    """Whether :func:`enable_cpu_backend` has run in this process."""
    return _ENABLED
