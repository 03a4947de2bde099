"""Run Megatron-Core's forward/backward schedule (no pipelining, 1F1B, interleaved) on micro-batches."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def run_schedule(chunks, microbatches: Sequence[dict], forward_step: Callable, *,
                 seq_length: int, micro_batch_size: int, forward_only: bool = False):
    """Call Megatron's schedule for this rank's model chunks.

    Args:
        chunks: model chunks (DDP-wrapped for training), one per virtual pipeline stage.
        microbatches: the micro-batches, in order; each is a dict of tensors. Every pipeline
            stage receives the same list (stages other than the first use only labels/masks).
        forward_step: ``forward_step(batch, model) -> (output, loss_func)`` as Megatron expects;
            the batch dict carries ``"microbatch_id"`` (its own, or its index in the list).
        seq_length, micro_batch_size: shapes of the tensors passed between pipeline stages.
        forward_only: skip backward (log-prob passes).

    Returns:
        Megatron's list of per-micro-batch reduced-loss dicts (non-empty on the last stage only).
    """
    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    vpp = len(chunks)
    iterators = [_with_ids(microbatches) for _ in range(vpp)]
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if vpp > 1 else iterators[0],
        model=list(chunks) if vpp > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _with_ids(microbatches):
    for index, batch in enumerate(microbatches):
        yield {"microbatch_id": index, **batch}


def broadcast_from_last_stage(value: torch.Tensor) -> torch.Tensor:
    """Give every pipeline stage the value computed on the last stage (zeros elsewhere)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        value = torch.zeros_like(value)
    torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return value
