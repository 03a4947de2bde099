"""Pure RL math: GRPO advantages, policy losses, train/rollout mismatch metrics (no Megatron)."""

from megatron_pr2.rl.advantages import broadcast_to_tokens, grpo_advantages
from megatron_pr2.rl.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossInputs,
    gather_router_logprobs,
    policy_loss,
    router_shift_weight,
)
from megatron_pr2.rl.mismatch import mismatch_metrics

__all__ = [
    "POLICY_LOSSES",
    "PolicyLossConfig",
    "PolicyLossInputs",
    "broadcast_to_tokens",
    "gather_router_logprobs",
    "grpo_advantages",
    "mismatch_metrics",
    "policy_loss",
    "router_shift_weight",
]
