"""What each routing method means: one frozen table that config, the RL loop, the dry run and
compare all read (docs/method.md explains the methods).

A row names the method's behaviours (:mod:`.strategies`): how its old-log-prob pass runs and
which routes its mini-steps replay. Adding a method = one row here, plus a strategy module when
it brings new behaviour. Invalid combinations fail when the row is built. This module is pure
Python: no torch, no Megatron.
"""

from __future__ import annotations

import dataclasses

from megatron_pr2.routing.strategies import (
    CurrentRouteReplay,
    EngineReplay,
    LiveReplay,
    LookaheadPass,
    OldPass,
    OldPassReplay,
    OptimizerPredictorPass,
    Replay,
    RouterModePass,
    WeightCopies,
)

PREDICTORS = ("learned", "optimizer")


@dataclasses.dataclass(frozen=True)
class RoutingMethod:
    """One routing method of the trainer.

    Attributes:
        name: the ``--routing-method`` value.
        old_pass: how the old-log-prob pass runs and what it records.
        replay: which routes the mini-steps replay.
        predictive_engine_gate: weight sync writes ``W_r + W_p^T`` as the engine's gate (needs
            the learned predictor).
        summary: one line for tables and ``--help``.
        predictor: where PR2's evolution predictor comes from: ``"learned"`` (``W_p``
            trained by the predictor loss, as the paper defines it), ``"optimizer"`` (``W_p`` =
            ``c (m-1) u_r``, the router weight's Adam step, per mini-batch; no learning) or
            ``None`` (no predictor).
    """

    name: str
    old_pass: OldPass
    replay: Replay
    predictive_engine_gate: bool
    summary: str
    predictor: str | None = None

    def __post_init__(self):
        for problem in self._problems():
            raise ValueError(f"routing method {self.name}: {problem}")

    def _problems(self):
        if not isinstance(self.old_pass, OldPass) or not isinstance(self.replay, Replay):
            yield "old_pass must be an OldPass and replay a Replay (routing/strategies/__init__.py)"
        if self.predictor not in (None, *PREDICTORS):
            yield f"predictor must be None or one of {PREDICTORS}"
        if self.predictive_engine_gate and self.predictor != "learned":
            yield "the predictive engine gate folds in a learned W_p"
        if self.old_pass.mode == "replay" and not self.replay.needs_engine_routes:
            yield ("an old pass in replay mode replays the engine's routes: pair it with "
                   "EngineReplay")
        if self.old_pass.mode == "predict" and self.predictor is None:
            yield "an old pass in predict mode needs a predictor"
        if isinstance(self.old_pass, OptimizerPredictorPass) != (self.predictor == "optimizer"):
            yield "the optimizer predictor and OptimizerPredictorPass go together"
        if self.replay.needs_old_pass_routes and not self.old_pass.records_routes:
            yield f"the mini-steps replay the old pass's routes, which {self.old_pass.mode} mode " \
                  "does not record: use record or predict"

    @property
    def trains_predictor(self) -> bool:
        """The predictor loss trains ``W_p`` (the learned predictor)."""
        return self.predictor == "learned"

    @property
    def builds_predictor(self) -> bool:
        """The routers hold ``W_p`` (learned, or set from the optimizer's step); other methods
        build no predictor, save none and count none."""
        return self.predictor is not None

    @property
    def uses_engine_routes(self) -> bool:
        """The rollout engine must return its routes (R3 transport)."""
        return self.replay.needs_engine_routes

    @property
    def replays(self) -> bool:
        """The mini-steps replay a fixed route (anything but live routing)."""
        return self.replay.replays

    @property
    def ministep_mode(self) -> str:
        """The router mode of the mini-steps."""
        return "replay" if self.replays else "live"

    def old_logprob_pass(self, actor, microbatches, engine_plan, algo):
        """The old-log-prob pass at ``theta_0``; returns the actor's ``PassResult``."""
        return self.old_pass.run(actor, microbatches, engine_plan, algo,
                                 record_predictor_inputs=self.trains_predictor)

    def ministep_plans(self, actor, old, engine_plan):
        """``(m, chunk) -> RoutePlan | None`` for this rollout batch's mini-steps."""
        return self.replay.ministep_plans(actor, old, engine_plan)

    def weight_copies(self, bf16: bool) -> list[WeightCopies]:
        """The host weight copies the method keeps (for the memory estimate)."""
        return [c for c in (self.old_pass.weight_copies(bf16), self.replay.weight_copies(bf16))
                if c is not None]

    def optimizer_problem(self, distributed_optimizer: bool) -> str | None:
        """Why the method cannot train with this optimizer (None: it can)."""
        return self.old_pass.optimizer_problem(distributed_optimizer)


_TABLE = (
    RoutingMethod("none", RouterModePass("live"), LiveReplay(), False,
                  "live top-k everywhere (no replay)"),
    RoutingMethod("r2", RouterModePass("record"), OldPassReplay(), False,
                  "record the old policy's live route, replay it in the mini-steps"),
    RoutingMethod("r3", RouterModePass("replay"), EngineReplay(), False,
                  "replay the rollout engine's routes in every trainer forward"),
    RoutingMethod("pr2", RouterModePass("predict"), OldPassReplay(), False,
                  "route with TopK(p_old + h_old W_p), replay it; train W_p from mini-step 2",
                  "learned"),
    RoutingMethod("pr2-engine", RouterModePass("replay"), EngineReplay(), True,
                  "engine routes with the predictive gate W_r + W_p^T; replay them (R3 transport)",
                  "learned"),
    RoutingMethod("pr2-lookahead", LookaheadPass(), OldPassReplay(), False,
                  "route mini-batch m live at theta_0 + c(m-1)u (u = Adam's next step), "
                  "old log-probs at theta_0 under it; replay it"),
    RoutingMethod("current-route", RouterModePass("record"), CurrentRouteReplay(), False,
                  "zero-staleness reference: each mini-step's live route, old log-probs "
                  "recomputed at theta_0 (a frozen copy) under it; replay it"),
)

ROUTING_METHODS: dict[str, RoutingMethod] = {m.name: m for m in _TABLE}

# (method, --predictor) -> row, for predictors other than the learned one
_PREDICTOR_VARIANTS: dict[tuple[str, str], RoutingMethod] = {
    ("pr2", "optimizer"): RoutingMethod(
        "pr2", OptimizerPredictorPass(), OldPassReplay(), False,
        "route mini-batch m with TopK(p_old + h_old (c(m-1) u_r)^T), u_r = the router "
        "weight's Adam step; replay it", "optimizer"),
}


def routing_method(name: str, predictor: str = "learned") -> RoutingMethod:
    """The table row for ``name`` (with ``--predictor optimizer``, PR2's no-learning variant);
    a ``ValueError`` naming the choices otherwise."""
    try:
        row = ROUTING_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown routing method {name!r}: choose one of "
                         f"{', '.join(ROUTING_METHODS)}") from None
    if predictor not in PREDICTORS:
        raise ValueError(f"--predictor must be one of {', '.join(PREDICTORS)}; got {predictor!r}")
    if predictor == "learned":
        return row
    try:
        return _PREDICTOR_VARIANTS[name, predictor]
    except KeyError:
        variants = ", ".join(n for n, p in _PREDICTOR_VARIANTS if p == predictor)
        raise ValueError(f"--predictor {predictor} is a variant of --routing-method {variants}, "
                         f"not {name}") from None
