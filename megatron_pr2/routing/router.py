"""``ReplayRouter``: Megatron-Core's ``TopKRouter`` with live / record / replay / predict routing.

Injected through the layer spec (``ModelOptions(router_class=ReplayRouter)`` ->
``MoESubmodules(router=...)``). All routing state lives in the instance
(:class:`~megatron_pr2.routing.replay_state.RouterReplayState`), bound to routes by the
router's global 1-based ``layer_number`` (set by Megatron, pipeline offset included).

Gate semantics (the same code path as Megatron's live routing, via :mod:`.route_selector`):
the router always computes ``p = h W_r^T`` from its current weights, the route only decides
*which* experts; the gates are the current scores at those experts. With
``moe_router_pre_softmax=False`` (Qwen3, ``norm_topk_prob=True``) the gates are
``softmax`` of the current logits restricted to the route (renormalised over it); with
``moe_router_pre_softmax=True`` (Qwen2, ``norm_topk_prob=False``) they are the full-softmax
probabilities at the route's experts, *not* renormalised, exactly as in live routing. In both
cases gradients reach ``W_r``. Predict mode selects ``TopK`` of the scores of ``p + h W_p``
(``W_p`` detached) and gates it like a replayed route, so a later replay at the same weights
reproduces the predict pass bit for bit.
"""

from __future__ import annotations

import logging
import os
import zlib

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

from megatron_pr2.platform.device import to_device, to_host
from megatron_pr2.rl.losses import gather_router_logprobs
from megatron_pr2.routing.metrics import predictor_stats
from megatron_pr2.routing.predictor import EvolutionPredictor, PredictorConfig
from megatron_pr2.routing.predictor_loss import predictor_loss
from megatron_pr2.routing.replay_state import (
    PredictorSample,
    RouterReplayState,
    RoutingMode,
)
from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan, compact_route_dtype
from megatron_pr2.routing.route_selector import RouteRequest, RouteSelector

DEBUG_ROUTES_ENV = "MEGATRON_PR2_DEBUG_ROUTES"  # 1: also check device-resident replayed routes

logger = logging.getLogger(__name__)


class RouteError(ValueError):
    """A route given to a router does not fit it (shape, expert ids, duplicates)."""


