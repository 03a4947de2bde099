"""Trainer -> engine sync (one process, small buckets): a Megatron model's weights, through the
conversion adapter, into the in-process engine; in PR2-in-engine mode each gate becomes
``W_r + W_p``.

Reference: Megatron's own forward (logits and routes) on the same tokens.
"""

import torch

from megatron_pr2.convert.verify import megatron_forward
from megatron_pr2.models import ModelOptions, build_model
from megatron_pr2.models.presets import preset
from megatron_pr2.platform import seed_model_parallel
from megatron_pr2.rollout.inprocess import InProcessEngine
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.routing.router import ReplayRouter
from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

CFG = preset("tiny-qwen3-moe", mlp_only_layers=[2])


def test_megatron_weights_sync_to_the_engine_and_predictive_gates_fold(megatron_single_process):
    seed_model_parallel(9)
    _, _, model = build_model(CFG, options=ModelOptions(router_class=ReplayRouter))
    model.eval()
    engine = InProcessEngine(CFG)
    syncer = build_weight_syncer([model], engine, CFG, WeightSyncOptions(bucket_bytes=32 << 10))
    assert syncer.sync().num_buckets > 3

    sample = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6, greedy=True,
                                                            ignore_eos=True))[0]
    logits, routes = megatron_forward(model, sample.tokens[None])
    log_probs = torch.log_softmax(logits[0], -1)
    p = sample.prompt_length
    assert torch.equal(log_probs[p - 1:-1].argmax(-1), sample.tokens[p:])
    torch.testing.assert_close(sample.rollout_log_probs,
                               log_probs[p - 1:-1].gather(1, sample.tokens[p:, None])[:, 0],
                               atol=1e-4, rtol=0)
    for slot, layer in enumerate([0, 1, 3]):
        assert torch.equal(sample.routed_experts[:, slot].long().sort(-1).values, routes[layer][:-1])

    # PR2 in the engine: the synced gate is W_r + W_p
    predictors = {}
    with torch.no_grad():
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                router.predictor.weight.normal_(0, 0.05)
                predictors[layer.layer_number - 1] = (router.weight.clone(), router.predictor.weight.clone())
    syncer.sync(predictive_gate=True)
    assert sorted(predictors) == [0, 1, 3]
    for index, (w_r, w_p) in predictors.items():
        torch.testing.assert_close(engine.model.model.layers[index].mlp.gate.weight, w_r + w_p,
                                   atol=0, rtol=0)
