"""Per-token log-probs and entropy from (vocab-parallel) logits."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def token_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """``log pi(label)`` per position from this TP rank's vocab shard of the logits."""
    loss_SB = tensor_parallel.vocab_parallel_cross_entropy(
        logits_BSV.transpose(0, 1).contiguous().float(), labels_BS.transpose(0, 1).contiguous()
    )
    return -loss_SB.transpose(0, 1)


@torch.no_grad()
def token_entropy(logits_BSV: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of the softmax over the last dim (no gradient).

    Args:
        logits_BSV: ``[..., V]`` logits; this rank's vocabulary shard when ``group`` is given.
        group: the tensor-parallel group the vocabulary is split over (None: the whole
            vocabulary is here). ``-inf`` logits (masked entries) contribute 0.
    """
    group = group if group is not None and group.size() > 1 else None
    logits = logits_BSV.float()
    peak = logits.max(dim=-1, keepdim=True).values
    if group is not None:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    exp = torch.exp(logits - peak)
    partition = exp.sum(-1)
    weighted = torch.where(exp > 0, exp * logits, 0.0).sum(-1)
    if group is not None:
        torch.distributed.all_reduce(partition, group=group)
        torch.distributed.all_reduce(weighted, group=group)
    return torch.log(partition) + peak.squeeze(-1) - weighted / partition
