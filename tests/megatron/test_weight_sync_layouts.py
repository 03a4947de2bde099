"""In-memory weight sync on 2 gloo processes into the in-process engine, for every layout kind.

Layouts: TP=2 + SP, TP=2 + SP with EP=2 and expert TP=1, EP=2, PP=2, PP=2 x VPP=2, DP=2.
Reference: the in-process engine loaded with the single-process adapter output of the same
checkpoint (PR2 predictive gates ``W_r + W_p^T``, predictors set by the test), tensor by tensor.
Also: a name the engine does not have is refused on every rank with one clear error.
"""

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from tests.multiproc import run_distributed

CFG = preset("tiny-qwen3-moe", mlp_only_layers=[2])
LAYOUTS = {
    "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2-sp-ep2-etp1": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                      expert_model_parallel_size=2, expert_tensor_parallel_size=1),
    "ep2": ParallelConfig(expert_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "pp2-vpp2": ParallelConfig(pipeline_model_parallel_size=2,
                               virtual_pipeline_model_parallel_size=2),
    "dp2": ParallelConfig(),
}
BUCKET_BYTES = 64 << 10


def predictor_weight(layer: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + layer)
    return 0.05 * torch.randn(CFG["num_experts"], CFG["hidden_size"], generator=generator)


def set_predictors(chunks) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    router.predictor.weight.copy_(predictor_weight(layer.layer_number - 1))


def _sync(rank, megatron_dir):
    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.models import ModelOptions, build_model_chunks
    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.rollout.inprocess import InProcessEngine
    from megatron_pr2.routing.router import ReplayRouter
    from megatron_pr2.training.model_setup import wrap_with_ddp
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    results = {}
    for name, parallel in LAYOUTS.items():
        initialize_model_parallel(parallel)
        options = ModelOptions(router_class=ReplayRouter)
        _, config, chunks = build_model_chunks(CFG, parallel, options)
        load_megatron_checkpoint(chunks, megatron_dir)
        set_predictors(chunks)
        model = wrap_with_ddp(chunks, config) if name == "dp2" else chunks
        engine = InProcessEngine(CFG)
        syncer = build_weight_syncer(model, engine, CFG,
                                     WeightSyncOptions(bucket_bytes=BUCKET_BYTES))
        report = syncer.sync(predictive_gate=True)
        results[name] = (engine.model.state_dict() if rank == 0 else None, report.num_buckets,
                         syncer.is_pusher)
    return results


def test_every_layout_syncs_the_single_process_adapter_output(megatron_single_process, tmp_path):
    from megatron_pr2.convert.loading import (
        load_megatron_checkpoint,
        model_state_for_export,
    )
    from megatron_pr2.convert.pipeline import hf_to_megatron
    from megatron_pr2.convert.random_init import save_random_hf_checkpoint
    from megatron_pr2.convert.registry import adapter_for
    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.rollout.inprocess import InProcessEngine
    from megatron_pr2.routing.router import ReplayRouter

    save_random_hf_checkpoint(CFG, str(tmp_path / "hf"), seed=11)
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "megatron"))
    _, _, single = build_model(CFG, options=ModelOptions(router_class=ReplayRouter))
    load_megatron_checkpoint(single, str(tmp_path / "megatron"))
    set_predictors([single])
    reference = InProcessEngine(CFG)
    reference.update_weights(adapter_for(CFG).to_hf(model_state_for_export(single).items(),
                                                    predictive_gate=True))
    want = reference.model.state_dict()
    gate = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(want[gate], dict(single.named_parameters())[
        "decoder.layers.0.mlp.router.weight"])  # the predictor is folded in

    per_rank = run_distributed(_sync, 2, str(tmp_path / "megatron"), timeout=900)

    for name in LAYOUTS:
        state, buckets, _ = per_rank[0][name]
        assert buckets > 3, name
        assert state.keys() == want.keys(), name
        for key, tensor in want.items():
            assert torch.equal(state[key], tensor), f"{name}: {key}"
        pushers = [per_rank[r][name][2] for r in range(2)]
        expected = [True, True] if name.startswith("pp2") else [True, False]
        assert pushers == expected, name


def _unknown_name(rank):
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.rollout.inprocess import InProcessEngine
    from megatron_pr2.weight_sync import (
        WeightSyncError,
        WeightSyncOptions,
        build_weight_syncer,
    )

    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    _, _, model = build_model(CFG, ParallelConfig(pipeline_model_parallel_size=2))
    engine = InProcessEngine(preset("tiny-qwen3-moe"))  # its layer 2 is MoE: no dense MLP names
    syncer = build_weight_syncer([model], engine, CFG, WeightSyncOptions(bucket_bytes=BUCKET_BYTES))
    with pytest.raises(WeightSyncError) as info:
        syncer.sync()
    return str(info.value)


def test_a_name_the_engine_lacks_fails_on_every_rank_with_one_message():
    messages = run_distributed(_unknown_name, 2, timeout=600)
    assert messages[0] == messages[1]
    assert "rank 0: WeightNameError" in messages[0]  # rank 0 loads stage 1's buckets
    assert "model.layers.2.mlp.gate_proj.weight" in messages[0]
