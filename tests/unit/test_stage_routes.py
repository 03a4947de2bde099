"""Routes cut to a pipeline stage's MoE layers: the slots by hand, and the stage's route plan
from cut samples equal to the whole-model plan's entries for that stage's layers."""

import torch

from megatron_pr2.rollout.alignment import (
    build_micro_batches,
    build_route_plan,
    stage_route_shape,
    stage_route_slots,
)
from megatron_pr2.rollout.exchange import dp_view
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample

# 4 layers, layer 2 (index 1) dense: MoE layer numbers 1, 3, 4 on the route axis slots 0, 1, 2
SHAPE = RouteShape(num_hidden_layers=4, moe_layer_indices=(0, 2, 3), top_k=2, num_experts=8)


def samples(count=3):
    out = []
    for i in range(count):
        tokens = torch.arange(5 + i) % 7
        rows = tokens.numel() - 1
        ids = (torch.arange(rows * 3 * 2).view(rows, 3, 2) * 3 + i) % 8
        ids[..., 1] = (ids[..., 0] + 1 + i) % 8  # two distinct experts per row
        out.append(Sample(tokens, 2, torch.zeros(tokens.numel() - 2), ids.to(torch.uint8)))
    return out


def test_slots_and_shape_of_each_stage_by_hand():
    assert stage_route_slots(SHAPE, [1, 2]) == (0,)
    assert stage_route_slots(SHAPE, [3, 4]) == (1, 2)
    assert stage_route_shape(SHAPE, [3, 4]).moe_layer_numbers == (3, 4)
    assert stage_route_shape(SHAPE, [2]) is None  # a stage of dense layers only


def test_a_stage_plan_from_cut_routes_equals_the_whole_plans_entries():
    batch = samples()
    everything = build_route_plan(build_micro_batches(batch, [0, 1, 2], 2), batch, SHAPE)
    for layers in ([1, 2], [3, 4]):
        slots = stage_route_slots(SHAPE, layers)
        cut = dp_view(batch, 1, 0, slots)
        assert all(s.routed_experts.shape[1] == len(slots) for s in cut)
        assert all(s.routed_experts.untyped_storage().nbytes() == s.routed_experts.nbytes
                   for s in cut)  # a copy, not a view of the whole routes
        stage = build_route_plan(build_micro_batches(cut, [0, 1, 2], 2), cut,
                                 stage_route_shape(SHAPE, layers), layer_numbers=layers)
        expected = {k: v for k, v in everything.routes.items() if k[1] in layers}
        assert stage.routes.keys() == expected.keys()
        for key, routes in expected.items():
            assert torch.equal(stage.routes[key].expert_ids, routes.expert_ids), key
            assert torch.equal(stage.routes[key].valid, routes.valid), key
