"""``RoutingController``: drives every ``ReplayRouter`` of one model (all its chunks) for a step.

Usage per step (one call of Megatron's ``forward_backward_func``)::

    controller.begin_step("replay", plan=plan, train_predictor=ministep >= 2)
    # in forward_step_func, before calling the model chunk on a micro-batch:
    controller.set_microbatch(microbatch_id)
    ...
    result = controller.end_step()   # recorded routes (a RoutePlan) + per-layer metrics

Micro-batch ids name the same tokens in every pass over a rollout batch (the predict pass and
all mini-steps). A forward pre-hook on each chunk binds its routers to the current id; a
gradient hook on the chunk's output re-binds them when that micro-batch's backward starts, so
activation recompute in backward finds the route its forward consumed (kept per micro-batch
by each router) even under pipeline schedules that interleave micro-batches.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from megatron_pr2.routing.metrics import LayerRoutingMetrics
from megatron_pr2.routing.predictor import PredictorConfig
from megatron_pr2.routing.replay_state import RoutingMode
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.routing.router import ReplayRouter

logger = logging.getLogger(__name__)


class UnconsumedRoutesError(RuntimeError):
    """A step ended with planned routes that no forward used."""


@dataclasses.dataclass
class StepRouting:
    """What a step produced: the routes the routers dispatched, and per-layer metrics."""

    routes: RoutePlan
    metrics: dict[int, LayerRoutingMetrics]

    def metric_summary(self) -> dict[str, float]:
        """Flat ``{"layer_<n>/<metric>": value}`` for logging."""
        return {f"layer_{layer}/{name}": value
                for layer, metrics in sorted(self.metrics.items())
                for name, value in metrics.summary().items()}


def _routers_in(chunk: torch.nn.Module) -> list[ReplayRouter]:
    return [m for m in chunk.modules() if isinstance(m, ReplayRouter)]


def _bind(routers, microbatch_id) -> None:
    for router in routers:
        router.set_microbatch(microbatch_id)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return None


class RoutingController:
    """Finds the ``ReplayRouter`` instances of a model's chunks and sets their routing per step.

    Args:
        model_chunks: a model or a list of chunks (virtual pipeline), possibly DDP-wrapped.
        predictor_config: predictor loss / subsampling settings handed to every router.
    """

    def __init__(self, model_chunks, predictor_config: PredictorConfig | None = None):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.predictor_config = predictor_config or PredictorConfig()
        self._chunk_routers = [_routers_in(chunk) for chunk in chunks]
        self._check_layer_numbers()
        self._pending_microbatch: int | None = None
        self._plan: RoutePlan | None = None
        self._handles = []
        for chunk, routers in zip(chunks, self._chunk_routers):
            if routers:
                self._handles.append(chunk.register_forward_pre_hook(self._pre_hook(routers)))
                self._handles.append(chunk.register_forward_hook(self._post_hook(routers)))

    @property
    def routers(self) -> list[ReplayRouter]:
        """All routers on this rank, ordered by global layer number."""
        return sorted((r for rs in self._chunk_routers for r in rs), key=lambda r: r.layer_number)

    def layer_numbers(self) -> list[int]:
        """Global (1-based) layer numbers of the MoE layers on this rank."""
        return [r.layer_number for r in self.routers]

    def _check_layer_numbers(self) -> None:
        numbers = [r.layer_number for rs in self._chunk_routers for r in rs]
        if any(n is None for n in numbers):
            raise ValueError("a ReplayRouter has no layer_number; build it inside a "
                             "TransformerLayer")
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"ReplayRouter layer numbers repeat: {sorted(numbers)}")
        if not numbers:
            logger.info("no ReplayRouter on this rank (no MoE layers in its stage)")

    # ----------------------------------------------------------------------------- hooks
    def _pre_hook(self, routers):
        def hook(module, args):
            _bind(routers, self._pending_microbatch)
        return hook

    def _post_hook(self, routers):
        def hook(module, args, output):
            mb = self._pending_microbatch
            tensor = _first_tensor(output)
            if mb is not None and tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad: _bind(routers, mb))
        return hook

    def close(self) -> None:
        """Remove the hooks from the model chunks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------- steps
    def begin_step(self, mode, plan: RoutePlan | None = None, train_predictor: bool = False,
                   record_predictor_inputs: bool | None = None,
                   capture_router_logprobs: bool = False) -> None:
        """Set every router's mode for the coming step.

        Args:
            mode: ``live``, ``record``, ``replay`` or ``predict``.
            plan: routes to replay (replay mode), keyed by micro-batch id and global layer.
            train_predictor: attach the predictor loss (mini-steps >= 2 of a rollout batch).
            record_predictor_inputs: keep ``h, p`` for the predictor loss (default: in predict
                mode); recording starts a new rollout batch, so earlier inputs are dropped.
            capture_router_logprobs: keep each router's ``log softmax(p)`` at the dispatched
                experts per micro-batch (RSPO), read with :meth:`router_logprobs`.
        """
        mode = RoutingMode.parse(mode)
        if plan is not None:
            self._check_plan_layers(plan)
        for router in self.routers:
            router.replay_state.reset_step()
            router.set_routing_mode(mode, plan=plan, train_predictor=train_predictor,
                                    predictor_config=self.predictor_config,
                                    record_predictor_inputs=record_predictor_inputs,
                                    capture_router_logprobs=capture_router_logprobs)
            if router.replay_state.record_predictor_inputs:
                router.clear_predictor_samples()
        self._plan = plan
        self._pending_microbatch = None

    def _check_plan_layers(self, plan: RoutePlan) -> None:
        local = set(self.layer_numbers())
        foreign = sorted(set(plan.layer_numbers()) - local)
        if foreign:
            raise ValueError(
                f"route plan has routes for layers {foreign} that are not MoE layers on this rank "
                f"(this rank's MoE layers: {sorted(local)}); split plans by pipeline stage"
            )

    def set_microbatch(self, microbatch_id: int) -> None:
        """Name the micro-batch of the next model-chunk forward."""
        if self._plan is not None and microbatch_id not in self._plan.microbatch_ids() \
                and self._plan.routes:
            raise KeyError(
                f"micro-batch {microbatch_id} is not in the route plan "
                f"(planned micro-batches: {self._plan.microbatch_ids()})"
            )
        self._pending_microbatch = int(microbatch_id)

    def router_logprobs(self, microbatch_id: int) -> torch.Tensor:
        """``[N, L_local, K]`` captured router log-probs of a micro-batch, layers in global order.

        Rows are the routers' token order (sequence-first ``s * B + b``); kept until the next
        :meth:`begin_step`.
        """
        routers = self.routers
        if not routers:
            raise ValueError("no ReplayRouter on this rank: there are no router log-probs")
        return torch.stack([router.router_logprobs(microbatch_id) for router in routers], dim=1)

    def end_step(self) -> StepRouting:
        """Check every planned route was used, collect routes and metrics, reset step state.

        Raises:
            UnconsumedRoutesError: a planned ``(micro-batch, layer)`` route was never dispatched.
        """
        missing = [key for router in self.routers for key in router.unconsumed_plan_keys()]
        if missing:
            raise UnconsumedRoutesError(
                f"{len(missing)} planned routes were not consumed in this step "
                f"(micro-batch, layer): {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        routes = RoutePlan()
        metrics = {}
        for router in self.routers:
            for mb, layer_routes in sorted(router.consumed_routes().items()):
                routes.add(mb, router.layer_number, layer_routes)
            metrics[router.layer_number] = router.replay_state.metrics
            router.replay_state.reset_step()
        self._pending_microbatch = None
        return StepRouting(routes=routes, metrics=metrics)

    def abort_step(self) -> None:
        """Drop this step's routing state without checks (e.g. after an exception)."""
        for router in self.routers:
            router.replay_state.reset_step()
        self._pending_microbatch = None

    def clear_predictor_samples(self) -> None:
        """Drop every router's recorded predictor inputs."""
        for router in self.routers:
            router.clear_predictor_samples()
