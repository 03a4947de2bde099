"""Policy-gradient losses: token-level PPO/GRPO clip and GSPO, with TIS, IcePop and RSPO options.

Shapes: token tensors are ``[B, T]`` (sequence, response position) with a response ``mask``;
router log-prob tensors are ``[B, T, L, K]`` (per MoE layer, at the old top-k routes).
A loss is chosen by name from :data:`POLICY_LOSSES`; both losses share one composition:

1. ratio: token ``r_t = exp(logp - logp_old)`` (``ppo_clip``) or GSPO's sequence ratio
   ``s_i = exp(mean_t log r_t)`` on every token of sequence ``i`` (``gspo``);
2. RSPO (option): ratio times ``sg(max(gamma_t, gamma_min))`` with the router-shift weight
   ``gamma_t`` of :func:`router_shift_weight`;
3. clipped surrogate ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``;
4. per-token detached weights: TIS ``min(pi_old / pi_rollout, C)``, IcePop mask (0 where
   ``pi_old / pi_rollout`` is outside ``[alpha, beta]``; masked tokens stay in the denominator);
5. aggregation: ``token_mean`` over all response tokens, or ``seq_mean`` (mean per sequence,
   then over non-empty sequences).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_pr2.rl.reductions import (
    check_same_shape,
    masked_mean,
    masked_row_mean,
    masked_sum,
)

AGGREGATIONS = ("token_mean", "seq_mean")

# Per-loss defaults for fields left as None in PolicyLossConfig (GSPO paper: eps 3e-4 / 4e-4).
LOSS_DEFAULTS = {
    "ppo_clip": {"eps_low": 0.2, "eps_high": 0.2, "aggregation": "token_mean"},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "aggregation": "seq_mean"},
}


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Policy-loss options. ``None`` fields take the loss type's entry of :data:`LOSS_DEFAULTS`.

    Attributes:
        loss_type: a key of :data:`POLICY_LOSSES` (``ppo_clip`` or ``gspo``).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` ("clip-higher" when
            ``eps_high > eps_low``).
        aggregation: ``token_mean`` or ``seq_mean``.
        tis: weight tokens by ``min(pi_old_train / pi_rollout, tis_cap)`` (detached).
        icepop: drop tokens whose ``pi_old_train / pi_rollout`` is outside
            ``[icepop_low, icepop_high]``.
        rspo: multiply the ratio by ``sg(max(gamma, rspo_gamma_min))`` before clipping.
            The RSPO floor is not stated in the summaries we have; 0.8 is our default.
    """

    loss_type: str = "ppo_clip"
    eps_low: float | None = None
    eps_high: float | None = None
    aggregation: str | None = None
    tis: bool = False
    tis_cap: float = 2.0
    icepop: bool = False
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    rspo: bool = False
    rspo_gamma_min: float = 0.8

    def __post_init__(self):
        if self.loss_type not in LOSS_DEFAULTS:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; known: {sorted(LOSS_DEFAULTS)}")
        for name, default in LOSS_DEFAULTS[self.loss_type].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        self._validate()

    def _validate(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; known: {AGGREGATIONS}")
        if not (0.0 <= self.eps_low < 1.0 and self.eps_high >= 0.0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                             f"{self.eps_high}")
        if self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        if not 0.0 < self.icepop_low <= self.icepop_high:
            raise ValueError(f"need 0 < icepop_low <= icepop_high, got [{self.icepop_low}, "
                             f"{self.icepop_high}]")
        if not 0.0 <= self.rspo_gamma_min <= 1.0:
            raise ValueError(f"rspo_gamma_min must be in [0, 1], got {self.rspo_gamma_min}")


@dataclasses.dataclass
class PolicyLossInputs:
    """Tensors of one micro-batch for a policy loss.

    Attributes:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (carries the gradient).
        old_logp: ``[B, T]`` log-probs under the old policy, recomputed by the trainer.
        advantages: ``[B, T]`` per-token advantages.
        mask: ``[B, T]`` response mask (bool or 0/1).
        rollout_logp: ``[B, T]`` log-probs reported by the rollout engine (TIS / IcePop).
        router_logp_cur: ``[B, T, L, K]`` current router log-probs at the old routes (RSPO).
        router_logp_old: ``[B, T, L, K]`` old router log-probs at the old routes (RSPO).
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    rollout_logp: torch.Tensor | None = None
    router_logp_cur: torch.Tensor | None = None
    router_logp_old: torch.Tensor | None = None

    def __post_init__(self):
        if self.logp.dim() != 2:
            raise ValueError(f"logp must be [B, T], got shape {tuple(self.logp.shape)}")
        tokens = {"logp": self.logp, "old_logp": self.old_logp, "advantages": self.advantages,
                  "mask": self.mask}
        if self.rollout_logp is not None:
            tokens["rollout_logp"] = self.rollout_logp
        check_same_shape(**tokens)
        if (self.router_logp_cur is None) != (self.router_logp_old is None):
            raise ValueError("router_logp_cur and router_logp_old must be given together")
        if self.router_logp_cur is not None:
            check_same_shape(router_logp_cur=self.router_logp_cur,
                             router_logp_old=self.router_logp_old)
            if self.router_logp_cur.dim() != 4 or self.router_logp_cur.shape[:2] != self.logp.shape:
                raise ValueError(f"router log-probs must be [B, T, L, K] with [B, T] = "
                                 f"{tuple(self.logp.shape)}, got {tuple(self.router_logp_cur.shape)}")


def gather_router_logprobs(router_logits: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Router log-probs (softmax over all experts) at given routes.

    Args:
        router_logits: ``[..., L, E]`` router logits.
        expert_ids: ``[..., L, K]`` expert ids (any integer dtype).

    Returns:
        ``[..., L, K]`` ``log softmax(router_logits)`` gathered at ``expert_ids``.
    """
    return torch.log_softmax(router_logits.float(), dim=-1).gather(-1, expert_ids.long())


def router_shift_weight(router_logp_cur: torch.Tensor, router_logp_old: torch.Tensor) -> torch.Tensor:
    """RSPO router-shift weight ``gamma_t = exp(-(1/L) sum_l (1/K) sum_k |cur - old|)``.

    Args:
        router_logp_cur, router_logp_old: ``[..., L, K]`` router log-probs at the old routes.

    Returns:
        ``[...]`` weights in ``(0, 1]`` (not detached; the loss detaches them).
    """
    return torch.exp(-(router_logp_cur - router_logp_old).abs().mean(dim=(-2, -1)))


def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token importance ratio ``exp(logp - old_logp)`` in fp32 (``mask`` unused; GSPO's signature)."""
    del mask
    return torch.exp(logp.float() - old_logp.float())


def gspo_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO sequence ratio ``s_i = exp(mean_t (logp - old_logp))`` placed on every token.

    Written as ``sg(s_i) * exp(logp_t - sg(logp_t))``: the value is ``s_i`` on each token and the
    per-sequence mean of its gradients equals the gradient of ``s_i``.
    """
    logp = logp.float()
    seq_log_ratio = masked_row_mean(logp - old_logp.float(), mask)
    return torch.exp(logp - logp.detach() + seq_log_ratio.detach()[:, None])


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss ``-min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A)``.

    Returns:
        ``(loss, clip_active)``; ``clip_active`` marks tokens where the clipped branch is chosen
        (their gradient is zero).
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce ``[B, T]`` per-token losses to a scalar.

    Args:
        mode: ``token_mean`` (sum over masked tokens / token count) or ``seq_mean`` (per-sequence
            token means summed / count of non-empty sequences).
        normalizer: replaces the count (token or sequence) — e.g. the global count over all
            micro-batches and data-parallel ranks, for gradient accumulation.
    """
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if mode == "token_mean":
        count = mask.to(per_token.dtype).sum().clamp(min=1.0)
        return masked_sum(per_token, mask) / (count if normalizer is None else normalizer)
    if mode == "seq_mean":
        count = (mask.to(per_token.dtype).sum(dim=1) > 0).sum().clamp(min=1)
        total = masked_row_mean(per_token, mask).sum()
        return total / (count if normalizer is None else normalizer)
    raise ValueError(f"unknown aggregation {mode!r}; known: {AGGREGATIONS}")


def _rollout_weights(inputs: PolicyLossInputs, cfg: PolicyLossConfig,
                     metrics: dict) -> torch.Tensor | None:
    """Detached TIS / IcePop per-token weights from ``pi_old_train / pi_rollout``, or None."""
    if inputs.rollout_logp is None:
        if cfg.tis or cfg.icepop:
            raise ValueError("TIS and IcePop need rollout_logp (the rollout engine's log-probs)")
        return None
    is_ratio = torch.exp(inputs.old_logp.detach().float() - inputs.rollout_logp.detach().float())
    metrics["is_ratio_clip_fraction"] = masked_mean((is_ratio > cfg.tis_cap).float(), inputs.mask)
    weight = torch.ones_like(is_ratio)
    if cfg.tis:
        weight = weight * is_ratio.clamp(max=cfg.tis_cap)
    if cfg.icepop:
        keep = (is_ratio >= cfg.icepop_low) & (is_ratio <= cfg.icepop_high)
        metrics["icepop_masked_fraction"] = masked_mean((~keep).float(), inputs.mask)
        weight = weight * keep
    return weight


def _rspo_factor(inputs: PolicyLossInputs, cfg: PolicyLossConfig,
                 metrics: dict) -> torch.Tensor | None:
    """Detached ``max(gamma, gamma_min)`` if RSPO is on (gamma metrics whenever inputs exist)."""
    if inputs.router_logp_cur is None:
        if cfg.rspo:
            raise ValueError("RSPO needs router_logp_cur and router_logp_old")
        return None
    gamma = router_shift_weight(inputs.router_logp_cur.detach(), inputs.router_logp_old.detach())
    metrics["rspo_gamma_mean"] = masked_mean(gamma, inputs.mask)
    metrics["rspo_gamma_below_min_fraction"] = masked_mean(
        (gamma < cfg.rspo_gamma_min).float(), inputs.mask)
    return gamma.clamp(min=cfg.rspo_gamma_min) if cfg.rspo else None


def _clipped_policy_loss(ratio: torch.Tensor, inputs: PolicyLossInputs, cfg: PolicyLossConfig,
                         normalizer: float | None) -> tuple[torch.Tensor, dict]:
    """Steps 2-5 of the module docstring, shared by every loss type."""
    metrics: dict[str, torch.Tensor] = {}
    weight = _rollout_weights(inputs, cfg, metrics)
    rspo = _rspo_factor(inputs, cfg, metrics)
    if rspo is not None:
        ratio = ratio * rspo
    per_token, clip_active = clipped_surrogate(ratio, inputs.advantages, cfg.eps_low, cfg.eps_high)
    if weight is not None:
        per_token = per_token * weight
    loss = aggregate(per_token, inputs.mask, cfg.aggregation, normalizer)
    log_ratio = (inputs.logp.detach().float() - inputs.old_logp.float())
    metrics["pg_clip_fraction"] = masked_mean(clip_active.float(), inputs.mask)
    metrics["approx_kl"] = masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, inputs.mask)
    metrics["policy_loss"] = loss.detach()
    return loss, metrics


def ppo_clip_loss(inputs: PolicyLossInputs, cfg: PolicyLossConfig,
                  normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """Token-level PPO/GRPO clipped loss. Returns ``(loss, metrics)``."""
    return _clipped_policy_loss(token_ratio(inputs.logp, inputs.old_logp, inputs.mask),
                                inputs, cfg, normalizer)


def gspo_loss(inputs: PolicyLossInputs, cfg: PolicyLossConfig,
              normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """GSPO: the sequence ratio, clipped per sequence. Returns ``(loss, metrics)``."""
    return _clipped_policy_loss(gspo_ratio(inputs.logp, inputs.old_logp, inputs.mask),
                                inputs, cfg, normalizer)


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss, "gspo": gspo_loss}


def policy_loss(inputs: PolicyLossInputs, cfg: PolicyLossConfig,
                normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The loss named by ``cfg.loss_type``.

    Returns:
        ``(loss, metrics)``: a scalar loss and detached scalar metrics ``policy_loss``,
        ``pg_clip_fraction``, ``approx_kl`` (k3 of ``pi_theta / pi_old``), plus
        ``is_ratio_clip_fraction`` (share of ``pi_old / pi_rollout > tis_cap``) when rollout
        log-probs are given, ``icepop_masked_fraction`` with IcePop, and ``rspo_gamma_mean`` /
        ``rspo_gamma_below_min_fraction`` when router log-probs are given.
    """
    return POLICY_LOSSES[cfg.loss_type](inputs, cfg, normalizer)
