"""Rejoin and failover of SGLang servers on 2 gloo processes (PP=2: each stage's rank pushes its
own buckets), fake SGLang servers on 127.0.0.1 in the test process.

Rank 0 alone probes and decides; both ranks must rebuild their syncers the same number of times
and push to the same servers. References: the single-process conversion adapter's output of the
same checkpoint (a full sync equals it, tensor by tensor); the pool's state read from rank 0.
"""

import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from tests.fake_sglang import ROUTE_SHAPE, VOCAB, FakeSGLang, WeightServer
from tests.multiproc import run_distributed

CFG = preset("tiny-qwen3-moe")
PP2 = ParallelConfig(pipeline_model_parallel_size=2)


def _targets(sync):
    return [api.base_url for api in sync.syncer.transport.apis]


def _rejoin_and_failover(rank, megatron_dir, live, back, broken):
    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
    from megatron_pr2.training.engine_weight_sync import EngineWeightSync
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    initialize_model_parallel(PP2)
    _, _, model = build_model(CFG, PP2)
    load_megatron_checkpoint(model, megatron_dir)
    client = None
    if rank == 0:
        client = SGLangClient([live, back, broken], ROUTE_SHAPE, vocab_size=VOCAB,
                              config=SGLangClientConfig(request_timeout=30.0,
                                                        rejoin_interval=3600.0))
        client.pool.evict(broken, "timed out")  # answers /health, refuses weights
    builds = []

    def build(rejoining):
        builds.append(list(rejoining))
        return build_weight_syncer([model], client, CFG, WeightSyncOptions(
            transport="tensor", bucket_bytes=64 << 10), rejoining=rejoining)

    sync = EngineWeightSync(build, client, server_pool=True)
    sync.sync(1)  # broken is a candidate, fails; redone on live + back
    after_failure = _targets(sync)
    if rank == 0:
        client.pool.evict(back, "timed out")
    sync.sync(2)  # back is due and rejoins; broken backs off
    sync.close()
    pool = (client.pool.live, sorted(client.pool.evicted), client.metrics()) if rank == 0 else None
    return builds, after_failure, _targets(sync), pool


def test_every_rank_takes_the_same_rejoin_and_failover_path(megatron_single_process, tmp_path):
    from megatron_pr2.convert.loading import (
        load_megatron_checkpoint,
        model_state_for_export,
    )
    from megatron_pr2.convert.pipeline import hf_to_megatron
    from megatron_pr2.convert.random_init import save_random_hf_checkpoint
    from megatron_pr2.convert.registry import adapter_for
    from megatron_pr2.models import build_model

    save_random_hf_checkpoint(CFG, str(tmp_path / "hf"), seed=7)
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "megatron"))
    _, _, single = build_model(CFG)
    load_megatron_checkpoint(single, str(tmp_path / "megatron"))
    want = dict(adapter_for(CFG).to_hf(model_state_for_export(single).items()))

    weights = [WeightServer(), WeightServer(), WeightServer(refuse_weights=True)]
    servers = [FakeSGLang(w) for w in weights]
    live, back, broken = (s.address for s in servers)
    try:
        per_rank = run_distributed(_rejoin_and_failover, 2, str(tmp_path / "megatron"), live,
                                   back, broken, timeout=900)
    finally:
        for server in servers:
            server.stop()

    # built at start, with the candidate, on the live ones after its failure, with the returning one
    expected_builds = [[], [broken], [], [back]]
    assert [r[0] for r in per_rank] == [expected_builds, expected_builds]
    for rank in range(2):  # stage 1's rank pushed to the same servers as rank 0
        assert per_rank[rank][1] == [live, back], rank
        assert per_rank[rank][2] == [live, back], rank
    live_now, evicted, metrics = per_rank[0][3]
    assert live_now == [live, back] and evicted == [broken]
    assert metrics["rollout/server_rejoins"] == 1.0
    for server in weights[:2]:  # the redone sync and the rejoin sync (the failed one is partial)
        full = [s for s in server.completed if s.keys() == want.keys()]
        assert len(full) == 2
        for name, tensor in want.items():
            assert torch.equal(full[-1][name], tensor), name
    assert all(not s for s in weights[2].completed)  # broken never took a tensor
