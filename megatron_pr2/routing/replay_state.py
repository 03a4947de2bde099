"""Per-router routing state: mode, route plan, micro-batch id, consumed routes, predictor samples,
captured router log-probs (RSPO).

Everything here belongs to one router instance (no class-level registries): the controller
sets it, the router reads and fills it.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from megatron_pr2.routing.metrics import LayerRoutingMetrics
from megatron_pr2.routing.predictor import PredictorConfig
from megatron_pr2.routing.route_plan import RoutePlan


class RoutingMode(str, enum.Enum):
    """How a router chooses experts.

    - ``live``: ``TopK`` of the current scores (Megatron's own routing). With a micro-batch id
      set, the dispatched route is remembered (as in every mode).
    - ``record``: exactly ``live``, except that settings which would make a replayed route differ
      from the recorded one (token dropping, fused top-k, ...) are refused up front (R2's
      old-log-prob pass, whose routes the mini-steps replay).
    - ``replay``: dispatch to the route plan's experts (R2/R3), gates from current scores.
    - ``predict``: route with ``TopK(p + h W_p)``, remember it and (subsampled) ``h, p`` (PR2).
    """

    LIVE = "live"
    RECORD = "record"
    REPLAY = "replay"
    PREDICT = "predict"

    @classmethod
    def parse(cls, value) -> RoutingMode:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown routing mode {value!r}; choose one of {', '.join(m.value for m in cls)}"
            ) from None


@dataclasses.dataclass
class PredictorSample:
    """Detached inputs of the predictor loss for one micro-batch, recorded in predict mode.

    Attributes:
        token_rows: ``[n]`` int64 rows (router token order) that were sampled.
        hidden_TH: ``[n, H]`` fp32 router inputs ``h_old``.
        logits_TE: ``[n, E]`` fp32 router logits ``p_old``.
        num_rows: rows of the micro-batch (checked when the sample is used).
    """

    token_rows: torch.Tensor
    hidden_TH: torch.Tensor
    logits_TE: torch.Tensor
    num_rows: int


@dataclasses.dataclass
class RouterReplayState:
    """The routing state of one router instance."""

    mode: RoutingMode = RoutingMode.LIVE
    plan: RoutePlan | None = None
    microbatch_id: int | None = None
    train_predictor: bool = False
    record_predictor_inputs: bool = False
    capture_router_logprobs: bool = False
    predictor_config: PredictorConfig = dataclasses.field(default_factory=PredictorConfig)
    consumed: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    predictor_loss_attached: set[int] = dataclasses.field(default_factory=set)
    predictor_samples: dict[int, PredictorSample] = dataclasses.field(default_factory=dict)
    router_logprobs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    metrics: LayerRoutingMetrics = dataclasses.field(default_factory=LayerRoutingMetrics)

    def reset_step(self) -> None:
        """Forget this step's consumed routes and metrics (predictor samples are kept)."""
        self.consumed = {}
        self.predictor_loss_attached = set()
        self.metrics = LayerRoutingMetrics()
        self.microbatch_id = None
