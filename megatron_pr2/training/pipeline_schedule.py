"""Run Megatron-Core's forward/backward schedule (no pipelining, 1F1B, interleaved) on micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from megatron_pr2.platform.distributed import process_groups


def run_schedule(chunks, microbatches: Sequence[dict], forward_step: Callable, *,
                 seq_length: int, micro_batch_size: int, forward_only: bool = False,
                 groups=None):
    """Call Megatron's schedule for this rank's model chunks.

    Args:
        chunks: model chunks (DDP-wrapped for training), one per virtual pipeline stage.
        microbatches: the micro-batches, in order; each is a dict of tensors. Every pipeline
            stage receives the same list (stages other than the first use only labels/masks).
        forward_step: ``forward_step(batch, model) -> (output, loss_func)`` as Megatron expects;
            the batch dict carries ``"microbatch_id"`` (its own, or its index in the list).
        seq_length, micro_batch_size: shapes of the tensors passed between pipeline stages.
        forward_only: skip backward (log-prob passes).
        groups: the run's ``ProcessGroupCollection`` (default: Megatron's initialised groups).

    Returns:
        Megatron's list of per-micro-batch reduced-loss dicts (non-empty on the last stage only).
    """
    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    groups = process_groups(groups)
    vpp = len(chunks)
    iterators = [_with_ids(microbatches) for _ in range(vpp)]
    schedule = get_forward_backward_func(pp_size=groups.pp.size(),
                                         vp_size=vpp if vpp > 1 else None)
    return schedule(
        forward_step_func=step,
        data_iterator=iterators if vpp > 1 else iterators[0],
        model=list(chunks) if vpp > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **_communication(chunks, groups),
    )


def _communication(chunks, groups) -> dict:
    """The schedule's process groups; a pipelined schedule also takes its stage-to-stage
    communicator over the same pipeline group."""
    if groups.pp.size() == 1:
        return {"pg_collection": groups}
    from megatron.core.utils import get_model_config

    return {"pg_collection": groups,
            "p2p_communicator": P2PCommunicator(groups.pp, get_model_config(chunks[0]))}


def _with_ids(microbatches):
    for index, batch in enumerate(microbatches):
        yield {"microbatch_id": index, **batch}


def broadcast_from_last_stage(value: torch.Tensor, pp_group=None) -> torch.Tensor:
    """Give every pipeline stage the value computed on the last stage (zeros elsewhere).

    ``pp_group``: the pipeline group (default: Megatron's initialised one).
    """
    pp_group = pp_group if pp_group is not None else process_groups().pp
    if pp_group.size() == 1:
        return value
    if not is_pp_last_stage(pp_group):
        value = torch.zeros_like(value)
    torch.distributed.all_reduce(value, group=pp_group)
    return value
