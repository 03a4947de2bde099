"""Drift attribution: how much of a replayed route's staleness comes from the router's weight
changing, and how much from its input (the layers below) changing. Pure torch.

For the same tokens, with ``h_old, W_old`` the router input and weight in the old-log-prob pass
and ``h_cur, W_cur`` those at a later mini-step, four top-k routes are compared:

- stale ``TopK(h_old W_old^T)`` (what R2 replays),
- weight-known ``TopK(h_old W_cur^T)`` (the router weight's change known exactly),
- input-known ``TopK(h_cur W_old^T)`` (the router input's change known exactly),
- live ``TopK(h_cur W_cur^T)`` (the current router's own route).

``deviation`` is the fraction of tokens whose stale route differs (as a set) from the live one;
the share explained by the weight (input) is the fraction of tokens that knowing the weight
(input) change brings back into agreement with the live route, divided by ``deviation``. The two
shares need not add up to 1 (the changes interact).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_pr2.routing.metrics import same_expert_set, topk_ids


@dataclasses.dataclass
class DriftCounts:
    """Token counts of one layer (add them over micro-batches and ranks, then summarise)."""

    tokens: float = 0.0
    stale_hits: float = 0.0
    weight_known_hits: float = 0.0
    input_known_hits: float = 0.0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.tokens, self.stale_hits, self.weight_known_hits,
                             self.input_known_hits], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> DriftCounts:
        return cls(*[float(v) for v in values.tolist()])

    def __add__(self, other: DriftCounts) -> DriftCounts:
        return DriftCounts.from_tensor(self.as_tensor() + other.as_tensor())

    def summary(self) -> dict[str, float]:
        """Deviation and the shares explained by weight and input change (where defined)."""
        if not self.tokens:
            return {}
        deviation = 1.0 - self.stale_hits / self.tokens
        out = {"deviation": deviation,
               "weight_known_zero_dev": self.weight_known_hits / self.tokens,
               "input_known_zero_dev": self.input_known_hits / self.tokens}
        if deviation > 0:
            out["weight_share"] = (self.weight_known_hits - self.stale_hits) / self.tokens / deviation
            out["input_share"] = (self.input_known_hits - self.stale_hits) / self.tokens / deviation
        return out


def drift_counts(h_old_TH: torch.Tensor, h_cur_TH: torch.Tensor, w_old_EH: torch.Tensor,
                 w_cur_EH: torch.Tensor, k: int) -> DriftCounts:
    """Counts of the four routes' agreement with the live route on ``T`` tokens of one layer.

    Routes are top-k of the router logits ``h W^T`` (softmax and pre-softmax scoring select the
    same experts), computed in fp32.
    """
    if h_old_TH.shape != h_cur_TH.shape:
        raise ValueError(f"h_old {tuple(h_old_TH.shape)} and h_cur {tuple(h_cur_TH.shape)} must "
                         "hold the same tokens")
    if w_old_EH.shape != w_cur_EH.shape or w_old_EH.shape[1] != h_old_TH.shape[1]:
        raise ValueError(f"router weights {tuple(w_old_EH.shape)}/{tuple(w_cur_EH.shape)} do not "
                         f"fit hidden size {h_old_TH.shape[1]}")
    h_old, h_cur = h_old_TH.float(), h_cur_TH.float()
    w_old, w_cur = w_old_EH.float(), w_cur_EH.float()
    live = topk_ids(h_cur @ w_cur.T, k)
    routes = [topk_ids(h_old @ w_old.T, k), topk_ids(h_old @ w_cur.T, k),
              topk_ids(h_cur @ w_old.T, k)]
    hits = [float(same_expert_set(route, live).sum()) for route in routes]
    return DriftCounts(float(h_old_TH.shape[0]), *hits)
