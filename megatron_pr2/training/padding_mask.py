"""The padding mask Megatron's MoE routers receive, so pad rows neither enter PR2's recorded
predictor inputs nor the routing metrics (nor Megatron's aux losses and expert-bias counts).

Megatron-Core's convention: ``True`` marks a pad token. ``GPTModel.forward(padding_mask=...)``
takes it ``[B, S]`` and hands it to every MoE layer; on the first pipeline stage it cuts the
mask to this rank's sequence-parallel slice itself, on later stages it passes it on unchanged,
so there the caller gives the slice.
"""

from __future__ import annotations

import torch

from megatron_pr2.models.builder import unwrap_ddp


def pad_token_mask(sample_of_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool, True where a micro-batch grid holds no sample's token."""
    return sample_of_BS < 0


def stage_padding_mask(pad_BS: torch.Tensor, chunk) -> torch.Tensor:
    """The mask to pass to ``chunk`` (a ``GPTModel``, DDP-wrapped or not).

    The full ``[B, S]`` on the first stage or without sequence parallelism; else this tensor-
    parallel rank's contiguous ``[B, S / TP]`` slice (Megatron's sequence-parallel split).
    """
    model = unwrap_ddp(chunk)
    if model.pre_process or not model.config.sequence_parallel:
        return pad_BS
    group = model.pg_collection.tp
    seq = pad_BS.shape[1]
    if seq % group.size():
        raise ValueError(f"sequence length {seq} is not divisible by TP = {group.size()} "
                         "under sequence parallelism")
    width = seq // group.size()
    return pad_BS[:, group.rank() * width:(group.rank() + 1) * width]
