"""Route alignment: every planned route sits at the router row of its own token.

Samples carry known routes whose ids encode (sample, token, layer). The expected content of each
router row is worked out independently: by hand-written index formulas for the router's
sequence-first order and the sequence-parallel slices, by Megatron's own
``get_batch_on_this_cp_rank`` for context parallelism, and by Megatron's layer-offset functions
for pipeline stages.
"""

import pytest
import torch

from megatron_pr2.models.pipeline_stages import stage_layer_numbers
from megatron_pr2.rollout.alignment import (
    TokenParallel,
    build_micro_batch,
    build_micro_batches,
    build_route_plan,
    local_moe_layer_numbers,
    router_token_index,
    shard_for_dp,
)
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample

E, K = 256, 3
ROUTE_SHAPE = RouteShape(num_hidden_layers=4, moe_layer_indices=(0, 1, 3), top_k=K, num_experts=E)


def known_route(sample, t, slot):
    base = (sample * 37 + t * 5 + slot * 11) % E
    return [(base + k) % E for k in range(K)]


def make_samples(lengths, prompt=2):
    samples = []
    for i, n in enumerate(lengths):
        routes = torch.tensor([[known_route(i, t, s) for s in range(3)] for t in range(n - 1)],
                              dtype=torch.uint8)
        samples.append(Sample(torch.arange(100 * i, 100 * i + n), prompt_length=prompt,
                              routed_experts=routes))
    return samples


def expected_row(sample_index, t, length, slot):
    """(route, valid) at the router row holding token t of a sample (None: padding)."""
    if sample_index is None or t >= length - 1:
        return None, False
    return known_route(sample_index, t, slot), True


def check_layer(layer_routes, expected, slot):
    """``expected``: per router row, (sample index or None, token, sample length)."""
    assert layer_routes.expert_ids.shape == (len(expected), K)
    assert layer_routes.expert_ids.dtype == torch.uint8
    for row, (sample_index, t, length) in enumerate(expected):
        route, valid = expected_row(sample_index, t, length, slot)
        assert bool(layer_routes.valid[row]) == valid, row
        ids = layer_routes.expert_ids[row].tolist()
        if valid:
            assert ids == route, row
        else:  # rows without a route: never constant or repeated ids
            assert len(set(ids)) == K


LENGTHS = [5, 8, 3]


@pytest.mark.parametrize("tp", [1, 2])
def test_padded_batch_rows_are_sequence_first_and_sp_sliced(tp):
    samples = make_samples(LENGTHS)
    for tp_rank in range(tp):
        par = TokenParallel(tp_size=tp, tp_rank=tp_rank, sequence_parallel=tp > 1)
        mb = build_micro_batch(samples, [0, 1, 2], "bshd", par)
        batch, width = mb.shape
        assert batch == 3 and width == 8  # longest sample, already a multiple of TP
        plan = build_route_plan([mb], samples, ROUTE_SHAPE, parallel=par)
        local = width // tp
        expected = []
        for row in range(local * batch):  # router row = s_local * B + b
            s = tp_rank * local + row // batch
            b = row % batch
            expected.append((b, s, LENGTHS[b]) if s < LENGTHS[b] else (None, s, 0))
        for slot, number in enumerate(ROUTE_SHAPE.moe_layer_numbers):
            check_layer(plan.get(0, number), expected, slot)


