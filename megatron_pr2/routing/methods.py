"""What each routing method means: one frozen table that config, the RL loop, validate and
compare all read (docs/method.md explains the methods).

Adding a method = one row here + its implementation (a new old-pass mode or replay source).
This module is pure Python: no torch, no Megatron.
"""

from __future__ import annotations

import dataclasses

PREDICTORS = ("learned", "optimizer")


@dataclasses.dataclass(frozen=True)
class RoutingMethod:
    """One routing method of the trainer.

    Attributes:
        name: the ``--routing-method`` value.
        old_pass_mode: router mode in the old-log-prob pass (``live`` | ``record`` | ``replay``
            | ``predict``).
        replay_source: where the mini-steps' routes come from: ``None`` (route live),
            ``"old_pass"`` (the routes recorded/predicted in the old-log-prob pass),
            ``"engine"`` (the rollout engine's routes, R3 transport), ``"lookahead"``
            (mini-batch ``m`` recorded at ``theta_0 + c (m-1) u``, ``u`` = Adam's next step,
            then replayed in the old pass at ``theta_0``; :mod:`megatron_pr2.training.lookahead`)
            or ``"current"`` (the current router's live route at each mini-step, with the old
            log-probs recomputed at ``theta_0`` under it; :mod:`megatron_pr2.training.current_route`).
        predictive_engine_gate: weight sync writes ``W_r + W_p^T`` as the engine's gate (needs
            the learned predictor).
        summary: one line for tables and ``--help``.
        predictor: where PR2's evolution predictor comes from: ``"learned"`` (``W_p``
            trained by the predictor loss, as the paper defines it), ``"optimizer"`` (``W_p`` =
            ``c (m-1) u_r``, the router weight's Adam step, per mini-batch; no learning) or
            ``None`` (no predictor).
    """

    name: str
    old_pass_mode: str
    replay_source: str | None
    predictive_engine_gate: bool
    summary: str
    predictor: str | None = None

    def __post_init__(self):
        if self.predictor not in (None, *PREDICTORS):
            raise ValueError(f"{self.name}: predictor must be None or one of {PREDICTORS}")
        if self.predictive_engine_gate and self.predictor != "learned":
            raise ValueError(f"{self.name}: the predictive engine gate folds in a learned W_p")

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
        return self.replay_source == "engine"

    @property
    def replays(self) -> bool:
        """The mini-steps replay a fixed route (anything but live routing)."""
        return self.replay_source is not None


_TABLE = (
    RoutingMethod("none", "live", None, False,
                  "live top-k everywhere (no replay)"),
    RoutingMethod("r2", "record", "old_pass", False,
                  "record the old policy's live route, replay it in the mini-steps"),
    RoutingMethod("r3", "replay", "engine", False,
                  "replay the rollout engine's routes in every trainer forward"),
    RoutingMethod("pr2", "predict", "old_pass", False,
                  "route with TopK(p_old + h_old W_p), replay it; train W_p from mini-step 2",
                  "learned"),
    RoutingMethod("pr2-engine", "replay", "engine", True,
                  "engine routes with the predictive gate W_r + W_p^T; replay them (R3 transport)",
                  "learned"),
    RoutingMethod("pr2-lookahead", "record", "lookahead", False,
                  "route mini-batch m live at theta_0 + c(m-1)u (u = Adam's next step), "
                  "old log-probs at theta_0 under it; replay it"),
    RoutingMethod("current-route", "record", "current", False,
                  "zero-staleness reference: each mini-step's live route, old log-probs "
                  "recomputed at theta_0 (a frozen copy) under it; replay it"),
)

ROUTING_METHODS: dict[str, RoutingMethod] = {m.name: m for m in _TABLE}


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
    if name != "pr2":
        raise ValueError(f"--predictor optimizer is a variant of --routing-method pr2, not {name}")
    return dataclasses.replace(
        row, predictor="optimizer",
        summary="route mini-batch m with TopK(p_old + h_old (c(m-1) u_r)^T), u_r = the router "
                "weight's Adam step; replay it")
