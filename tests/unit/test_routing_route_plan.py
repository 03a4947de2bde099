"""Route plan helpers used by the router: compact storage, widening, selection."""

import pytest
import torch

from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan


def test_routes_are_stored_compact_and_widened_for_use():
    ids = torch.tensor([[3, 1], [0, 255]])
    routes = LayerRoutes.from_expert_ids(ids, num_experts=256)
    assert routes.expert_ids.dtype == torch.uint8
    assert routes.valid.tolist() == [True, True]
    assert routes.widened().dtype == torch.long and routes.widened().tolist() == ids.tolist()
    assert LayerRoutes.from_expert_ids(ids, num_experts=300).expert_ids.dtype == torch.int16


def test_select_keeps_only_requested_microbatches():
    plan = RoutePlan()
    for mb in (0, 1, 2):
        for layer in (1, 3):
            plan.add(mb, layer, LayerRoutes.from_expert_ids(torch.tensor([[mb, layer]]), 8))
    sub = plan.select([0, 2])
    assert sub.microbatch_ids() == [0, 2] and sub.layer_numbers() == [1, 3]
    assert sub.keys_for_layer(3) == [(0, 3), (2, 3)]
    with pytest.raises(KeyError, match=r"no micro-batches \[7\]"):
        plan.select([0, 7])


def test_select_on_a_stage_without_moe_layers_is_empty():
    # a pipeline stage with only dense layers records (and is given) no routes at all
    assert RoutePlan().select([0, 1]).routes == {}
