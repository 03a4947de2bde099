"""Top-k selection that Megatron-Core's routing function delegates to, per router instance.

``megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function`` asks its
``router_replay`` argument for ``(scores_at_ids, ids) = get_replay_topk(scores, topk,
num_groups, group_topk, default_compute_topk)`` and then builds the gates from
``scores_at_ids`` exactly as in live routing (softmax over the selected logits, or the
pre-softmax probabilities at the ids, sigmoid normalisation, scaling factor). A
:class:`RouteSelector` answers that call from a :class:`RouteRequest` set by its router for
one forward, so replayed and predicted routes get Megatron's own gate semantics. It is a plain
per-instance object: Megatron's ``RouterReplay`` class and its global registry are not used.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RouteRequest:
    """What one routing call should dispatch to; the selector fills the ``*_ids`` outputs.

    Attributes:
        forced_ids_TK: ``[N, K]`` int64 ids to dispatch to (replay), or None.
        valid_T: ``[N]`` bool, rows of ``forced_ids_TK`` to use; other rows are routed live.
            None: every row (a recompute's own route; no device read to find that out).
        selection_scores_TE: ``[N, E]`` scores whose top-k is the route (predict), or None.
        want_live_ids: also compute the live top-k (for the zero-deviation metric).
        chosen_ids_TK: output, the ids dispatched to.
        live_ids_TK: output, the live top-k (when computed).
    """

    forced_ids_TK: torch.Tensor | None = None
    valid_T: torch.Tensor | None = None
    selection_scores_TE: torch.Tensor | None = None
    want_live_ids: bool = False
    chosen_ids_TK: torch.Tensor | None = None
    live_ids_TK: torch.Tensor | None = None


class RouteSelector:
    """Per-router answer to Megatron's ``router_replay.get_replay_topk`` protocol."""

    def __init__(self):
        self.request: RouteRequest | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        """Return ``(scores gathered at the chosen ids, ids)`` for the current request."""

        def live():
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)

        request = self.request
        if request is None:
            return live()
        live_ids = None
        if request.forced_ids_TK is not None:
            ids = request.forced_ids_TK
            valid = request.valid_T
            # ``bool(valid.all())`` reads the device: asked only when live ids are not wanted
            if request.want_live_ids or (valid is not None and not bool(valid.all())):
                with torch.no_grad():
                    live_ids = live()[1]
                if valid is not None:
                    ids = torch.where(valid.unsqueeze(-1), ids, live_ids)
        elif request.selection_scores_TE is not None:
            with torch.no_grad():
                ids = default_compute_topk(request.selection_scores_TE, topk,
                                           num_groups=num_groups, group_topk=group_topk)[1]
        else:
            values, ids = live()
            request.chosen_ids_TK = ids
            request.live_ids_TK = ids
            return values, ids
        request.chosen_ids_TK = ids
        request.live_ids_TK = live_ids
        return scores.gather(1, ids), ids
