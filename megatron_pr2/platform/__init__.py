"""Device backends and process-group set-up."""

from megatron_pr2.platform.cpu import (
    CpuBackendError,
    cpu_backend,
    cpu_backend_enabled,
    disable_cpu_backend,
    enable_cpu_backend,
)
from megatron_pr2.platform.device import compute_device, to_device
from megatron_pr2.platform.distributed import (
    ParallelConfig,
    default_device,
    destroy_model_parallel,
    host_group,
    init_process_group,
    initialize_model_parallel,
    seed_model_parallel,
)

__all__ = [
    "CpuBackendError",
    "ParallelConfig",
    "compute_device",
    "cpu_backend",
    "cpu_backend_enabled",
    "default_device",
    "destroy_model_parallel",
    "disable_cpu_backend",
    "enable_cpu_backend",
    "host_group",
    "init_process_group",
    "initialize_model_parallel",
    "seed_model_parallel",
    "to_device",
]
