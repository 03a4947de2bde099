"""Activation recompute in backward must dispatch to the routes its forward used, without
reading a value back from the device (a sync on a GPU) in the route selector."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_pr2.routing.controller import RoutingController
from tests.megatron.test_router_replay import build, tokens_and_positions

RECOMPUTE = {
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
    "selective-moe": {"recompute_granularity": "selective", "recompute_modules": ["moe"]},
}


def _causal_mask(tokens):
    """An explicit mask: Megatron's default one is built with device="cuda" and the CPU
    backend's device mode is not active inside autograd's backward (full recompute)."""
    s = tokens.shape[1]
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(tokens.shape[0], 1, s, s)


def _forward(model, tokens, positions):
    return model(tokens, positions, _causal_mask(tokens))


def _record_routing_maps(model):
    calls = {}
    handles = [layer.mlp.router.register_forward_hook(
        lambda mod, args, out: calls.setdefault(mod.layer_number, []).append(
            (out[1].detach().clone(), torch.is_grad_enabled())))
        for layer in model.decoder.layers]
    return calls, handles


HOST_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero",
              "cpu", "numpy"}


class _HostReads(TorchFunctionMode):
    """Records the tensor calls that read a value back to the host (each a device sync)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _watch_route_selectors(model):
    """Per layer number, the host reads of each call to its route selector, in call order."""
    reads = {}
    for layer in model.decoder.layers:
        selector = layer.mlp.router.route_selector
        original = selector.get_replay_topk

        def watched(*args, _original=original, _layer=layer.layer_number, **kwargs):
            with _HostReads() as mode:
                out = _original(*args, **kwargs)
            reads.setdefault(_layer, []).append(mode.reads)
            return out

        selector.get_replay_topk = watched
    return reads


def _negate_router_weights(model):
    """Flip every router's live top-k (to the bottom-k) between forward and backward."""
    for layer in model.decoder.layers:
        layer.mlp.router.weight.data.neg_()


def _step_with_weight_change(model, controller, mode, plan=None, tokens=None):
    tokens, positions = tokens or tokens_and_positions(seed=61)
    calls, handles = _record_routing_maps(model)
    if controller is not None:
        controller.begin_step(mode, plan=plan)
        controller.set_microbatch(0)
    logits = _forward(model, tokens, positions)
    _negate_router_weights(model)
    # torch.autograd.backward (as Megatron's schedules call it): Tensor.backward() would run
    # the recompute outside the CPU backend's device mode
    torch.autograd.backward(logits.float().square().mean())
    _negate_router_weights(model)
    for handle in handles:
        handle.remove()
    step = controller.end_step() if controller is not None else None
    return calls, step


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_megatron_live_routing_alone_would_change_routes_in_recompute(megatron_single_process,
                                                                     recompute):
    """Control: without the consumed-route record the weight change does change the recompute."""
    _, model = build(seed=60, **RECOMPUTE[recompute])
    calls, _ = _step_with_weight_change(model, None, "live")
    for layer, seen in calls.items():
        assert len(seen) == 2 and seen[0][1] is False and seen[1][1] is True, layer
        assert not torch.equal(seen[0][0], seen[1][0]), layer


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
@pytest.mark.parametrize("mode", ["replay", "record", "live"])
def test_recompute_in_backward_sees_the_forward_routes(megatron_single_process, recompute, mode):
    _, model = build(seed=60, **RECOMPUTE[recompute])
    controller = RoutingController(model)
    plan = None
    if mode == "replay":  # the recorded routes, with rows 0..3 invalid (routed live)
        controller.begin_step("record")
        controller.set_microbatch(0)
        with torch.no_grad():
            _forward(model, *tokens_and_positions(seed=61))
        plan = controller.end_step().routes
        for routes in plan.routes.values():
            routes.valid[:4] = False
    reads = _watch_route_selectors(model)
    calls, step = _step_with_weight_change(model, controller, mode, plan=plan)
    for layer in model.decoder.layers:
        seen = calls[layer.layer_number]
        assert len(seen) == 2 and seen[1][1] is True, "expected a forward and a recompute"
        assert reads[layer.layer_number][1] == [], "the recompute read the device"
        assert torch.equal(seen[0][0], seen[1][0]), f"layer {layer.layer_number} re-routed"
        recorded = step.routes.get(0, layer.layer_number).expert_ids.long()
        assert torch.equal(torch.zeros_like(seen[0][0]).scatter(1, recorded, True), seen[0][0])
        assert layer.mlp.router.weight.grad.abs().sum() > 0
    controller.close()


def test_recompute_finds_its_microbatch_after_other_forwards(megatron_single_process):
    """Two micro-batches forward, then backward in order (a pipeline-like schedule)."""
    _, model = build(seed=62, **RECOMPUTE["full"])
    controller = RoutingController(model)
    batches = {mb: tokens_and_positions(seed=70 + mb) for mb in (0, 1)}
    controller.begin_step("record")
    outputs = {}
    calls, handles = _record_routing_maps(model)
    for mb, (tokens, positions) in batches.items():
        controller.set_microbatch(mb)
        outputs[mb] = _forward(model, tokens, positions)
    _negate_router_weights(model)
    for mb in (0, 1):
        torch.autograd.backward(outputs[mb].float().square().mean())
    for handle in handles:
        handle.remove()
    step = controller.end_step()
    for layer in model.decoder.layers:
        (f0, _), (f1, _), (r0, _), (r1, _) = calls[layer.layer_number]
        assert torch.equal(r0, f0) and torch.equal(r1, f1)
        assert not torch.equal(f0, f1)
        assert step.routes.microbatch_ids() == [0, 1]
    controller.close()