class ReplayRouter(TopKRouter):
    """Top-k router with per-instance routing modes and an evolution predictor ``W_p``.

    Args:
        config: Megatron ``TransformerConfig``.
        pg_collection: process groups (passed by ``MoELayer``).
        use_predictor: build the zero-initialised evolution predictor (a module parameter,
            saved with the model).
    """

    def __init__(self, config, pg_collection=None, use_predictor: bool = True):
        if getattr(config, "moe_enable_routing_replay", False):
            raise ValueError(
                "moe_enable_routing_replay=True turns on Megatron's RouterReplay (a global "
                "registry); ReplayRouter replays routes per instance: leave it False"
            )
        super().__init__(config=config, pg_collection=pg_collection)
        self.route_selector = RouteSelector()
        self.router_replay = self.route_selector  # Megatron's routing function asks it for top-k
        self.predictor = (
            EvolutionPredictor(config.hidden_size, config.num_moe_experts,
                               config.sequence_parallel, config.params_dtype)
            if use_predictor else None
        )
        self.replay_state = RouterReplayState()

    # ----------------------------------------------------------------------------- control
    def set_routing_mode(self, mode, plan: RoutePlan | None = None, train_predictor: bool = False,
                         predictor_config: PredictorConfig | None = None,
                         record_predictor_inputs: bool | None = None,
                         capture_router_logprobs: bool = False) -> None:
        """Choose the routing mode (and the plan for replay) for the coming forwards.

        Args:
            mode: ``live``, ``record``, ``replay`` or ``predict``.
            plan: the routes to replay (replay mode).
            train_predictor: attach the predictor loss (needs recorded predictor inputs for
                every micro-batch).
            predictor_config: loss variant, subsampling.
            record_predictor_inputs: keep (subsampled) ``h, p`` per micro-batch for the
                predictor loss; default: in predict mode only. Set it for a replayed old-log-prob
                pass whose routes came from the engine's predictive gate (R3 transport).
            capture_router_logprobs: keep, per micro-batch, the detached ``log softmax(p)`` at
                the dispatched experts (RSPO); earlier captures are dropped.
        """
        mode = RoutingMode.parse(mode)
        if record_predictor_inputs is None:
            record_predictor_inputs = mode is RoutingMode.PREDICT
        if mode is not RoutingMode.LIVE:
            self._refuse_unsupported_config(mode)
        if mode is RoutingMode.REPLAY and plan is None:
            raise ValueError(f"layer {self.layer_number}: replay mode needs a route plan")
        if record_predictor_inputs and train_predictor:
            raise ValueError(
                f"layer {self.layer_number}: the predictor loss cannot be trained in the pass "
                "that records its inputs (its target p_cur comes from a later mini-step)")
        needs = ("predict mode" if mode is RoutingMode.PREDICT else
                 "predictor training" if train_predictor else
                 "recording predictor inputs" if record_predictor_inputs else None)
        if needs and self.predictor is None:
            raise ValueError(f"layer {self.layer_number}: {needs} needs the evolution predictor "
                             "(ReplayRouter(use_predictor=True))")
        state = self.replay_state
        state.mode = mode
        state.plan = plan
        state.train_predictor = bool(train_predictor)
        state.record_predictor_inputs = bool(record_predictor_inputs)
        state.capture_router_logprobs = bool(capture_router_logprobs)
        state.router_logprobs = {}
        if predictor_config is not None:
            state.predictor_config = predictor_config

    def set_microbatch(self, microbatch_id: int | None) -> None:
        """Bind the coming forward (or backward recompute) to a micro-batch id."""
        self.replay_state.microbatch_id = microbatch_id

    def consumed_routes(self) -> dict[int, LayerRoutes]:
        """The routes dispatched in this step, by micro-batch id (compact, all rows valid)."""
        return {mb: LayerRoutes(ids, torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
                for mb, ids in self.replay_state.consumed.items()}

    def router_logprobs(self, microbatch_id: int) -> torch.Tensor:
        """``[N, K]`` fp32 ``log softmax(p)`` at the dispatched experts of a micro-batch.

        Captured on the micro-batch's first forward since ``set_routing_mode`` (router token
        order, sequence-first rows ``s * B + b``; the columns follow the route's id order).
        """
        state = self.replay_state
        if microbatch_id not in state.router_logprobs:
            why = ("capture is off (set_routing_mode(..., capture_router_logprobs=True))"
                   if not state.capture_router_logprobs else
                   f"captured micro-batches: {sorted(state.router_logprobs)}")
            raise KeyError(f"layer {self.layer_number}: no router log-probs for micro-batch "
                           f"{microbatch_id}; {why}")
        return state.router_logprobs[microbatch_id]

    def unconsumed_plan_keys(self) -> list[tuple[int, int]]:
        """Planned ``(micro-batch, layer)`` keys of this router not dispatched in this step."""
        state = self.replay_state
        if state.mode is not RoutingMode.REPLAY or state.plan is None:
            return []
        return [key for key in state.plan.keys_for_layer(self.layer_number)
                if key[0] not in state.consumed]

    def clear_predictor_samples(self) -> None:
        """Drop the recorded ``h_old, p_old`` (at the start of a new rollout batch)."""
        self.replay_state.predictor_samples = {}

    def _refuse_unsupported_config(self, mode: RoutingMode) -> None:
        cfg = self.config
        refusals = [
            (cfg.moe_router_fusion, ("moe_router_fusion=True (the fused TE top-k kernel bypasses "
                                     "route replay/recording in Megatron-Core)")),
            (self.routing_type == "sinkhorn", "moe_router_load_balancing_type='sinkhorn'"),
            (cfg.moe_expert_capacity_factor is not None,
             "moe_expert_capacity_factor (token dropping would change the dispatched route)"),
            (cfg.moe_router_force_load_balancing, "moe_router_force_load_balancing=True"),
        ]
        for refused, what in refusals:
            if refused:
                raise ValueError(f"routing mode {mode.value!r} cannot be used with {what}")

    # ----------------------------------------------------------------------------- seams
    # Megatron's ``TopKRouter.forward`` runs jitter -> ``gating`` -> (forced load balancing) ->
    # ``routing``; this router overrides the two seams and leaves ``forward`` to Megatron, so
    # steps a newer Megatron adds there still run.
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Megatron's gating ``p = h W_r^T``, keeping ``h`` for :meth:`routing` of this forward.

        ``h`` (the jittered router input) is what predict mode and the predictor samples need;
        :meth:`routing` takes it back (and clears it) in the same ``forward`` call.
        """
        self._gating_input = input
        return super().gating(input)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Megatron's routing with this router's mode applied to the top-k selection.

        Args:
            logits: ``[S, B, E]`` router logits (the local slice under SP).
            padding_mask: ``[S, B]`` bool, True at pad tokens (Megatron's convention); pad rows
                are left out of the recorded predictor inputs and the routing metrics.
        """
        hidden, self._gating_input = getattr(self, "_gating_input", None), None
        state = self.replay_state
        mb = state.microbatch_id
        if state.mode is RoutingMode.LIVE and mb is None:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            return self._keep_predictor_in_graph(probs), routing_map
        if mb is None:
            raise RuntimeError(
                f"layer {self.layer_number}: routing mode {state.mode.value!r} needs a micro-batch "
                "id; call RoutingController.set_microbatch(id) before each micro-batch forward"
            )
        if hidden is None:
            raise RuntimeError(f"layer {self.layer_number}: routing() runs inside forward(), "
                               "after gating()")
        if state.mode is not RoutingMode.LIVE:
            self._refuse_unsupported_config(state.mode)
        hidden_TH = hidden.reshape(-1, hidden.shape[-1])
        logits_TE = logits.reshape(-1, self.num_experts)
        pad_T = padding_mask.reshape(-1).bool() if padding_mask is not None else None
        revisit = mb in state.consumed
        request = self._route_request(hidden_TH, logits_TE, mb, revisit)
        self.route_selector.request = request
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            self.route_selector.request = None
        if not revisit:
            self._record_first_visit(hidden_TH, logits_TE, request, pad_T, mb)
        probs = self._apply_predictor_loss(probs, logits_TE, pad_T, mb, revisit)
        return probs, routing_map

    def _route_request(self, hidden_TH, logits_TE, mb: int, revisit: bool) -> RouteRequest:
        state = self.replay_state
        num_rows = logits_TE.shape[0]
        if revisit:  # activation recompute (or a repeated forward): the forward's own route,
            # every row of it (valid_T None: the selector need not read a mask off the device)
            ids = state.consumed[mb].to(device=logits_TE.device, dtype=torch.long)
            return RouteRequest(forced_ids_TK=ids)
        if state.mode is RoutingMode.REPLAY:
            routes = state.plan.get(mb, self.layer_number)
            ids = self._checked_route_ids(routes, num_rows, mb, logits_TE.device)
            return RouteRequest(forced_ids_TK=ids, valid_T=routes.valid.to(logits_TE.device),
                                want_live_ids=True)
        if state.mode is RoutingMode.PREDICT:
            with torch.no_grad():
                delta_TE = self.predictor(hidden_TH.detach())
                scores = self._selection_scores(logits_TE.detach() + delta_TE)
            return RouteRequest(selection_scores_TE=scores)
        return RouteRequest()

    def _selection_scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The scores Megatron's top-k selects from, for given logits (see its routing fn)."""
        if self.score_function == "softmax":
            if self.config.moe_router_pre_softmax:
                return torch.softmax(logits_TE, dim=-1, dtype=torch.float32).type_as(logits_TE)
            return logits_TE
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits_TE.float()).type_as(logits_TE)
            return scores + self.expert_bias if self.expert_bias is not None else scores
        raise ValueError(f"unsupported moe_router_score_function {self.score_function!r}")

    def _checked_route_ids(self, routes: LayerRoutes, num_rows: int, mb: int, device) -> torch.Tensor:
        where = f"layer {self.layer_number}, micro-batch {mb}"
        if tuple(routes.expert_ids.shape) != (num_rows, self.topk):
            raise RouteError(
                f"{where}: route plan has expert ids of shape {tuple(routes.expert_ids.shape)} "
                f"but the router sees {num_rows} tokens x top-{self.topk} (router token order: "
                "sequence-first [S*B], this rank's sequence-parallel slice)"
            )
        if routes.expert_ids.dtype.is_floating_point:
            raise RouteError(f"{where}: expert ids must be integers, got {routes.expert_ids.dtype}")
        if routes.expert_ids.device.type == "cpu" or os.environ.get(DEBUG_ROUTES_ENV) == "1":
            self._check_route_values(routes.widened(), routes.valid, where)
        return routes.widened(device)

    def _check_route_values(self, ids: torch.Tensor, valid: torch.Tensor, where: str) -> None:
        """Expert ids in range and distinct per valid row. Run where the ids are: on the host
        for a plan built there (engine routes: no device sync); device-resident ids (this
        router's own top-k, recorded) are checked only under ``MEGATRON_PR2_DEBUG_ROUTES=1``,
        as each check there syncs the device."""
        used = ids[valid]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.num_experts):
            raise RouteError(
                f"{where}: expert ids out of range [0, {self.num_experts}): "
                f"min {int(used.min())}, max {int(used.max())}"
            )
        if self.topk > 1 and used.numel():
            ordered = used.sort(dim=-1).values
            dup_rows = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
            if bool(dup_rows.any()):
                row = int(valid.nonzero()[dup_rows.nonzero()[0, 0]])
                raise RouteError(
                    f"{where}: row {row} repeats an expert ({ids[row].tolist()}); mark rows "
                    "without a route invalid instead of filling them"
                )

    # ----------------------------------------------------------------------------- recording
    def _record_first_visit(self, hidden_TH, logits_TE, request: RouteRequest, pad_T, mb: int):
        state = self.replay_state
        state.consumed[mb] = request.chosen_ids_TK.detach().to(compact_route_dtype(self.num_experts))
        if state.mode is RoutingMode.REPLAY:
            valid = request.valid_T if pad_T is None else request.valid_T & ~pad_T
            state.metrics.add_replay(request.chosen_ids_TK[valid], request.live_ids_TK[valid])
        if state.record_predictor_inputs:
            state.predictor_samples[mb] = self._sample_predictor_inputs(hidden_TH, logits_TE, pad_T, mb)
        if state.capture_router_logprobs:
            state.router_logprobs[mb] = gather_router_logprobs(logits_TE.detach(),
                                                               request.chosen_ids_TK)

    def _sample_predictor_inputs(self, hidden_TH, logits_TE, pad_T, mb: int) -> PredictorSample:
        cfg = self.replay_state.predictor_config
        rows = torch.arange(logits_TE.shape[0], device=logits_TE.device)
        if pad_T is not None:
            rows = rows[~pad_T]
        if cfg.sample_ratio < 1.0 and rows.numel():
            count = max(1, round(cfg.sample_ratio * rows.numel()))
            seed = zlib.crc32(f"{cfg.seed}/{self.layer_number}/{mb}".encode())
            pick = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))
            rows = rows[pick[:count].sort().values.to(rows.device)]
        return PredictorSample(
            token_rows=to_host(rows),
            hidden_TH=to_host(hidden_TH.detach()[rows].float()),  # d floats/token: off the GPU
            logits_TE=to_host(logits_TE.detach()[rows].float()),
            num_rows=logits_TE.shape[0],
        )

    # ----------------------------------------------------------------------------- predictor
    def _apply_predictor_loss(self, probs, logits_TE, pad_T, mb: int, revisit: bool):
        state = self.replay_state
        attach = torch.is_grad_enabled() and mb not in state.predictor_loss_attached
        if not state.train_predictor:
            if attach and self._predictor_trainable():
                state.predictor_loss_attached.add(mb)  # where the loss would attach: same counts
                return self._keep_predictor_in_graph(probs)
            return probs
        sample = state.predictor_samples.get(mb)
        if sample is None:
            raise RouteError(
                f"layer {self.layer_number}: no predictor inputs were recorded for micro-batch "
                f"{mb} (recorded: {sorted(state.predictor_samples)}); the predict pass (or a pass "
                "with record_predictor_inputs) must run over the same micro-batch ids first"
            )
        if revisit and not attach:
            return probs
        if sample.num_rows != logits_TE.shape[0]:
            raise RouteError(
                f"layer {self.layer_number}, micro-batch {mb}: predictor inputs were recorded on "
                f"{sample.num_rows} tokens but this forward has {logits_TE.shape[0]}; micro-batch "
                "ids must name the same tokens in the predict pass and the mini-steps"
            )
        rows = to_device(sample.token_rows)
        logits_old = to_device(sample.logits_TE)
        delta = self.predictor(to_device(sample.hidden_TH))
        logits_cur = logits_TE.detach()[rows]
        per_token = predictor_loss(state.predictor_config.loss, logits_cur, logits_old, delta)
        loss = per_token.sum() / (max(per_token.numel(), 1) * self._token_split_size())
        if not revisit:
            state.metrics.add_predictor(predictor_stats(logits_cur, logits_old, delta, self.topk),
                                        float(per_token.detach().mean()))
        if attach:
            if self.calculate_per_token_loss:  # as Megatron scales its aux losses
                loss = loss * unpadded_token_count(pad_T, logits_TE.shape[0])
            probs = MoEAuxLossAutoScaler.apply(probs, loss)
            state.predictor_loss_attached.add(mb)
        return probs

    def _predictor_trainable(self) -> bool:
        return self.predictor is not None and self.predictor.weight.requires_grad

    def _keep_predictor_in_graph(self, probs):
        """``probs`` unchanged, with a zero gradient for ``W_p`` in a backward without the
        predictor loss.

        Megatron's DDP with ``overlap_grad_reduce`` starts a bucket's reduction once every
        parameter in it has reported its gradient, as many times as in its first iteration; a
        ``W_p`` without one (mini-step 1, warm-up, the optimizer predictor) would break that.
        """
        if not (torch.is_grad_enabled() and self._predictor_trainable()):
            return probs
        return _ZeroGradient.apply(probs, self.predictor.weight)

    def _token_split_size(self) -> int:
        """Ranks that each hold a slice of the tokens and sum ``W_p``'s gradient (TP under SP)."""
        return self.tp_group.size() if self.config.sequence_parallel else 1


def unpadded_token_count(pad_T: torch.Tensor | None, num_rows: int):
    """Tokens that are not padding: a device tensor (no host read-back), or ``num_rows``."""
    return (~pad_T).sum() if pad_T is not None else num_rows


class _ZeroGradient(torch.autograd.Function):
    """Identity on ``output``; ``weight`` gets a zero gradient (it joins the backward graph)."""

    @staticmethod
    def forward(ctx, output, weight):
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.weight_meta
        return grad_output, torch.zeros(shape, dtype=dtype, device=device)
