"""Strict device mode: makes device placement checkable on a CPU-only machine.

Under the CPU backend every "cuda" request lands on the host, so a tensor the trainer forgot to
move to the accelerator is invisible. Strict mode (explicitly enabled, CPU backend only) gives
the compute device its own name, ``cpu:0`` (what :func:`~megatron_pr2.platform.compute_device`
returns), and tags tensors by where they would live on a GPU machine:

- *device*: made with ``device=compute_device()`` or ``device="cuda"``, moved with
  ``to_device``/``.to(compute_device())``/``.cuda()``, or computed from a device tensor;
- *host*: made by a factory call without a device (``torch.tensor(...)``, ``torch.zeros(...)``),
  moved with ``.cpu()``/``to_host``, or computed from host tensors only;
- untagged: anything else (e.g. ``device=x.device``, Megatron's own ``current_device()``
  buffers, autograd results); never refused.

Refused, with an error naming the call and the tensor: an operation mixing a device tensor with
a non-scalar host tensor (CUDA refuses it too; copies and indexing excepted), a host tensor in a
collective on any group but the gloo host groups, and a model input that is not a device tensor
(:func:`guard_model_inputs`).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from megatron_pr2.platform.cpu import cpu_backend_enabled, run_before_disable

logger = logging.getLogger(__name__)

STRICT_COMPUTE_DEVICE = torch.device("cpu", 0)
"""The compute device's name under strict mode (a host device with an index)."""

DEVICE, HOST = "device", "host"

_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "reduce_scatter", "all_to_all_single", "all_to_all",
                "reduce", "send", "recv", "isend", "irecv")

_MODE: _StrictDeviceMode | None = None
_ORIGINAL_COLLECTIVES: dict[str, object] = {}
_TAGS = WeakIdKeyDictionary()


class StrictDeviceError(RuntimeError):
    """A host tensor reached the model, a device computation or a collective in strict mode."""


def strict_device_enabled() -> bool:
    """Whether :func:`enable_strict_device_mode` is in effect in this process."""
    return _MODE is not None


def tag_of(tensor: torch.Tensor) -> str | None:
    """``"device"``, ``"host"`` or None (untagged) for a tensor under strict mode."""
    return _TAGS.get(tensor)


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


