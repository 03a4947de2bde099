"""Train/rollout mismatch metrics and token entropy."""

from __future__ import annotations

import math

import torch

from megatron_pr2.rl.reductions import check_same_shape, masked_mean


def mismatch_metrics(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     tau: float = 2.0) -> dict[str, torch.Tensor]:
    """How far the trainer's token probabilities are from the rollout engine's.

    With ``r = pi_train / pi_rollout`` per response token:

    - ``k3_kl``: ``mean(r - 1 - log r)`` (Schulman's k3 estimate of KL(rollout || train));
    - ``abs_logprob_diff``: ``mean |log pi_train - log pi_rollout|``;
    - ``extreme_token_fraction``: ``F(tau) = mean 1[max(r, 1/r) > tau]``.

    Args:
        train_logp, rollout_logp: ``[...]`` log-probs of the same sampled tokens.
        mask: same shape, bool or 0/1 response mask.
        tau: threshold of the extreme-token fraction (> 1).

    Returns:
        Detached scalar tensors under the keys above.
    """
    if tau <= 1.0:
        raise ValueError(f"tau must be > 1, got {tau}")
    check_same_shape(train_logp=train_logp, rollout_logp=rollout_logp, mask=mask)
    log_r = (train_logp - rollout_logp).detach().float()
    return {
        "k3_kl": masked_mean(torch.exp(log_r) - 1.0 - log_r, mask),
        "abs_logprob_diff": masked_mean(log_r.abs(), mask),
        "extreme_token_fraction": masked_mean((log_r.abs() > math.log(tau)).float(), mask),
    }
