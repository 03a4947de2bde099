"""ReplayRouter extends Megatron's TopKRouter through its overridable steps, not a copy of forward.

The behaviour the former copy guaranteed (live / record / replay / predict routes and gates vs
hand computation) is pinned by test_router_replay.py and test_router_predict.py; this file pins
the seam itself and that a step Megatron runs in forward between gating and routing still runs.
"""

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.router import ReplayRouter
from tests.megatron.test_router_replay import build, tokens_and_positions


def test_forward_is_megatrons():
    assert "forward" not in ReplayRouter.__dict__
    assert ReplayRouter.forward is TopKRouter.forward
    assert {"gating", "routing"} <= set(ReplayRouter.__dict__)


def test_a_forward_step_of_megatron_runs_in_every_mode(megatron_single_process, monkeypatch):
    """Megatron's forward applies forced load balancing (random logits) between gating and
    routing; in live mode with a micro-batch id the recorded route must be that step's output."""
    from megatron.core.transformer.moe import router as megatron_router

    _, model = build(seed=21)
    controller = RoutingController(model)
    seen = []

    def fake_random_logits(logits):  # what Megatron's step returns, visible to the test
        out = torch.flip(logits, dims=[-1])
        seen.append(out.detach().reshape(-1, out.shape[-1]))
        return out

    monkeypatch.setattr(megatron_router, "apply_random_logits", fake_random_logits)
    for router in controller.routers:
        monkeypatch.setattr(router.config, "moe_router_force_load_balancing", True)
    tokens, positions = tokens_and_positions(seed=22, s=6, b=2)
    controller.begin_step("live")
    controller.set_microbatch(0)
    with torch.no_grad():
        model(tokens, positions, None)
    step = controller.end_step()
    assert len(seen) == len(controller.routers)
    for router, logits in zip(controller.routers, seen, strict=True):
        expected = torch.topk(logits, router.topk, dim=-1).indices.sort(-1).values
        got = step.routes.get(0, router.layer_number).expert_ids.long().sort(-1).values
        assert torch.equal(got, expected)