# --------------------------------------------------------------------------------- tagging
def _is_device_target(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda") or device == "cpu:0"
    if isinstance(device, torch.device):
        return device.type == "cuda" or device == STRICT_COMPUTE_DEVICE
    return isinstance(device, int)  # a CUDA ordinal


def _is_plain_cpu(device) -> bool:
    return (isinstance(device, str) and device == "cpu") or device == torch.device("cpu")


def _target_device(func, args, kwargs):
    """The device a ``.to``/factory call targets (None when it names none)."""
    if "device" in kwargs:
        return kwargs["device"]
    if func is torch.Tensor.to:
        for arg in args[1:]:
            if isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                return arg
    return None


def _tag(outputs, tag: str | None) -> None:
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for item in items:
        if isinstance(item, torch.Tensor):
            if tag is None:
                _TAGS.pop(item, None)
            else:
                _TAGS[item] = tag


def _moved(func, args, result, tag: str):
    """``result`` of a move to ``tag``; a copy when the host returned the input unchanged
    (a real move copies, leaving the source where it was)."""
    source = args[0] if args else None
    if result is source and _TAGS.get(source) != tag:
        result = source.clone()
    _tag(result, tag)
    return result


def _untagged_move(args, result):
    """A move to ``device=x.device`` (plain ``cpu`` here): where ``x`` lives is unknown, so a
    device tensor stays one and anything else is untagged (a host tensor returned unchanged
    becomes an untagged alias)."""
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if source is not None and _TAGS.get(source) == DEVICE:
        _tag(result, DEVICE)
        return result
    if result is source and _TAGS.get(source) == HOST:
        result = result.view_as(result)
    _tag(result, None)
    return result


def _inputs_tags(tensors) -> tuple[bool, list[torch.Tensor], bool]:
    has_device, host_tensors, has_untagged = False, [], False
    for tensor in tensors:
        tag = _TAGS.get(tensor)
        if tag == DEVICE:
            has_device = True
        elif tag == HOST:
            host_tensors.append(tensor)
        else:
            has_untagged = True
    return has_device, host_tensors, has_untagged


_MIXING_ALLOWED = {"to", "copy_", "cuda", "cpu", "__getitem__", "__setitem__", "index_put_",
                   "index_put", "type_as", "__set__", "__get__", "set_", "new_tensor"}


def _func_name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


class _StrictDeviceMode(TorchFunctionMode):
    """Tags every result by where it would live on a GPU and refuses host/device mixing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _func_name(func)
        if name == "__set__" and getattr(func, "__self__", None) is torch._C.TensorBase.data:
            result = func(*args, **kwargs)
            _tag(args[0], _TAGS.get(args[1]))  # param.data = moved: the parameter moved
            return result
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        has_device, host_tensors, has_untagged = _inputs_tags(tensors)
        if has_device and name not in _MIXING_ALLOWED:
            offending = [t for t in host_tensors if t.dim() > 0]
            if offending:
                raise StrictDeviceError(
                    f"strict device mode: {name} mixes device tensors with a host tensor "
                    f"{_describe(offending[0])} (made without device=compute_device() or never "
                    "moved with megatron_pr2.platform.to_device); on a GPU this call fails")
        result = func(*args, **kwargs)
        target = _target_device(func, args, kwargs)
        if func is torch.Tensor.cuda or (target is not None and _is_device_target(target)):
            return _moved(func, args, result, DEVICE) if tensors else _tagged(result, DEVICE)
        if func is torch.Tensor.cpu:
            return _moved(func, args, result, HOST)
        if target is not None and _is_plain_cpu(target):
            return _untagged_move(args, result)
        if any(result is tensor for tensor in tensors):
            return result  # in place (or a no-op): the storage stays where it was
        if not tensors:
            _tag(result, HOST)  # a factory without a device: host memory on every machine
        elif has_device:
            _tag(result, DEVICE)
        elif host_tensors and not has_untagged:
            _tag(result, HOST)
        return result


def _tagged(result, tag: str):
    _tag(result, tag)
    return result


# ------------------------------------------------------------------------------ collectives
_HOST_GROUP = None  # the platform's gloo host group (platform.distributed sets it)


def set_host_group(group) -> None:
    """Tell strict mode the platform's host group (None: there is none now)."""
    global _HOST_GROUP
    _HOST_GROUP = group


def _host_groups() -> list:
    """The gloo groups host tensors may use: the platform's host group and Megatron's ``*_GLOO``."""
    groups = [_HOST_GROUP] if _HOST_GROUP is not None else []
    try:
        from megatron.core import parallel_state
    except ImportError:
        return groups
    for name, value in vars(parallel_state).items():
        if name.endswith("_GLOO") and value is not None:
            groups.extend(value if isinstance(value, (list, tuple)) else [value])
    return groups


def _check_collective(name: str, args, kwargs) -> None:
    group = kwargs.get("group")
    if group is not None and any(group is g for g in _host_groups()):
        return
    for tensor in tree_flatten((args, kwargs))[0]:
        if isinstance(tensor, torch.Tensor) and _TAGS.get(tensor) == HOST:
            raise StrictDeviceError(
                f"strict device mode: torch.distributed.{name} got a host tensor "
                f"{_describe(tensor)} on a device group (NCCL refuses it): move it with "
                "megatron_pr2.platform.to_device, or reduce host values on "
                "megatron_pr2.platform.host_group()")


def _checked_collective(name: str, original):
    @functools.wraps(original)
    def collective(*args, **kwargs):
        _check_collective(name, args, kwargs)
        return original(*args, **kwargs)
    return collective


def _unwrapped(op):
    """torch's own ``isend``/``irecv`` for a strict-mode wrapper (``P2POp`` accepts only those)."""
    return next((o for n, o in _ORIGINAL_COLLECTIVES.items() if getattr(dist, n) is op), op)


class _CheckedP2POp(dist.P2POp):
    """``P2POp`` that checks its tensor like a collective and hands torch its own op."""

    def __new__(cls, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        _check_collective(_func_name(op), (tensor,), {"group": group})
        return super().__new__(cls, _unwrapped(op), tensor, peer, group, tag, group_peer)

    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        super().__init__(_unwrapped(op), tensor, peer, group, tag, group_peer)


# --------------------------------------------------------------------------------- model input
def guard_model_inputs(module: torch.nn.Module):
    """Refuse (in strict mode) a forward of ``module`` whose tensor inputs are not device tensors.

    Returns the hook handle (a no-op hook outside strict mode is never registered: None).
    """
    if not strict_device_enabled():
        return None
    names = list(inspect.signature(module.forward).parameters)
    owner = type(module).__name__

    def hook(mod, args, kwargs):
        named = [*zip(names, args), *kwargs.items()]
        for name, value in named:
            if isinstance(value, torch.Tensor) and _TAGS.get(value) != DEVICE:
                raise StrictDeviceError(
                    f"strict device mode: {owner} input {name!r} {_describe(value)} is not on the "
                    "compute device (move it with megatron_pr2.platform.to_device)")

    return module.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------- switch
def enable_strict_device_mode() -> None:
    """Turn strict mode on (CPU backend only; idempotent).

    Raises:
        StrictDeviceError: when CUDA is available (a GPU checks placement itself) or the CPU
            backend is not enabled.
    """
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise StrictDeviceError("strict device mode emulates a device on CPU-only machines; "
                                "on a GPU the device itself refuses misplaced tensors")
    if not cpu_backend_enabled():
        raise StrictDeviceError("strict device mode needs the CPU backend (enable_cpu_backend)")
    run_before_disable(disable_strict_device_mode)  # its mode sits above the device mode
    for name in _COLLECTIVES:
        original = getattr(dist, name)
        _ORIGINAL_COLLECTIVES[name] = original
        setattr(dist, name, _checked_collective(name, original))
    _ORIGINAL_COLLECTIVES["P2POp"] = dist.P2POp
    dist.P2POp = _CheckedP2POp
    _MODE = _StrictDeviceMode()
    _MODE.__enter__()
    logger.info("strict device mode: compute device %s; host tensors are refused at the model's "
                "input, in device computations and in collectives", STRICT_COMPUTE_DEVICE)


def disable_strict_device_mode() -> None:
    """Turn strict mode off and restore the collectives (for tests)."""
    global _MODE
    if _MODE is None:
        return
    _MODE.__exit__(None, None, None)
    _MODE = None
    for name, original in _ORIGINAL_COLLECTIVES.items():
        setattr(dist, name, original)
    _ORIGINAL_COLLECTIVES.clear()
