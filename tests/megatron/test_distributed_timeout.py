"""``--distributed-timeout-minutes`` reaches every process group: the default one, the gloo host
group and each of Megatron's model-parallel groups."""

import datetime

from tests.multiproc import run_distributed


def _timeouts_worker(rank):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pr2.platform import (
        ParallelConfig,
        host_group,
        initialize_model_parallel,
    )

    initialize_model_parallel(ParallelConfig(distributed_timeout_minutes=3), device="cpu")
    groups = {
        "default": dist.distributed_c10d._get_default_group(),
        "host": host_group(),
        "tensor": ps.get_tensor_model_parallel_group(),
        "pipeline": ps.get_pipeline_model_parallel_group(),
        "data": ps.get_data_parallel_group(),
        "data_with_cp": ps.get_data_parallel_group(with_context_parallel=True),
        "expert": ps.get_expert_model_parallel_group(),
        "expert_data": ps.get_expert_data_parallel_group(),
        "model": ps.get_model_parallel_group(),
    }
    return {name: group._get_backend(torch.device("cpu")).options._timeout
            for name, group in groups.items()}


def test_timeout_reaches_every_group():
    timeouts = run_distributed(_timeouts_worker, 1)[0]
    assert len(timeouts) == 9
    assert set(timeouts.values()) == {datetime.timedelta(minutes=3)}, timeouts
