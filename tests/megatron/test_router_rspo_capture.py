"""Router log-prob capture for RSPO against ``log_softmax(h W_r^T)`` computed by hand."""

import pytest
import torch

from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.routing.router import ReplayRouter
from tests.megatron.test_router_replay import (
    B,
    S,
    build,
    random_routes,
    tokens_and_positions,
)


def _router_inputs(model):
    """Hook every router; return ``{layer: [h_SBH, ...]}`` filled by each forward."""
    seen, handles = {}, []
    for module in model.modules():
        if isinstance(module, ReplayRouter):
            def hook(router, args):
                seen.setdefault(router.layer_number, []).append(args[0].detach().clone())
            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def _hand_logprobs(router, h_SBH, ids_TK):
    logits = h_SBH.reshape(-1, h_SBH.shape[-1]).float() @ router.weight.detach().float().T
    return torch.log_softmax(logits, dim=-1).gather(1, ids_TK.long())


def _replay_plan(config, layers, mb):
    plan = RoutePlan()
    for layer in layers:
        plan.add(mb, layer, random_routes(S * B, config.num_moe_experts, config.moe_router_topk,
                                          seed=10 + layer))
    return plan


def test_captured_logprobs_are_log_softmax_at_the_replayed_ids(megatron_single_process):
    config, model = build(seed=3)
    tokens, positions = tokens_and_positions(seed=4)
    controller = RoutingController(model)
    routers = controller.routers
    plan = _replay_plan(config, controller.layer_numbers(), mb=7)
    seen, handles = _router_inputs(model)
    try:
        controller.begin_step("replay", plan=plan, capture_router_logprobs=True)
        controller.set_microbatch(7)
        model(tokens, positions, None).sum().backward()
        controller.end_step()
    finally:
        for handle in handles:
            handle.remove()
    captured = controller.router_logprobs(7)
    assert captured.shape == (S * B, len(routers), config.moe_router_topk)
    assert not captured.requires_grad
    for index, router in enumerate(routers):
        ids = plan.get(7, router.layer_number).expert_ids
        expected = _hand_logprobs(router, seen[router.layer_number][0], ids)
        torch.testing.assert_close(captured[:, index], expected, rtol=1e-5, atol=1e-5)
        assert bool((captured[:, index] < 0).all())
    controller.close()


def test_record_mode_captures_the_live_route_and_begin_step_clears(megatron_single_process):
    config, model = build(seed=5)
    tokens, positions = tokens_and_positions(seed=6)
    controller = RoutingController(model)
    seen, handles = _router_inputs(model)
    try:
        controller.begin_step("record", capture_router_logprobs=True)
        controller.set_microbatch(0)
        with torch.no_grad():
            model(tokens, positions, None)
        routes = controller.end_step().routes
    finally:
        for handle in handles:
            handle.remove()
    captured = controller.router_logprobs(0)
    for index, router in enumerate(controller.routers):
        h = seen[router.layer_number][0]
        live_ids = (h.reshape(-1, h.shape[-1]).float() @ router.weight.detach().float().T).topk(
            config.moe_router_topk, dim=-1).indices
        recorded = routes.get(0, router.layer_number).expert_ids.long()
        assert torch.equal(recorded.sort(-1).values, live_ids.sort(-1).values)
        torch.testing.assert_close(captured[:, index], _hand_logprobs(router, h, recorded),
                                   rtol=1e-5, atol=1e-5)
    controller.begin_step("record")
    with pytest.raises(KeyError, match="capture is off"):
        controller.router_logprobs(0)
    controller.close()
