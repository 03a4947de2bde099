"""The CPU backend's process-wide effects are confined and reversible: after
``disable_cpu_backend`` (or leaving ``cpu_backend()``) torch and Megatron-Core are as before.

Runs in a fresh interpreter, so this test process keeps its own state.
"""

import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import torch
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.tensor_parallel.random import CheckpointFunction
from megatron_pr2.platform import cpu_backend, cpu_backend_enabled, disable_cpu_backend
from megatron_pr2.platform import enable_cpu_backend, seed_model_parallel, CpuBackendError

def state():
    return (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,
            CheckpointFunction.__dict__["backward"], mp_random._get_cuda_rng_state,
            mp_random._CUDA_RNG_STATE_TRACKER, mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)

def cuda_factory_refused():
    try:
        torch.zeros(2, device="cuda")
    except (RuntimeError, AssertionError):
        return True
    return False

before = state()
assert cuda_factory_refused()
try:
    seed_model_parallel(0)
    raise SystemExit("seeding without the backend was accepted")
except CpuBackendError as err:
    assert "enable_cpu_backend" in str(err)
with cpu_backend():
    assert cpu_backend_enabled()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 5)
    with tracker.fork():
        torch.rand(1)
assert not cpu_backend_enabled() and state() == before and cuda_factory_refused()
enable_cpu_backend()
enable_cpu_backend()  # idempotent
disable_cpu_backend()
disable_cpu_backend()
assert state() == before and cuda_factory_refused()
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend refuses to run with CUDA")
def test_cpu_backend_is_reversible():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
