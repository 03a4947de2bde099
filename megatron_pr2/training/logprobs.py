"""Per-token log-probs and entropy from (vocab-parallel) logits."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def token_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """``log pi(label)`` per position from this TP rank's vocab shard of the logits."""
    loss_SB = tensor_parallel.vocab_parallel_cross_entropy(
        logits_BSV.transpose(0, 1).contiguous().float(), labels_BS.transpose(0, 1).contiguous()
    )
    return -loss_SB.transpose(0, 1)


@torch.no_grad()
def token_entropy(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Entropy of the full softmax per position, from vocab-sharded logits (no gradient)."""
    group = parallel_state.get_tensor_model_parallel_group()
    logits = logits_BSV.float()
    peak = logits.max(dim=-1, keepdim=True).values
    if group.size() > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    exp = torch.exp(logits - peak)
    partition = exp.sum(-1)
    weighted = (exp * logits).sum(-1)
    if group.size() > 1:
        torch.distributed.all_reduce(partition, group=group)
        torch.distributed.all_reduce(weighted, group=group)
    return torch.log(partition) + peak.squeeze(-1) - weighted / partition
