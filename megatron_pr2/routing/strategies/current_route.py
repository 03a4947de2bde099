"""Current-route replay (``current-route``): the zero-staleness reference method.

At mini-step ``m >= 2`` the current router (``theta_{m-1}``) routes mini-batch ``m`` live in a
no-grad record pass; the old log-probs of that mini-batch are then recomputed at ``theta_0`` (a
frozen copy of this rank's parameters, swapped in) replaying that same route, and the mini-step
replays it. The route is never stale; what it costs is two extra no-grad forwards over
``(N-1)/N`` of the rollout batch and two parameter-sized host buffers (the frozen ``theta_0`` and
the swapped-out ``theta_{m-1}``). Mini-step 1 is R2 exactly (``theta_0`` is current).

Every layout works: each rank freezes and swaps the parameter shards it holds, and the passes go
through the same Megatron schedule as every other pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.routing.strategies.lookahead import host_copy


def _parameters(model_chunks) -> list[torch.Tensor]:
    return [p for chunk in model_chunks for p in chunk.parameters()]


class FrozenWeights:
    """A host copy of this rank's parameters, swappable into the model bit for bit."""

    def __init__(self, model_chunks):
        self.params = _parameters(model_chunks)
        self.saved = [host_copy(p) for p in self.params]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the model holds the frozen weights; the live ones come back after."""
        live = [host_copy(p) for p in self.params]
        try:
            with torch.no_grad():
                for param, frozen in zip(self.params, self.saved):
                    param.copy_(frozen)
            yield
        finally:
            with torch.no_grad():
                for param, current in zip(self.params, live):
                    param.copy_(current)


class CurrentRouteReplay:
    """Per-mini-step routes and old log-probs of ``current-route`` for one rollout batch.

    Args:
        actor: the :class:`~megatron_pr2.training.actor.PolicyActor`.
        old_plan: the routes the old-log-prob pass recorded at ``theta_0`` (mini-step 1's).
    """

    def __init__(self, actor, old_plan: RoutePlan):
        self.actor = actor
        self.old_plan = old_plan
        self.frozen = FrozenWeights(actor.model)

    def ministep_plan(self, ministep: int, chunk: Sequence) -> RoutePlan:
        """The route mini-step ``ministep`` (0-based) replays; refreshes the chunk's old_logp."""
        ids = [mb.microbatch_id for mb in chunk]
        if ministep == 0:
            return self.old_plan.select(ids)
        current = self.actor.logprob_pass(chunk, "record", record_predictor_inputs=False)
        plan = current.routing.routes
        with self.frozen.swapped_in():
            self.actor.logprob_pass(chunk, "replay", plan, record_predictor_inputs=False)
        return plan
