"""The rollout driver sends each TP rank of a sequence-parallel layout only the route rows its
routers read (2 gloo ranks, TP=2). Reference: the route plan each rank would build from the
engine's whole routes (regenerated here), and the whole routes themselves without SP."""

import pytest
import torch

from megatron_pr2.rollout.alignment import TokenParallel, build_route_plan, shard_for_dp
from megatron_pr2.rollout.grid_layout import GridLayout, build_grids
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.training.rollout_source import DigitPrompts, RolloutSource
from tests.multiproc import run_distributed
from tests.unit.test_rollout_source import FakeEngine, digit_config

SHAPE = RouteShape(num_hidden_layers=2, moe_layer_indices=(0, 1), top_k=FakeEngine.top_k,
                   num_experts=8)
BATCH_PROMPTS, SAMPLES_PER_PROMPT = 3, 2


def layout(rank: int, sequence_parallel: bool) -> GridLayout:
    return GridLayout(2, TokenParallel(tp_size=2, tp_rank=rank,
                                       sequence_parallel=sequence_parallel))


def _collect_as_tp_ranks(rank):
    import torch.distributed as dist

    from megatron_pr2.platform.distributed import init_process_group

    init_process_group("cpu")
    try:
        received = {}
        for sp in (True, False):
            cfg = digit_config(BATCH_PROMPTS, SAMPLES_PER_PROMPT)
            cfg.task.task_min_len, cfg.task.task_max_len = 1, 6  # samples of several lengths
            prompts = DigitPrompts(cfg)
            engine = FakeEngine(prompts.tokenizer.eos_id) if rank == 0 else None
            source = RolloutSource(cfg, engine, prompts, layout=layout(rank, sp))
            received[sp] = (source.collect(1)[0], engine.prompts[0] if engine else None)
        return received
    finally:
        dist.destroy_process_group()


def plan_of(samples, grid_layout):
    indices = shard_for_dp(len(samples), 1, 0)
    return build_route_plan(build_grids(samples, indices, grid_layout), samples, SHAPE,
                            parallel=grid_layout.parallel)


@pytest.mark.distributed
def test_each_tp_rank_receives_only_the_route_rows_its_routers_read():
    results = run_distributed(_collect_as_tp_ranks, 2)
    engine = FakeEngine(DigitPrompts(digit_config()).tokenizer.eos_id)
    for sp in (True, False):
        prompts = results[0][sp][1]
        whole = [engine.sample(i, p) for i, p in enumerate(prompts)]
        assert len({s.total_length for s in whole}) > 1
        held = [0] * len(whole)
        for rank in range(2):
            samples = results[rank][sp][0]
            got, want = plan_of(samples, layout(rank, sp)), plan_of(whole, layout(rank, sp))
            assert got.routes.keys() == want.routes.keys()
            for key, routes in want.routes.items():
                assert torch.equal(got.routes[key].expert_ids, routes.expert_ids), (sp, key)
                assert torch.equal(got.routes[key].valid, routes.valid), (sp, key)
            for i, sample in enumerate(samples):
                held[i] += sample.routed_experts.shape[0]
                if not sp:  # nothing is cut without sequence parallelism
                    assert torch.equal(sample.routed_experts, whole[i].routed_experts)
                    assert sample.route_rows is None
        copies = 1 if sp else 2  # with SP the two ranks' rows partition each sample's routes
        assert held == [copies * (s.total_length - 1) for s in whole]
