"""ReplayRouter replay (R2/R3) against MoE forwards computed by hand from the same weights."""

import pytest
import torch
import torch.nn.functional as F

from megatron_pr2.models import ModelOptions, build_model
from megatron_pr2.models.presets import preset
from megatron_pr2.platform import seed_model_parallel
from megatron_pr2.routing.controller import RoutingController, UnconsumedRoutesError
from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan
from megatron_pr2.routing.router import ReplayRouter, RouteError

S, B = 6, 2


def build(name="tiny-qwen3-moe", seed=0, hf_overrides=None, **config_overrides):
    seed_model_parallel(seed)
    _, config, model = build_model(
        preset(name, **(hf_overrides or {})),
        options=ModelOptions(router_class=ReplayRouter, config_overrides=config_overrides))
    return config, model


def tokens_and_positions(seed=0, s=S, b=B):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (b, s), generator=gen)
    return tokens, torch.arange(s).expand(b, -1)


def random_routes(num_rows, num_experts, k, seed, invalid_rows=()):
    """Distinct random expert ids per row (not the live route), some rows invalid."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_rows)])
    valid = torch.ones(num_rows, dtype=torch.bool)
    valid[list(invalid_rows)] = False
    return LayerRoutes.from_expert_ids(ids, num_experts, valid)


def swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.T


def hand_moe(mlp, x_SBH, routes, router_weight=None):
    """The MoE layer by hand: experts forced to ``routes`` (invalid rows: live top-k)."""
    config = mlp.config
    x = x_SBH.reshape(-1, x_SBH.shape[-1]).float()
    weight = mlp.router.weight if router_weight is None else router_weight
    logits = x @ weight.T
    live = logits.topk(config.moe_router_topk, dim=-1).indices
    ids = torch.where(routes.valid.unsqueeze(-1), routes.expert_ids.long(), live)
    if config.moe_router_pre_softmax:  # Qwen2 (norm_topk_prob=False): probabilities, no renorm
        gates = torch.softmax(logits, dim=-1).gather(1, ids)
    else:  # Qwen3 (norm_topk_prob=True): softmax over the chosen logits
        gates = torch.softmax(logits.gather(1, ids), dim=-1)
    out = torch.zeros_like(x)
    for e, expert in enumerate(mlp.experts.local_experts):
        y = swiglu(x, expert.linear_fc1.weight, expert.linear_fc2.weight)
        out = out + (gates * (ids == e)).sum(-1, keepdim=True) * y
    if mlp.shared_experts is not None:
        shared = mlp.shared_experts
        y = swiglu(x, shared.linear_fc1.weight, shared.linear_fc2.weight)
        out = out + torch.sigmoid(x @ shared.gate_weight.T) * y
    return out.view_as(x_SBH), ids


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_replayed_moe_layer_equals_hand_forward_and_router_gets_its_gradient(
        megatron_single_process, name, dispatcher):
    config, model = build(name, moe_token_dispatcher_type=dispatcher)
    mlp = model.decoder.layers[1].mlp
    router = mlp.router
    x = torch.randn(S, B, config.hidden_size, generator=torch.Generator().manual_seed(1))
    routes = random_routes(S * B, config.num_moe_experts, config.moe_router_topk, seed=2,
                           invalid_rows=(0, 5))
    plan = RoutePlan()
    plan.add(0, router.layer_number, routes)
    router.set_routing_mode("replay", plan=plan)
    router.set_microbatch(0)
    probe = torch.randn(S, B, config.hidden_size)
    out, _ = mlp(x)
    (out * probe).sum().backward()

    weight = router.weight.detach().clone().requires_grad_(True)
    expected, ids = hand_moe(mlp, x, routes, router_weight=weight)
    (expected * probe).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-7)
    # the invalid rows were routed live, the valid ones exactly as planned
    dispatched = router.consumed_routes()[0].expert_ids.long()
    assert torch.equal(dispatched, ids)
    assert torch.equal(dispatched[routes.valid], routes.expert_ids.long()[routes.valid])


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_replayed_model_logits_equal_model_with_hand_computed_moe_layers(
        megatron_single_process, name, dispatcher):
    config, model = build(name, seed=3, moe_token_dispatcher_type=dispatcher)
    tokens, positions = tokens_and_positions(seed=4)
    controller = RoutingController(model)
    plan = RoutePlan()
    for layer in controller.layer_numbers():
        plan.add(7, layer, random_routes(S * B, config.num_moe_experts, config.moe_router_topk,
                                         seed=layer, invalid_rows=(layer,)))
    controller.begin_step("replay", plan=plan)
    controller.set_microbatch(7)
    replayed = model(tokens, positions, None)
    replayed.sum().backward()
    controller.end_step()
    controller.close()
    for layer in model.decoder.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0

    handles = []
    for layer in model.decoder.layers:
        routes = plan.get(7, layer.layer_number)
        handles.append(layer.mlp.register_forward_hook(
            lambda mod, args, out, routes=routes: (hand_moe(mod, args[0], routes)[0], None)))
        layer.mlp.router.set_routing_mode("live")
    with torch.no_grad():
        expected = model(tokens, positions, None)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=2e-5)


def test_replaying_recorded_live_routes_reproduces_live_forward_bitwise(megatron_single_process):
    _, model = build(seed=5)
    tokens, positions = tokens_and_positions(seed=6)
    with torch.no_grad():
        live = model(tokens, positions, None)
    controller = RoutingController(model)
    controller.begin_step("record")
    controller.set_microbatch(0)
    with torch.no_grad():
        recorded = model(tokens, positions, None)
    plan = controller.end_step().routes
    controller.begin_step("replay", plan=plan)
    controller.set_microbatch(0)
    with torch.no_grad():
        replayed = model(tokens, positions, None)
    step = controller.end_step()
    assert torch.equal(live, recorded) and torch.equal(live, replayed)
    assert all(m.summary()["zero_deviation_ratio"] == 1.0 for m in step.metrics.values())
    assert plan.layer_numbers() == [1, 2, 3, 4]
    assert all(r.expert_ids.dtype == torch.uint8 for r in plan.routes.values())


def test_zero_deviation_metric_counts_replayed_rows_that_match_live(megatron_single_process):
    config, model = build(seed=8)
    tokens, positions = tokens_and_positions(seed=9)
    controller = RoutingController(model)
    controller.begin_step("record")
    controller.set_microbatch(0)
    with torch.no_grad():
        model(tokens, positions, None)
    live_plan = controller.end_step().routes
    # replace the first 4 rows of layer 1 by a route that differs from the live one in one expert
    routes = live_plan.get(0, 1)
    ids = routes.expert_ids.long().clone()
    for row in range(4):
        spare = next(e for e in range(config.num_moe_experts) if e not in ids[row].tolist())
        ids[row, 1] = spare
    live_plan.routes[(0, 1)] = LayerRoutes.from_expert_ids(ids, config.num_moe_experts)
    controller.begin_step("replay", plan=live_plan)
    controller.set_microbatch(0)
    with torch.no_grad():
        model(tokens, positions, None)
    summary = controller.end_step().metrics[1].summary()
    n = S * B
    assert summary["zero_deviation_ratio"] == pytest.approx((n - 4) / n)
    assert summary["topk_overlap"] == pytest.approx((n - 4 + 4 * 0.5) / n)


def _replay_one(model, plan, mb=0, tokens=None):
    tokens, positions = tokens_and_positions() if tokens is None else tokens
    controller = RoutingController(model)
    try:
        controller.begin_step("replay", plan=plan)
        controller.set_microbatch(mb)
        with torch.no_grad():
            model(tokens, positions, None)
        return controller.end_step()
    finally:
        controller.close()


def _plan_for(layer_routes: dict, mb=0):
    plan = RoutePlan()
    for layer, routes in layer_routes.items():
        plan.add(mb, layer, routes)
    return plan


def _good_routes(config, rows=S * B):
    return random_routes(rows, config.num_moe_experts, config.moe_router_topk, seed=0)


@pytest.mark.parametrize("problem,match", [
    ("range", r"expert ids out of range \[0, 8\): min 0, max 8"),
    ("shape", r"expert ids of shape \(11, 2\) but the router sees 12 tokens x top-2"),
    ("duplicate", r"row 3 repeats an expert \(\[5, 5\]\)"),
])
def test_bad_routes_are_refused_with_the_reason(megatron_single_process, problem, match):
    config, model = build()
    routes = _good_routes(config)
    ids = routes.expert_ids.long().clone()
    if problem == "range":
        ids[2, 0] = 8
    elif problem == "duplicate":
        ids[3] = torch.tensor([5, 5])
    else:
        ids = ids[:-1]
    bad = LayerRoutes(ids.to(torch.int16), torch.ones(ids.shape[0], dtype=torch.bool))
    plan = _plan_for({1: bad, 2: routes, 3: routes, 4: routes})
    with pytest.raises(RouteError, match=match):
        _replay_one(model, plan)


def test_duplicates_in_invalid_rows_are_allowed(megatron_single_process):
    config, model = build()
    routes = _good_routes(config)
    ids = routes.expert_ids.long().clone()
    ids[3] = torch.tensor([0, 0])  # a constant fill marked invalid is never used
    valid = torch.ones(S * B, dtype=torch.bool)
    valid[3] = False
    plan = _plan_for({layer: LayerRoutes.from_expert_ids(ids, 8, valid) for layer in (1, 2, 3, 4)})
    _replay_one(model, plan)


def test_missing_unconsumed_and_foreign_routes_are_errors(megatron_single_process):
    config, model = build()
    routes = _good_routes(config)
    plan = _plan_for({layer: routes for layer in (1, 2, 3, 4)}, mb=0)
    for layer in (1, 2, 3, 4):
        plan.add(1, layer, routes)
    controller = RoutingController(model)
    controller.begin_step("replay", plan=plan)
    controller.set_microbatch(0)
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        model(tokens, positions, None)
    with pytest.raises(UnconsumedRoutesError, match=r"4 planned routes were not consumed in this step \(micro-batch, layer\): \[\(1, 1\)"):
        controller.end_step()
    controller.abort_step()
    with pytest.raises(KeyError, match="micro-batch 5 is not in the route plan"):
        controller.set_microbatch(5)
    partial = _plan_for({1: routes, 2: routes, 3: routes})
    controller.begin_step("replay", plan=partial)
    controller.set_microbatch(0)
    with pytest.raises(KeyError, match=r"no routes for micro-batch 0, layer 4"), torch.no_grad():
        model(tokens, positions, None)
    controller.abort_step()
    with pytest.raises(ValueError, match=r"routes for layers \[9\] that are not MoE layers on this rank"):
        controller.begin_step("replay", plan=_plan_for({9: routes}))
    controller.close()


def test_replay_needs_a_microbatch_id_and_a_plan(megatron_single_process):
    config, model = build()
    router = model.decoder.layers[0].mlp.router
    with pytest.raises(ValueError, match="replay mode needs a route plan"):
        router.set_routing_mode("replay")
    with pytest.raises(ValueError, match="unknown routing mode 'r4'"):
        router.set_routing_mode("r4")
    router.set_routing_mode("replay", plan=_plan_for({1: _good_routes(config)}))
    tokens, positions = tokens_and_positions()
    with pytest.raises(RuntimeError, match="needs a micro-batch id"), torch.no_grad():
        model(tokens, positions, None)


def test_router_fusion_and_global_replay_are_refused(megatron_single_process):
    config, model = build()
    router = model.decoder.layers[0].mlp.router
    config.moe_router_fusion = True
    try:
        for mode in ("replay", "record", "predict"):
            with pytest.raises(ValueError, match="moe_router_fusion=True"):
                router.set_routing_mode(mode, plan=RoutePlan())
        router.set_routing_mode("live")
    finally:
        config.moe_router_fusion = False
    config.moe_enable_routing_replay = True
    try:
        with pytest.raises(ValueError, match="Megatron's RouterReplay"):
            ReplayRouter(config, pg_collection=_mpu_groups())
    finally:
        config.moe_enable_routing_replay = False


def _mpu_groups():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()
