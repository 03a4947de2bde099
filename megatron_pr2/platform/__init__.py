"""Device backends and process-group set-up."""

from megatron_pr2.platform.cpu import CpuBackendError, cpu_backend_enabled, enable_cpu_backend
from megatron_pr2.platform.distributed import (
    ParallelConfig,
    default_device,
    destroy_model_parallel,
    init_process_group,
    initialize_model_parallel,
    seed_model_parallel,
)

__all__ = [
    "CpuBackendError",
    "ParallelConfig",
    "cpu_backend_enabled",
    "default_device",
    "destroy_model_parallel",
    "enable_cpu_backend",
    "init_process_group",
    "initialize_model_parallel",
    "seed_model_parallel",
]
