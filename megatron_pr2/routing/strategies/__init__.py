"""The behaviours a routing method is made of: how its old-log-prob pass runs (an ``OldPass``)
and which routes its mini-steps replay (a ``Replay``). A row of :mod:`.methods` names one of each.

The declarative parts (router mode, engine routes, host weight copies, optimizer needs) are plain
attributes, read by config, the dry run and the memory estimate without torch. The passes
themselves import their implementation when first run, so this module stays torch-free.

A method with new behaviour = a new ``OldPass`` or ``Replay`` here (or in its own module) + one
row in :mod:`.methods`.
"""

from __future__ import annotations

import dataclasses

ROUTER_MODES = ("live", "record", "replay", "predict")

@dataclasses.dataclass(frozen=True)
class WeightCopies:
    """Host copies of the weights a method keeps per GPU (what the dry run reports).

    Attributes:
        count: copies of the weights (0: none).
        updated_only: only the weights this GPU updates (its distributed-optimizer slice).
        note: what the copies are, one clause.
    """

    count: int
    updated_only: bool
    note: str


class OldPass:
    """How the old-log-prob pass runs at ``theta_0``; returns the actor's ``PassResult``.

    Attributes:
        mode: the router mode the pass routes the mini-batches with (``ROUTER_MODES``).
        records_routes: the pass leaves each micro-batch's dispatched route in its result (what
            a replay of the old pass's routes needs).
    """

    mode = "live"
    records_routes = False

    def run(self, actor, microbatches, engine_plan, algo, record_predictor_inputs: bool):
        raise NotImplementedError

    def weight_copies(self, bf16: bool) -> WeightCopies | None:
        """The host weight copies the pass keeps (None: none)."""
        return None

    def optimizer_problem(self, distributed_optimizer: bool) -> str | None:
        """Why the pass cannot run with this optimizer (None: it can)."""
        return None


@dataclasses.dataclass(frozen=True)
class RouterModePass(OldPass):
    """One pass over every micro-batch with the routers in ``mode`` (``replay``: the engine's
    routes)."""

    mode: str

    def __post_init__(self):
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {self.mode!r}")

    @property
    def records_routes(self) -> bool:
        return self.mode in ("record", "predict")

    def run(self, actor, microbatches, engine_plan, algo, record_predictor_inputs: bool):
        return actor.logprob_pass(microbatches, self.mode, engine_plan,
                                  record_predictor_inputs=record_predictor_inputs)


class LookaheadPass(OldPass):
    """Mini-batch ``m`` recorded at ``theta_0 + c (m-1) u`` (``u`` = Adam's next step), old
    log-probs at ``theta_0`` under it (:mod:`megatron_pr2.routing.strategies.lookahead`)."""

    mode = "record"
    records_routes = True

    def run(self, actor, microbatches, engine_plan, algo, record_predictor_inputs: bool):
        from megatron_pr2.routing.strategies.lookahead import lookahead_old_pass

        return lookahead_old_pass(actor, microbatches, algo.off_policy_window,
                                  algo.lookahead_scale)

    def weight_copies(self, bf16: bool) -> WeightCopies:
        if bf16:
            return WeightCopies(0, True, "bf16 weights are cast again from the fp32 main weights "
                                         "after each shifted forward, no copy")
        return WeightCopies(1, True, "a copy of the fp32 weights each GPU updates; the shifted "
                                     "forwards add no GPU memory beyond one parameter's Adam step")


class OptimizerPredictorPass(OldPass):
    """PR2 with ``W_p = c (m-1) u_r`` (the router weight's Adam step) per mini-batch, in predict
    mode (:mod:`megatron_pr2.routing.strategies.optimizer_predictor`)."""

    mode = "predict"
    records_routes = True

    def run(self, actor, microbatches, engine_plan, algo, record_predictor_inputs: bool):
        from megatron_pr2.routing.strategies.optimizer_predictor import (
            optimizer_predictor_old_pass,
        )

        return optimizer_predictor_old_pass(actor, microbatches, algo.off_policy_window,
                                            algo.lookahead_scale)

    def optimizer_problem(self, distributed_optimizer: bool) -> str | None:
        if not distributed_optimizer:
            return None
        from megatron_pr2.routing.strategies.optimizer_predictor import (
            OPTIMIZER_PREDICTOR_SHARDED,
        )

        return OPTIMIZER_PREDICTOR_SHARDED


class Replay:
    """Which route each mini-step replays.

    Attributes:
        replays: the mini-steps replay a fixed route (False: they route live).
        needs_engine_routes: the rollout engine must return its routed experts.
        needs_old_pass_routes: the routes come from (or start from) the old pass's record.
    """

    replays = True
    needs_engine_routes = False
    needs_old_pass_routes = False

    def ministep_plans(self, actor, old, engine_plan):
        """For one rollout batch, a function ``(m, chunk) -> RoutePlan | None``: mini-step
        ``m``'s (0-based) routes. Built before the first mini-step."""
        raise NotImplementedError

    def weight_copies(self, bf16: bool) -> WeightCopies | None:
        return None


def _ids(chunk) -> list[int]:
    return [mb.microbatch_id for mb in chunk]


class LiveReplay(Replay):
    """No replay: every mini-step routes live."""

    replays = False

    def ministep_plans(self, actor, old, engine_plan):
        return lambda m, chunk: None


class OldPassReplay(Replay):
    """The routes the old-log-prob pass recorded (or predicted)."""

    needs_old_pass_routes = True

    def ministep_plans(self, actor, old, engine_plan):
        return lambda m, chunk: old.routing.routes.select(_ids(chunk))


class EngineReplay(Replay):
    """The rollout engine's routes (R3 transport)."""

    needs_engine_routes = True

    def ministep_plans(self, actor, old, engine_plan):
        return lambda m, chunk: engine_plan.select(_ids(chunk))


class CurrentRouteReplay(Replay):
    """Each mini-step's live route, old log-probs recomputed at ``theta_0`` (a frozen copy)
    under it (:mod:`megatron_pr2.routing.strategies.current_route`)."""

    needs_old_pass_routes = True

    def ministep_plans(self, actor, old, engine_plan):
        from megatron_pr2.routing.strategies.current_route import (
            CurrentRouteReplay as Impl,
        )

        return Impl(actor, old.routing.routes).ministep_plan

    def weight_copies(self, bf16: bool) -> WeightCopies:
        return WeightCopies(2, False, "the frozen theta_0 and the swapped-out weights; the "
                                      "frozen forwards add no GPU memory")
