"""Samples and their compact routes move between two gloo ranks unchanged."""

import torch
import torch.distributed as dist

from megatron_pr2.rollout.alignment import shard_for_dp
from megatron_pr2.rollout.exchange import all_gather_samples, scatter_object
from megatron_pr2.rollout.sample import Sample, SampleStatus
from tests.multiproc import run_distributed


def make_sample(rank, i):
    n = 4 + i
    routes = torch.arange((n - 1) * 3 * 2).view(n - 1, 3, 2).to(torch.uint8) + rank
    return Sample(torch.arange(n) + 10 * rank, 2, torch.full((n - 2,), -0.5 * rank), routes,
                  reward=float(rank), status=SampleStatus.COMPLETED, metadata={"rank": rank})


def _exchange(rank):
    dist.init_process_group("gloo")
    try:
        gathered = all_gather_samples([make_sample(rank, i) for i in range(2)])
        per_rank = [[make_sample(7, 0)], [make_sample(8, 1)]] if rank == 1 else None
        broadcast = scatter_object(per_rank, src=1)
        share = [gathered[i] for i in shard_for_dp(len(gathered), 2, rank)]
        return gathered, broadcast, share
    finally:
        dist.destroy_process_group()


def _same(a, b):
    return (torch.equal(a.tokens, b.tokens) and torch.equal(a.routed_experts, b.routed_experts)
            and a.routed_experts.dtype == b.routed_experts.dtype == torch.uint8
            and torch.equal(a.rollout_log_probs, b.rollout_log_probs)
            and (a.reward, a.status, a.metadata) == (b.reward, b.status, b.metadata))


def test_all_gather_and_scatter_keep_samples_and_routes():
    results = run_distributed(_exchange, 2)
    expected = [make_sample(r, i) for r in range(2) for i in range(2)]
    for rank, (gathered, broadcast, share) in enumerate(results):
        assert len(gathered) == 4 and all(_same(a, b) for a, b in zip(gathered, expected))
        assert len(broadcast) == 1 and _same(broadcast[0], make_sample(7 + rank, rank))
        assert all(_same(a, b) for a, b in zip(share, expected[2 * rank:2 * rank + 2]))
