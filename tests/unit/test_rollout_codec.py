"""Routed-experts wire codec against payloads built by hand (numpy int32 bytes -> base64)."""

import base64

import numpy as np
import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.engine import MalformedResponseError
from megatron_pr2.rollout.route_codec import RouteShape, decode_routed_experts

ROUTE_SHAPE = RouteShape(num_hidden_layers=4, moe_layer_indices=(0, 1, 2, 3), top_k=2, num_experts=8)


def wire(array, dtype="<i4") -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def distinct_routes(rows, layers, k, experts, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([[rng.permutation(experts)[:k] for _ in range(layers)] for _ in range(rows)])


def test_decode_roundtrip_keeps_values_and_compacts():
    routes = distinct_routes(5, 4, 2, 8)
    out = decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)
    assert out.dtype == torch.uint8
    assert out.tolist() == routes.tolist()


def test_compact_dtype_widens_above_256_experts():
    route_shape = RouteShape(2, (0, 1), top_k=2, num_experts=300)
    routes = distinct_routes(3, 2, 2, 300)
    routes[0, 0] = [299, 5]
    out = decode_routed_experts(wire(routes), num_rows=3, route_shape=route_shape)
    assert out.dtype == torch.int16 and int(out[0, 0, 0]) == 299


def test_dense_layers_are_dropped_from_the_wire_layer_axis():
    # SGLang sizes the layer axis by num_hidden_layers and leaves dense layers at zero.
    route_shape = RouteShape(num_hidden_layers=4, moe_layer_indices=(1, 3), top_k=2, num_experts=8)
    routes = distinct_routes(6, 4, 2, 8, seed=1)
    routes[:, [0, 2]] = 0
    out = decode_routed_experts(wire(routes), num_rows=6, route_shape=route_shape)
    assert out.tolist() == routes[:, [1, 3]].tolist()


def test_moe_only_wire_layout_is_accepted_only_when_asked_for():
    route_shape = RouteShape(num_hidden_layers=4, moe_layer_indices=(1, 3), top_k=2, num_experts=8)
    routes = distinct_routes(6, 2, 2, 8, seed=2)
    out = decode_routed_experts(wire(routes), num_rows=6, route_shape=route_shape, wire_layers="moe")
    assert out.tolist() == routes.tolist()
    with pytest.raises(MalformedResponseError, match="24 int32 entries .* expected 48"):
        decode_routed_experts(wire(routes), num_rows=6, route_shape=route_shape)


def test_cut_short_top1_payload_that_matches_the_moe_only_size_is_refused():
    # Issue 12: top-1, 4 layers (3 MoE), 8 rows. A payload that lost 2 rows holds 6 x 4 = 24
    # entries = 8 x 3: a size guess would take it for a complete MoE-only payload.
    route_shape = RouteShape(num_hidden_layers=4, moe_layer_indices=(1, 2, 3), top_k=1, num_experts=8)
    full = np.random.default_rng(3).integers(0, 8, size=(8, 4, 1))
    with pytest.raises(MalformedResponseError) as err:
        decode_routed_experts(wire(full[:6]), num_rows=8, route_shape=route_shape)
    assert "24 int32 entries" in str(err.value) and "expected 32" in str(err.value)
    assert decode_routed_experts(wire(full), num_rows=8, route_shape=route_shape).tolist() == \
        full[:, 1:].tolist()


def test_unknown_wire_layers_option_is_refused():
    with pytest.raises(ValueError, match="wire_layers must be one of"):
        decode_routed_experts(wire(distinct_routes(1, 4, 2, 8)), num_rows=1, route_shape=ROUTE_SHAPE,
                              wire_layers="dense")


def test_layout_from_hf_config_with_dense_layers_and_v5_alias():
    cfg = preset("tiny-qwen3-moe", mlp_only_layers=[0, 2])
    cfg["num_local_experts"] = cfg.pop("num_experts")
    route_shape = RouteShape.from_hf_config(cfg)
    assert route_shape.moe_layer_indices == (1, 3) and route_shape.moe_layer_numbers == (2, 4)
    assert route_shape.num_experts == 8


@pytest.mark.parametrize("rows", [4, 6])
def test_wrong_row_count_is_rejected(rows):
    routes = distinct_routes(rows, 4, 2, 8)
    with pytest.raises(MalformedResponseError, match="expected 40 = 5 rows"):
        decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)


def test_int64_payload_is_rejected_as_wrong_size():
    routes = distinct_routes(5, 4, 2, 8)
    with pytest.raises(MalformedResponseError, match="wrong dtype"):
        decode_routed_experts(wire(routes, dtype="<i8"), num_rows=5, route_shape=ROUTE_SHAPE)


def test_not_base64_and_not_string_are_rejected():
    with pytest.raises(MalformedResponseError, match="not valid base64"):
        decode_routed_experts("@@@not-base64@@@", num_rows=1, route_shape=ROUTE_SHAPE)
    with pytest.raises(MalformedResponseError, match="base64 string"):
        decode_routed_experts([[1, 2]], num_rows=1, route_shape=ROUTE_SHAPE)


def test_ids_out_of_range_are_rejected():
    routes = distinct_routes(5, 4, 2, 8)
    routes[3, 2] = [1, 8]
    with pytest.raises(MalformedResponseError, match=r"expert id 8 out of range \[0, 8\) at token 3, MoE layer 2"):
        decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)
    routes[3, 2] = [-1, 2]
    with pytest.raises(MalformedResponseError, match="expert id -1"):
        decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)


def test_all_zero_moe_layer_is_rejected():
    routes = distinct_routes(5, 4, 2, 8)
    routes[:, 2] = 0
    with pytest.raises(MalformedResponseError, match="MoE layer 2 .*all zeros"):
        decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)


def test_repeated_expert_within_a_token_is_rejected():
    routes = distinct_routes(5, 4, 2, 8)
    routes[4, 1] = [3, 3]
    with pytest.raises(MalformedResponseError, match="repeats an expert id .* at token 4: \\[3, 3\\]"):
        decode_routed_experts(wire(routes), num_rows=5, route_shape=ROUTE_SHAPE)


def test_top1_all_zero_layer_is_rejected_but_a_live_zero_is_not():
    route_shape = RouteShape(2, (0, 1), top_k=1, num_experts=4)
    routes = np.array([[[1], [0]], [[2], [0]], [[3], [0]]])
    with pytest.raises(MalformedResponseError, match=r"MoE layers \[1\]"):
        decode_routed_experts(wire(routes), num_rows=3, route_shape=route_shape)
    # one token routed to expert 0 is a legal route
    decode_routed_experts(wire(routes[:1]), num_rows=1, route_shape=route_shape)


def test_wrong_layer_count_is_rejected():
    routes = distinct_routes(2, 3, 2, 8)
    with pytest.raises(MalformedResponseError, match="12 int32 entries .*expected 16"):
        decode_routed_experts(wire(routes), num_rows=2, route_shape=ROUTE_SHAPE)
