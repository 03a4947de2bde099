"""The trainer's weight syncs while SGLang servers leave and come back (one gloo process, a tiny
Megatron model, fake SGLang servers on 127.0.0.1 taking ``/update_weights_from_tensor``).

References: each fake records the tensors of every update session it completed; a full sync must
equal the single-process conversion adapter's output of the same model, tensor by tensor.
"""

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
from megatron_pr2.training.engine_weight_sync import EngineWeightSync
from tests.fake_sglang import ROUTE_SHAPE, VOCAB, FakeSGLang, WeightServer

CFG = preset("tiny-qwen3-moe")
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
GREEDY = SamplingParams(max_new_tokens=3, greedy=True)


@pytest.fixture(scope="module")
def model_and_reference(megatron_single_process):
    from megatron_pr2.convert.loading import model_state_for_export
    from megatron_pr2.convert.registry import adapter_for
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import seed_model_parallel

    seed_model_parallel(5)
    _, _, model = build_model(CFG)
    return model, dict(adapter_for(CFG).to_hf(model_state_for_export(model).items()))


def engine_sync(model, client):
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    def build(rejoining):
        return build_weight_syncer([model], client, CFG, WeightSyncOptions(
            transport="tensor", bucket_bytes=64 << 10), rejoining=rejoining)

    return EngineWeightSync(build, client, server_pool=True)


def make_client(addresses, interval):
    config = SGLangClientConfig(connect_timeout=1.0, request_timeout=10.0, max_attempts=2,
                                backoff=0.01, rejoin_interval=interval)
    return SGLangClient(addresses, ROUTE_SHAPE, vocab_size=VOCAB, config=config)


def assert_full_sync(session, reference):
    assert session.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(session[name], tensor), name


def test_a_restarted_server_gets_a_full_sync_then_rejoins_and_generates(model_and_reference):
    model, reference = model_and_reference
    a_weights, b_weights = WeightServer(), WeightServer()
    a, b = FakeSGLang(a_weights), FakeSGLang(b_weights)
    try:
        client = make_client([a.address, b.address], interval=0.001)
        sync = engine_sync(model, client)
        sync.sync(1)
        assert len(a_weights.completed) == len(b_weights.completed) == 1
        first, closed = sync.syncer, []
        first.close = lambda: closed.append(first.transport.release())
        b.stop()  # b dies: generation evicts it, the next sync skips it (resync on the live)
        client.generate(PROMPTS, GREEDY)
        assert client.pool.live == [a.address]
        assert sync.sync(2).num_tensors == len(reference)
        assert sync.syncer.transport.apis[0].base_url == a.address
        assert len(sync.syncer.transport.apis) == 1 and closed  # the old syncer was closed
        b_weights = WeightServer()
        b = FakeSGLang(b_weights, port=b.port)  # restarted at the same address, old weights
        assert not [p for p, _ in b.requests if p == "/generate"]
        sync.sync(3)
        assert client.pool.live == [a.address, b.address]
        assert client.metrics()["rollout/server_rejoins"] == 1.0
        assert len(b_weights.completed) == 1
        assert_full_sync(b_weights.completed[0], reference)
        assert_full_sync(a_weights.completed[-1], reference)
        assert "/generate" not in [p for p, _ in b.requests]
        samples = client.generate(PROMPTS, GREEDY)
        assert {s.metadata["engine"] for s in samples} == {a.address, b.address}
        # the restarted server was tagged with the version of the sync it rejoined with
        assert a_weights.version == b_weights.version == "3"
        assert {s.metadata["weight_version"] for s in samples} == {3}
    finally:
        a.stop()
        b.stop()


def test_a_candidate_failing_the_sync_stays_out_and_the_live_servers_still_sync(
        model_and_reference, caplog):
    model, reference = model_and_reference
    a_weights, b_weights = WeightServer(), WeightServer(refuse_weights=True)
    a, b = FakeSGLang(a_weights), FakeSGLang(b_weights)
    try:
        client = make_client([a.address, b.address], interval=3600.0)
        client.pool.evict(b.address, "timed out")  # it answers /health but cannot take weights
        sync = engine_sync(model, client)
        report = sync.sync(4)
        assert report.num_tensors == len(reference)
        assert client.pool.live == [a.address]
        assert client.metrics()["rollout/server_rejoins"] == 0.0
        assert f"SGLang server {b.address} answered /health but the full weight sync" in caplog.text
        assert_full_sync(a_weights.completed[-1], reference)
        assert [s.metadata["engine"] for s in client.generate(PROMPTS, GREEDY)] == [a.address] * 4
        probes = [p for p, _ in b.requests].count("/health")
        sync.sync(5)  # b backs off: not probed, not synced
        assert [p for p, _ in b.requests].count("/health") == probes
        assert_full_sync(a_weights.completed[-1], reference)
    finally:
        a.stop()
        b.stop()


def test_servers_to_rejoin_must_be_evicted_servers_of_an_sglang_pool(model_and_reference):
    from megatron_pr2.rollout.inprocess import InProcessEngine
    from megatron_pr2.weight_sync import build_weight_syncer

    model, _ = model_and_reference
    client = make_client(["http://127.0.0.1:1", "http://127.0.0.1:2"], interval=60.0)
    client.pool.evict("http://127.0.0.1:2", "refused")
    with pytest.raises(ValueError, match=r"not evicted: \['http://127.0.0.1:1'\]"):
        build_weight_syncer([model], client, CFG, rejoining=["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="need an SGLang engine"):
        build_weight_syncer([model], InProcessEngine(CFG), CFG, rejoining=["http://127.0.0.1:2"])


def test_a_server_that_missed_a_sync_is_caught_by_its_weight_version(model_and_reference):
    model, _ = model_and_reference
    a_weights, b_weights = WeightServer(), WeightServer()
    a, b = FakeSGLang(a_weights), FakeSGLang(b_weights)
    try:
        client = make_client([a.address, b.address], interval=3600.0)
        sync = engine_sync(model, client)
        sync.sync(7)
        assert a_weights.version == b_weights.version == "7"
        b_weights.version = "6"  # as if b had kept the weights of the sync before
        samples = client.generate(PROMPTS, GREEDY)
        # b's answers are refused (and retried on a); every sample is of version 7
        assert {s.metadata["weight_version"] for s in samples} == {7}
        assert {s.metadata["engine"] for s in samples} == {a.address}
        assert client.metrics()["rollout/malformed_answers"] >= 1
    finally:
        a.stop()
        b.stop()
