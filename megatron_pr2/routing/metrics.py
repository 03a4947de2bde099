"""Routing metrics: pure torch functions and a per-layer accumulator (docs/method.md, Metrics).

- zero-deviation ratio: fraction of tokens whose replayed expert set equals the current
  router's own top-k set;
- mean top-k overlap: ``|replayed & live| / K`` averaged over tokens;
- predictor top-k accuracy: fraction of sampled tokens where ``TopK(p_old + h_old W_p)`` equals
  ``TopK(p_cur)`` as a set, next to the zero predictor's (``TopK(p_old)``) accuracy;
- ``|delta| / |p|``: mean over tokens of ``||h_old W_p|| / ||p_old||``;
- predictor loss.
"""

from __future__ import annotations

import dataclasses

import torch


def same_expert_set(ids_a_TK: torch.Tensor, ids_b_TK: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: row ``t`` of both ``[N, K]`` id tensors holds the same set of experts."""
    if ids_a_TK.shape != ids_b_TK.shape:
        raise ValueError(f"expert id shapes differ: {tuple(ids_a_TK.shape)} vs {tuple(ids_b_TK.shape)}")
    a = ids_a_TK.long().sort(dim=-1).values
    b = ids_b_TK.long().sort(dim=-1).values
    return (a == b).all(dim=-1)


def topk_overlap(ids_a_TK: torch.Tensor, ids_b_TK: torch.Tensor) -> torch.Tensor:
    """``[N]`` float: fraction of row ``t``'s ``K`` experts in ``a`` that are also in ``b``."""
    if ids_a_TK.shape != ids_b_TK.shape:
        raise ValueError(f"expert id shapes differ: {tuple(ids_a_TK.shape)} vs {tuple(ids_b_TK.shape)}")
    hits = ids_a_TK.long().unsqueeze(-1) == ids_b_TK.long().unsqueeze(-2)
    return hits.any(dim=-1).float().mean(dim=-1)


def topk_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` ids of the ``k`` largest scores per row."""
    return torch.topk(scores_TE, k=k, dim=-1).indices


@dataclasses.dataclass
class PredictorStats:
    """Sums over sampled tokens of one layer (divide by ``tokens`` for means)."""

    tokens: int = 0
    predictor_hits: float = 0.0
    zero_predictor_hits: float = 0.0
    delta_ratio_sum: float = 0.0


def predictor_stats(logits_cur_TE, logits_old_TE, delta_TE, k: int) -> PredictorStats:
    """Accuracy sums of the predictor and of the zero predictor against ``TopK(p_cur)``."""
    with torch.no_grad():
        target = topk_ids(logits_cur_TE.float(), k)
        predicted = topk_ids(logits_old_TE.float() + delta_TE.float(), k)
        zero = topk_ids(logits_old_TE.float(), k)
        ratio = delta_TE.float().norm(dim=-1) / logits_old_TE.float().norm(dim=-1).clamp_min(1e-12)
        return PredictorStats(
            tokens=int(target.shape[0]),
            predictor_hits=float(same_expert_set(predicted, target).sum()),
            zero_predictor_hits=float(same_expert_set(zero, target).sum()),
            delta_ratio_sum=float(ratio.sum()),
        )


@dataclasses.dataclass
class LayerRoutingMetrics:
    """Accumulated routing metrics of one MoE layer over a step (sums and counts).

    Sums (not means) are kept so callers can add them across micro-batches and ranks before
    dividing; :meth:`summary` gives the means.
    """

    replay_tokens: int = 0
    zero_deviation_hits: float = 0.0
    overlap_sum: float = 0.0
    predictor: PredictorStats = dataclasses.field(default_factory=PredictorStats)
    predictor_loss_sum: float = 0.0
    predictor_loss_count: int = 0

    def add_replay(self, replayed_TK: torch.Tensor, live_TK: torch.Tensor) -> None:
        """Add the replayed vs. the current live top-k of the replayed (valid) rows."""
        with torch.no_grad():
            self.replay_tokens += int(replayed_TK.shape[0])
            self.zero_deviation_hits += float(same_expert_set(replayed_TK, live_TK).sum())
            self.overlap_sum += float(topk_overlap(replayed_TK, live_TK).sum())

    def add_predictor(self, stats: PredictorStats, loss_value: float) -> None:
        """Add one micro-batch's predictor statistics and its (mean) loss."""
        self.predictor.tokens += stats.tokens
        self.predictor.predictor_hits += stats.predictor_hits
        self.predictor.zero_predictor_hits += stats.zero_predictor_hits
        self.predictor.delta_ratio_sum += stats.delta_ratio_sum
        self.predictor_loss_sum += loss_value
        self.predictor_loss_count += 1

    def summary(self) -> dict[str, float]:
        """Means of the metrics that have data (keys absent when nothing was measured)."""
        out: dict[str, float] = {}
        if self.replay_tokens:
            out["zero_deviation_ratio"] = self.zero_deviation_hits / self.replay_tokens
            out["topk_overlap"] = self.overlap_sum / self.replay_tokens
        if self.predictor.tokens:
            n = self.predictor.tokens
            out["predictor_topk_acc"] = self.predictor.predictor_hits / n
            out["zero_predictor_topk_acc"] = self.predictor.zero_predictor_hits / n
            out["predictor_delta_ratio"] = self.predictor.delta_ratio_sum / n
        if self.predictor_loss_count:
            out["predictor_loss"] = self.predictor_loss_sum / self.predictor_loss_count
        return out
