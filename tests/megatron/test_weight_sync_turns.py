"""Pipeline stages push to a shared set of SGLang servers one at a time (2 gloo processes, PP=2).

Two fake servers record, for every ``/update_weights_from_tensor``, which stage's tensors it
carries and how many updates were in flight on that server at once (each takes 50 ms, so stages
pushing at once would overlap). Reference: the stage of a tensor from its HF name (layers
``0 .. L/2-1`` and the embedding on stage 0, the rest on stage 1).
"""

import base64
import pickle
import threading
import time

import pytest

from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from tests.fake_sglang import ROUTE_SHAPE, VOCAB, FakeSGLang, WeightServer
from tests.multiproc import run_distributed

CFG = preset("tiny-qwen3-moe")
PP2 = ParallelConfig(pipeline_model_parallel_size=2)


def stage_of(name: str) -> int:
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) >= CFG["num_hidden_layers"] // 2
    return 0 if name.startswith("model.embed_tokens") else 1


class OrderRecorder(WeightServer):
    """A weight server that records the stage of each update and the updates in flight."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.stages = []

    def __call__(self, path, body, count):
        if path != "/update_weights_from_tensor":
            return super().__call__(path, body, count)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.05)
        names = dict(pickle.loads(base64.b64decode(body["serialized_named_tensors"][0])))
        with self.lock:
            self.stages.append(sorted({stage_of(n) for n in names}))
            self.in_flight -= 1
            return super().__call__(path, body, count)


def _push(rank, addresses):
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    initialize_model_parallel(PP2)
    _, _, model = build_model(CFG, PP2)
    client = (SGLangClient(addresses, ROUTE_SHAPE, vocab_size=VOCAB,
                           config=SGLangClientConfig(request_timeout=30.0))
              if rank == 0 else None)
    syncer = build_weight_syncer([model], client, CFG, WeightSyncOptions(
        transport="tensor", bucket_bytes=16 << 10))
    report = syncer.sync()
    syncer.close()
    return report.num_buckets


@pytest.mark.distributed
@pytest.mark.slow
def test_stages_push_one_after_another_in_stage_order_on_every_server():
    recorders = [OrderRecorder(), OrderRecorder()]
    servers = [FakeSGLang(r) for r in recorders]
    try:
        buckets = run_distributed(_push, 2, [s.address for s in servers], timeout=600)
    finally:
        for server in servers:
            server.stop()
    assert buckets[0] > 2  # several buckets per stage: stages pushing at once would overlap
    for recorder in recorders:
        assert recorder.most_in_flight == 1, "two stages pushed to one server at once"
        assert all(len(stages) == 1 for stages in recorder.stages)  # a bucket is one stage's
        order = [stages[0] for stages in recorder.stages]
        assert order == sorted(order) and set(order) == {0, 1}, order
        assert len(recorder.completed) == 1
    assert recorders[0].stages == recorders[1].stages
