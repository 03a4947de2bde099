"""Device backends and process-group set-up."""

from megatron_pr2.platform.cpu import (
    CpuBackendError,
    cpu_backend,
    cpu_backend_enabled,
    disable_cpu_backend,
    enable_cpu_backend,
)
from megatron_pr2.platform.device import (
    compute_device,
    module_to_device,
    to_device,
    to_host,
)
from megatron_pr2.platform.distributed import (
    ParallelConfig,
    any_rank,
    default_device,
    destroy_model_parallel,
    host_group,
    init_process_group,
    initialize_model_parallel,
    process_groups,
    seed_model_parallel,
)
from megatron_pr2.platform.strict_device import (
    StrictDeviceError,
    guard_model_inputs,
    strict_device_enabled,
)

__all__ = [
    "CpuBackendError",
    "ParallelConfig",
    "StrictDeviceError",
    "any_rank",
    "compute_device",
    "cpu_backend",
    "cpu_backend_enabled",
    "default_device",
    "destroy_model_parallel",
    "disable_cpu_backend",
    "enable_cpu_backend",
    "guard_model_inputs",
    "host_group",
    "init_process_group",
    "initialize_model_parallel",
    "module_to_device",
    "process_groups",
    "seed_model_parallel",
    "strict_device_enabled",
    "to_device",
    "to_host",
]
