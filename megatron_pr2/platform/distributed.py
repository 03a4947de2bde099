"""Process-group set-up shared by every entry point (single process and ``torchrun``)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from megatron_pr2.fallbacks import log_fallback_implementation
from megatron_pr2.platform.cpu import (
    CpuBackendError,
    cpu_backend_enabled,
    enable_cpu_backend,
)
from megatron_pr2.platform.device import set_compute_device
from megatron_pr2.platform.strict_device import (
    StrictDeviceError,
    enable_strict_device_mode,
    set_host_group,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ParallelConfig:
    """Model-parallel layout, with Megatron-LM's flag names (also the trainer's CLI section)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_timeout_minutes: int = 10  # every process group, the host group included

    def megatron_sizes(self) -> dict[str, int | None]:
        """The parallel sizes under the keyword names Megatron-Core's ``TransformerConfig`` and
        ``initialize_model_parallel`` both take."""
        names = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "virtual_pipeline_model_parallel_size", "context_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size")
        return {name: getattr(self, name) for name in names}

    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def validate(self, world_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the problem when the layout is impossible (on
        ``world_size`` processes, when given)."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.distributed_timeout_minutes < 1:
            raise ValueError("--distributed-timeout-minutes must be >= 1")
        if self.virtual_pipeline_model_parallel_size not in (None, 1) \
                and self.pipeline_model_parallel_size < 2:
            raise ValueError("--virtual-pipeline-model-parallel-size needs "
                             "--pipeline-model-parallel-size >= 2")
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ValueError(
                "tensor parallelism with MoE layers needs --sequence-parallel "
                "(Megatron-Core requires it for MoE training with TP > 1)"
            )
        if world_size is not None:
            self._validate_world(world_size)

    def _validate_world(self, world_size: int) -> None:
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_model_parallel_size}*{self.pipeline_model_parallel_size}*"
                f"{self.context_parallel_size} = {mp}"
            )
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        expert_mp = etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % expert_mp:
            raise ValueError(
                f"world size {world_size} is not divisible by ETP*EP*PP = {expert_mp}"
            )


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (``""``: on every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_host_group: dist.ProcessGroup | None = None


def init_process_group(device: str | None = None, timeout_minutes: int = 10,
                       strict_device: bool = False) -> None:
    """Initialise ``torch.distributed`` from torchrun's environment, or as a 1-process group.

    On CPU this also enables the CPU backend and uses gloo; on CUDA it uses NCCL and sets the
    local device. Every group gets ``timeout_minutes``; a gloo group over all ranks
    (:func:`host_group`) is created beside the default one for host-side waits.
    ``strict_device`` turns on the CPU backend's strict device mode
    (:mod:`megatron_pr2.platform.strict_device`).
    """
    global _host_group
    device = device or default_device()
    if strict_device and device != "cpu":
        raise StrictDeviceError("--strict-device checks device placement under the CPU backend; "
                                "it cannot be used with --device cuda")
    if device == "cpu":
        enable_cpu_backend()
        if strict_device:
            enable_strict_device_mode()
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    set_compute_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "gloo" if device == "cpu" else "nccl"
        dist.init_process_group(backend=backend, timeout=timeout)
        logger.info("process group: backend=%s rank=%d world=%d timeout=%d min", backend,
                    dist.get_rank(), dist.get_world_size(), timeout_minutes)
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo", timeout=timeout)
        set_host_group(_host_group)


def host_group() -> dist.ProcessGroup:
    """A gloo group over every rank: waits while one rank works alone (rollout, conversion)
    and exchanges of host objects go here, never through NCCL."""
    if _host_group is None:
        raise RuntimeError("no host group: the process group was not initialised by "
                           "megatron_pr2.platform.init_process_group")
    return _host_group


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank on the gloo host group (every rank must call it; a single
    process without a process group returns ``flag``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group())
    return bool(value.item())


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234,
                              device: str | None = None, strict_device: bool = False):
    """Set up the process group, Megatron's parallel state and the model-parallel RNG.

    Returns:
        the ``ProcessGroupCollection`` of the new groups: the trainer hands it to every part
        that communicates (model, DDP, schedule, actor, loop, rollout, weight sync).
    """
    from megatron.core import parallel_state

    init_process_group(device, parallel.distributed_timeout_minutes, strict_device)
    parallel.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        **parallel.megatron_sizes(),
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_model_parallel(seed)
    if dist.get_rank() == 0:
        log_fallback_implementation()
    return process_groups()


def process_groups(groups=None):
    """``groups``, or else the groups Megatron's ``initialize_model_parallel`` set up, as one
    ``ProcessGroupCollection`` (Megatron-Core's own default when no collection is passed).

    The trainer passes its collection explicitly; the default serves standalone use (tools,
    tests) of functions that take ``groups=None``.
    """
    if groups is not None:
        return groups
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def seed_model_parallel(seed: int) -> None:
    """Seed the default and model-parallel RNG states (CPU or CUDA).

    On a machine without CUDA the CPU backend must be on (it installs the CPU RNG tracker
    that Megatron's seeding resets and fills).

    Raises:
        CpuBackendError: no CUDA and the CPU backend is off.
    """
    from megatron.core import tensor_parallel

    if not torch.cuda.is_available() and not cpu_backend_enabled():
        raise CpuBackendError("seed_model_parallel() on a machine without CUDA needs the CPU "
                              "backend: call enable_cpu_backend() (init_process_group does)")
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    global _host_group
    _host_group = None
    set_host_group(None)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