def _megatron_cp_positions(width, batch, cp, cp_rank, monkeypatch):
    """Megatron's own CP split of a [B, S] grid of flat indices b * S + s."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    class Group:
        def size(self):
            return cp

        def rank(self):
            return cp_rank

    grid = torch.arange(batch * width).view(batch, width)
    with monkeypatch.context() as m:
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        return get_batch_on_this_cp_rank({"tokens": grid}, cp_group=Group())["tokens"]


@pytest.mark.parametrize("tp", [1, 2])
def test_padded_batch_with_context_parallel_matches_megatron_split(tp, monkeypatch):
    samples = make_samples(LENGTHS)
    cp = 2
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            par = TokenParallel(tp_size=tp, tp_rank=tp_rank, sequence_parallel=tp > 1, cp_size=cp,
                                cp_rank=cp_rank)
            mb = build_micro_batch(samples, [0, 1, 2], "bshd", par)
            batch, width = mb.shape
            assert width % (2 * cp * tp) == 0
            flat = _megatron_cp_positions(width, batch, cp, cp_rank, monkeypatch)  # [B, S/CP]
            seq_first = flat.T  # [S/CP, B]: Megatron's [S, B, H] hidden-state order
            share = seq_first.shape[0] // tp
            rows = seq_first[tp_rank * share:(tp_rank + 1) * share].reshape(-1)
            expected = []
            for index in rows.tolist():
                b, s = divmod(index, width)
                expected.append((b, s, LENGTHS[b]) if s < LENGTHS[b] else (None, s, 0))
            plan = build_route_plan([mb], samples, ROUTE_SHAPE, parallel=par)
            for slot, number in enumerate(ROUTE_SHAPE.moe_layer_numbers):
                check_layer(plan.get(0, number), expected, slot)


def thd_reference_rows(lengths, multiple, cp, cp_rank, tp, tp_rank):
    """Packed rows of one rank, by hand: per sequence 2CP chunks (r and 2CP-1-r), then SP."""
    rows = []
    for i, n in enumerate(lengths):
        padded = -(-n // multiple) * multiple
        chunk = padded // (2 * cp) if cp > 1 else padded
        order = [cp_rank, 2 * cp - 1 - cp_rank] if cp > 1 else [0]
        for c in order:
            for t in range(c * chunk, (c + 1) * chunk):
                rows.append((i, t, n) if t < n else (None, t, 0))
    share = len(rows) // tp
    return rows[tp_rank * share:(tp_rank + 1) * share]


@pytest.mark.parametrize("tp, cp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_packed_batch_rows(tp, cp):
    samples = make_samples(LENGTHS)
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            par = TokenParallel(tp_size=tp, tp_rank=tp_rank, sequence_parallel=tp > 1, cp_size=cp,
                                cp_rank=cp_rank)
            mb = build_micro_batch(samples, [0, 1, 2], "thd", par)
            multiple = par.sequence_multiple
            padded = [-(-n // multiple) * multiple for n in LENGTHS]
            assert mb.cu_seqlens.tolist() == [0, 5, 13, 16]
            assert mb.cu_seqlens_padded.tolist() == [0, padded[0], padded[0] + padded[1], sum(padded)]
            expected = thd_reference_rows(LENGTHS, multiple, cp, cp_rank, tp, tp_rank)
            plan = build_route_plan([mb], samples, ROUTE_SHAPE, parallel=par)
            for slot, number in enumerate(ROUTE_SHAPE.moe_layer_numbers):
                check_layer(plan.get(0, number), expected, slot)


def test_packed_micro_batch_fields():
    samples = make_samples([4, 3])
    mb = build_micro_batch(samples, [0, 1], "thd", TokenParallel(tp_size=2, sequence_parallel=True))
    assert mb.tokens.tolist() == [[0, 1, 2, 3, 100, 101, 102, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert mb.response_mask.tolist() == [[False, False, True, True, False, False, True, False]]


def test_pipeline_stage_gets_only_its_moe_layers():
    samples = make_samples(LENGTHS)
    mbs = build_micro_batches(samples, [0, 1, 2], micro_batch_size=2)
    stage = stage_layer_numbers(4, pp_size=2, pp_rank=1)
    assert stage == [3, 4]
    plan = build_route_plan(mbs, samples, ROUTE_SHAPE, layer_numbers=stage, first_microbatch_id=10)
    assert plan.layer_numbers() == [4] and plan.microbatch_ids() == [10, 11]
    mb1 = mbs[1]  # one sample (index 2), rows = positions
    expected = [(2, s, LENGTHS[2]) for s in range(mb1.shape[1])]
    check_layer(plan.get(11, 4), expected, slot=2)  # global layer 4 is the third MoE layer


def test_stage_layer_numbers_match_megatron_offsets():
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    for pp, vp in [(2, None), (2, 2), (4, 2)]:
        cfg = TransformerConfig(num_layers=16, hidden_size=16, num_attention_heads=2,
                                pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vp, pipeline_dtype=torch.float32)
        for pp_rank in range(pp):
            for vp_stage in range(vp or 1):
                stage = None if vp is None else vp_stage
                offset = get_transformer_layer_offset(cfg, vp_stage=stage, pp_rank=pp_rank)
                count = get_num_layers_to_build(cfg, vp_stage=stage, pp_rank=pp_rank)
                assert stage_layer_numbers(16, pp, pp_rank, vp, vp_stage) == list(
                    range(offset + 1, offset + count + 1))


def test_layer_numbers_outside_the_model_are_rejected():
    with pytest.raises(ValueError, match=r"layer numbers \[5\] outside \[1, 4\]"):
        local_moe_layer_numbers([4, 5], ROUTE_SHAPE)


def test_dp_shards_are_contiguous_and_even():
    assert [shard_for_dp(6, 3, r) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="do not split evenly"):
        shard_for_dp(5, 2, 0)


def test_samples_without_routes_or_with_wrong_shape_are_rejected():
    samples = make_samples([4, 4])
    samples[1].routed_experts = None
    mb = build_micro_batch(samples, [0, 1], "bshd")
    with pytest.raises(ValueError, match="sample 1 has no routed experts"):
        build_route_plan([mb], samples, ROUTE_SHAPE)
    samples[1].routed_experts = torch.zeros(3, 2, K, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected \[T-1, 3, 3\]"):
        build_route_plan([mb], samples, ROUTE_SHAPE)


def test_router_index_covers_each_grid_position_once_across_ranks():
    samples = make_samples(LENGTHS)
    seen = []
    for cp_rank in range(2):
        for tp_rank in range(2):
            par = TokenParallel(tp_size=2, tp_rank=tp_rank, sequence_parallel=True, cp_size=2, cp_rank=cp_rank)
            mb = build_micro_batch(samples, [0, 1, 2], "thd", par)
            seen.append(router_token_index(mb, par))
    assert sorted(torch.cat(seen).tolist()) == list(range(mb.tokens.numel()))


def test_unknown_token_format_is_rejected():
    with pytest.raises(ValueError, match="unknown micro-batch token format 'sbhd'"):
        build_micro_batch(make_samples([3]), [0], "sbhd")


def test_a_micro_batch_of_one_router_row_per_rank():
    samples = make_samples([2])  # one route; TP=2 SP: each rank's router holds one row
    for tp_rank in range(2):
        par = TokenParallel(tp_size=2, tp_rank=tp_rank, sequence_parallel=True)
        plan = build_route_plan([build_micro_batch(samples, [0], "bshd", par)], samples,
                                ROUTE_SHAPE, parallel=par)
        for slot, number in enumerate(ROUTE_SHAPE.moe_layer_numbers):
            check_layer(plan.get(0, number), [(0, tp_rank, 2)], slot)
