"""Routes cut to the token rows a rank's routers read (sequence/context parallelism).

References: the rows of a TP=2 slice worked out by hand, and for many layouts the route plan a
rank builds from whole routes (the unsliced path) against the plan from its cut share; the cut
rows of the TP (x CP) ranks of one data-parallel rank partition each sample's routes.
"""

import pytest
import torch

from megatron_pr2.rollout.alignment import (
    TokenParallel,
    build_route_plan,
    shard_for_dp,
    stage_route_shape,
    stage_route_slots,
)
from megatron_pr2.rollout.exchange import dp_view
from megatron_pr2.rollout.grid_layout import GridLayout, build_grids, read_route_rows
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import RouteRows, Sample

SHAPE = RouteShape(num_hidden_layers=4, moe_layer_indices=(0, 2, 3), top_k=2, num_experts=64)


def make_samples(lengths):
    """Routes whose ids encode (sample, token, layer): any misplaced row shows."""
    out = []
    for i, n in enumerate(lengths):
        t = torch.arange(n - 1)[:, None, None]
        layer = torch.arange(3)[None, :, None]
        ids = (i * 13 + t * 3 + layer * 7 + torch.arange(2)) % 64
        out.append(Sample(torch.arange(n) % 50, 1, routed_experts=ids.to(torch.uint8)))
    return out


LENGTHS = [5, 8, 3, 13, 2, 9, 16, 7]


def test_rows_each_tp_rank_reads_by_hand():
    samples = make_samples([5, 8, 3])
    rows = [read_route_rows(samples, [0, 1, 2], GridLayout(
        3, TokenParallel(tp_size=2, tp_rank=r, sequence_parallel=True))) for r in range(2)]
    # one grid of width 8: TP rank 0 reads positions 0..3, rank 1 positions 4..7 (routes: t < T-1)
    assert rows[0] == {0: RouteRows(((0, 4),)), 1: RouteRows(((0, 4),)), 2: RouteRows(((0, 2),))}
    assert rows[1] == {0: RouteRows(()), 1: RouteRows(((4, 7),)), 2: RouteRows(())}
    view = dp_view(samples, 1, 0, layout=GridLayout(
        3, TokenParallel(tp_size=2, tp_rank=1, sequence_parallel=True)))
    assert torch.equal(view[1].routed_experts, samples[1].routed_experts[4:7])
    assert view[0].routed_experts.shape[0] == 0 and view[0].route_rows == RouteRows(())


def plans_equal(got, want):
    assert got.routes.keys() == want.routes.keys()
    for key, routes in want.routes.items():
        assert torch.equal(got.routes[key].expert_ids, routes.expert_ids), key
        assert torch.equal(got.routes[key].valid, routes.valid), key


def check_layout(samples, dp, make_parallel, ranks, mbs, uniform, stage=None):
    """For every data-parallel rank and every TP/CP rank of ``ranks``: the plan from the cut
    share equals the plan from whole routes; the ranks' cut rows partition every route."""
    shape = SHAPE if stage is None else stage_route_shape(SHAPE, stage)
    slots = None if stage is None else stage_route_slots(SHAPE, stage)
    for dp_rank in range(dp):
        indices = shard_for_dp(len(samples), dp, dp_rank)
        held = {i: 0 for i in indices}
        for rank in ranks:
            layout = GridLayout(mbs, make_parallel(*rank), uniform)
            reference = dp_view(samples, dp, dp_rank, slots)  # today's path: every token
            want = build_route_plan(build_grids(reference, indices, layout), reference, shape,
                                    layer_numbers=stage, parallel=layout.parallel)
            view = dp_view(samples, dp, dp_rank, slots, layout)
            got = build_route_plan(build_grids(view, indices, layout), view, shape,
                                   layer_numbers=stage, parallel=layout.parallel)
            plans_equal(got, want)
            for i in indices:
                held[i] += view[i].routed_experts.shape[0]
        assert held == {i: samples[i].total_length - 1 for i in indices}


@pytest.mark.parametrize("mbs", [1, 3])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_cut_keeps_the_plan(mbs, uniform, tp):
    def parallel(tp_rank):
        return TokenParallel(tp_size=tp, tp_rank=tp_rank, sequence_parallel=True)

    check_layout(make_samples(LENGTHS), 2, parallel, [(r,) for r in range(tp)], mbs, uniform)


def test_cut_keeps_the_plan_of_a_pipeline_stage_and_of_context_parallelism():
    samples = make_samples(LENGTHS)

    def sp(tp_rank):
        return TokenParallel(tp_size=2, tp_rank=tp_rank, sequence_parallel=True)

    check_layout(samples, 2, sp, [(0,), (1,)], 2, True, stage=[3, 4])

    def cp(tp_rank, cp_rank):
        return TokenParallel(tp_size=2, tp_rank=tp_rank, sequence_parallel=True, cp_size=2,
                             cp_rank=cp_rank)

    check_layout(samples, 1, cp, [(t, c) for t in range(2) for c in range(2)], 3, False)


@pytest.mark.parametrize("parallel", [TokenParallel(), TokenParallel(tp_size=2, tp_rank=1)],
                         ids=["tp1", "tp2-no-sp"])
def test_without_sequence_parallelism_nothing_is_cut(parallel):
    samples = make_samples(LENGTHS)
    layout = GridLayout(2, parallel, uniform_width=True)
    assert not layout.splits_tokens
    view = dp_view(samples, 2, 1, layout=layout)
    for i in shard_for_dp(len(samples), 2, 1):
        assert view[i].routed_experts is samples[i].routed_experts and view[i].route_rows is None


def test_a_cut_share_read_with_another_layout_is_refused():
    samples = make_samples(LENGTHS)
    mine = GridLayout(2, TokenParallel(tp_size=2, tp_rank=0, sequence_parallel=True))
    other = GridLayout(2, TokenParallel(tp_size=2, tp_rank=1, sequence_parallel=True))
    view = dp_view(samples, 1, 0, layout=mine)
    with pytest.raises(ValueError, match="was not sent"):
        build_route_plan(build_grids(view, range(8), other), view, SHAPE,
                         parallel=other.parallel)


def test_sample_checks_its_route_rows():
    routes = make_samples([6])[0].routed_experts
    Sample(torch.arange(6), 1, routed_experts=routes[1:3], route_rows=RouteRows(((1, 3),)))
    with pytest.raises(ValueError, match=r"must be \[3 \(the rows of"):
        Sample(torch.arange(6), 1, routed_experts=routes[1:3], route_rows=RouteRows(((1, 4),)))
    with pytest.raises(ValueError, match="ascending, disjoint"):
        Sample(torch.arange(6), 1, routed_experts=routes[:4],
               route_rows=RouteRows(((2, 4), (0, 2))))
