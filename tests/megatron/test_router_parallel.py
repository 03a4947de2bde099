"""PR2 routing under TP=2+SP, EP=2 and PP=2 on 2 gloo processes, against one process.

Both runs load the same converted checkpoint and train with Megatron's own machinery
(``DistributedDataParallel``, ``get_megatron_optimizer`` with the predictor's parameter group,
``finalize_model_grads``, ``get_forward_backward_func`` schedules): two rollout batches, each
a predict pass followed by three replayed mini-steps (predictor loss from mini-step 2).
"""

import pytest
import torch

from megatron_pr2.models.presets import preset
from tests.multiproc import run_distributed

# layer 2 (global, 1-based) is dense: MoE layers are 1, 3 and 4
HF_CONFIG = preset("tiny-qwen3-moe", initializer_range=0.1, mlp_only_layers=[1])
NUM_MICROBATCHES, GLOBAL_MICROBATCH, SEQ = 2, 2, 8
LAYOUTS = {
    "tp2-sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "ep2": {"expert_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
    "pp2-vpp2": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
}
# MoE layers (global numbers) each rank owns, by pipeline rank: stage 0 of pp2 builds layers
# 1-2, stage 1 layers 3-4; with two virtual stages, stage 0 builds layers 1 and 3.
LOCAL_MOE_LAYERS = {"pp2": {0: [1], 1: [3, 4]}, "pp2-vpp2": {0: [1, 3], 1: [4]}}
# pipeline runs with full activation recompute: recompute in backward under the 1F1B and the
# interleaved schedules, where other micro-batches run forward in between
_FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform",
                   "recompute_num_layers": 1}
RECOMPUTE = {"pp2": _FULL_RECOMPUTE, "pp2-vpp2": _FULL_RECOMPUTE}


def _microbatches(tokens, rollout, dp_rank, dp_size):
    """Micro-batch i of a DP rank: its share of the samples of global micro-batch i."""
    per_rank = GLOBAL_MICROBATCH // dp_size
    out = []
    for i in range(NUM_MICROBATCHES):
        start = i * GLOBAL_MICROBATCH + dp_rank * per_rank
        samples = tokens[start:start + per_rank]
        s = samples.shape[1] - 1
        out.append({
            "id": rollout * 100 + i,
            "tokens": samples[:, :-1],
            "labels": samples[:, 1:],
            "positions": torch.arange(s).expand(per_rank, -1),
            # explicit: Megatron's default mask is made with device="cuda", which the CPU
            # backend cannot map inside autograd's backward (activation recompute)
            "mask": torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(per_rank, 1, s, s),
        })
    return out


def _run_schedule(chunks, controller, microbatches, forward_only):
    from megatron_pr2.training.pipeline_schedule import run_schedule

    def forward_step(batch, model):
        controller.set_microbatch(batch["id"])
        output = model(batch["tokens"], batch["positions"], batch["mask"], labels=batch["labels"])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}
        return output, loss_func

    run_schedule(chunks, microbatches, forward_step, seq_length=SEQ,
                 micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)


def train(parallel, ckpt_dir, rollouts, config_overrides=None) -> dict:
    """Two rollout batches of PR2 on this rank; returns routes and predictor weights."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.models import ModelOptions, build_model_chunks
    from megatron_pr2.routing.controller import RoutingController
    from megatron_pr2.routing.predictor import (
        predictor_optimizer_overrides,
        set_group_lrs_to_max,
    )
    from megatron_pr2.routing.router import ReplayRouter
    from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp

    _, config, chunks = build_model_chunks(HF_CONFIG, parallel, ModelOptions(
        router_class=ReplayRouter, config_overrides=config_overrides or {}))
    load_megatron_checkpoint(chunks, ckpt_dir)
    model = wrap_with_ddp(chunks, config)
    overrides = predictor_optimizer_overrides(OptimizerConfig(optimizer="adam", lr=1e-3),
                                              lr_mult=10.0)
    optimizer = build_optimizer(model, lr=1e-3, optimizer="adam", config_overrides=overrides)
    set_group_lrs_to_max(optimizer)
    controller = RoutingController(model)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    result = {"plans": [], "metrics": [], "layers": controller.layer_numbers()}
    for rollout, tokens in enumerate(rollouts):
        microbatches = _microbatches(tokens, rollout, dp_rank, dp_size)
        controller.begin_step("predict")
        _run_schedule(model, controller, microbatches, forward_only=True)
        plan = controller.end_step().routes
        result["plans"].append({key: r.expert_ids.clone() for key, r in plan.routes.items()})
        for ministep in (1, 2, 3):
            controller.begin_step("replay", plan=plan, train_predictor=ministep >= 2)
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            _run_schedule(model, controller, microbatches, forward_only=False)
            result["metrics"].append(controller.end_step().metric_summary())
            optimizer.step()
    result["predictor"] = {r.layer_number: r.predictor.weight.detach().clone()
                           for r in controller.routers}
    result["predictor_sharded"] = {
        k: (tuple(v.global_shape), tuple(v.local_shape), tuple(v.replica_id))
        for chunk in chunks for k, v in chunk.sharded_state_dict().items()
        if k.endswith("router.predictor.weight")}
    result["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    result["pp_rank"] = parallel_state.get_pipeline_model_parallel_rank()
    result["dp_rank"] = dp_rank
    controller.close()
    return result


def _rank_main(rank, ckpt_dir, rollouts):
    from megatron_pr2.platform import (
        ParallelConfig,
        destroy_model_parallel,
        initialize_model_parallel,
    )

    results = {}
    for name, layout in LAYOUTS.items():
        initialize_model_parallel(ParallelConfig(**layout))
        results[name] = train(ParallelConfig(**layout), ckpt_dir, rollouts, RECOMPUTE.get(name))
    destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_single_process):
    import transformers

    from megatron_pr2.convert.pipeline import hf_to_megatron

    hf_dir = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**HF_CONFIG))
    hf_model.save_pretrained(hf_dir)
    ckpt_dir = tmp_path_factory.mktemp("megatron") / "ckpt"
    hf_to_megatron(str(hf_dir), str(ckpt_dir))
    return str(ckpt_dir)


@pytest.fixture(scope="module")
def rollouts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, HF_CONFIG["vocab_size"],
                          (NUM_MICROBATCHES * GLOBAL_MICROBATCH, SEQ + 1), generator=gen)
            for _ in range(2)]


@pytest.fixture(scope="module")
def reference(checkpoint, rollouts):
    from megatron_pr2.platform import ParallelConfig

    return train(ParallelConfig(), checkpoint, rollouts)


@pytest.fixture(scope="module")
def parallel_runs(checkpoint, rollouts):
    return run_distributed(_rank_main, 2, checkpoint, rollouts)


def _expected_local_routes(ref_ids, layout, result):
    """The rows of a single-process route this rank's router sees, in its token order."""
    k = ref_ids.shape[-1]
    view = ref_ids.view(SEQ, -1, k)  # [S, B, K], sequence-first
    if layout == "tp2-sp":
        half = SEQ // 2
        view = view[result["tp_rank"] * half:(result["tp_rank"] + 1) * half]
    elif layout == "ep2":
        per_rank = view.shape[1] // 2
        view = view[:, result["dp_rank"] * per_rank:(result["dp_rank"] + 1) * per_rank]
    return view.reshape(-1, k)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_routes_land_on_the_right_rank_stage_and_layer(reference, parallel_runs, layout):
    for rank, results in enumerate(parallel_runs):
        result = results[layout]
        expected_layers = LOCAL_MOE_LAYERS.get(layout, {}).get(result["pp_rank"], [1, 3, 4])
        assert result["layers"] == expected_layers, f"rank {rank}"
        for rollout, plan in enumerate(result["plans"]):
            assert sorted({layer for _, layer in plan}) == expected_layers
            for (mb, layer), ids in plan.items():
                expected = _expected_local_routes(reference["plans"][rollout][(mb, layer)],
                                                  layout, result)
                same = (ids.long().sort(-1).values == expected.long().sort(-1).values).all(-1)
                if rollout == 0:  # W_p == 0: the live routes of identical weights
                    assert bool(same.all()), f"rank {rank} mb {mb} layer {layer}"
                else:  # routes from W_p trained in both runs: allow a near-tie flip
                    assert float(same.float().mean()) >= 0.95, f"rank {rank} mb {mb} layer {layer}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_predictor_weights_are_replicated_and_equal_the_single_process_run(
        reference, parallel_runs, layout):
    by_layer = {}
    for results in parallel_runs:
        for layer, weight in results[layout]["predictor"].items():
            by_layer.setdefault(layer, []).append(weight)
    assert sorted(by_layer) == [1, 3, 4]
    for layer, weights in by_layer.items():
        ref = reference["predictor"][layer]
        assert ref.abs().max() > 1e-3, "the predictor should have been trained"
        for weight in weights[1:]:  # TP ranks / DP replicas hold the same predictor bit for bit
            assert torch.equal(weight, weights[0]), f"layer {layer}"
        torch.testing.assert_close(weights[0], ref, rtol=1e-4, atol=1e-5)


def test_predictor_is_checkpointed_replicated_over_tensor_parallel(parallel_runs):
    entries = [results["tp2-sp"]["predictor_sharded"] for results in parallel_runs]
    assert entries[0].keys() == entries[1].keys() and len(entries[0]) == 3
    for key in entries[0]:
        (g0, l0, r0), (g1, l1, r1) = entries[0][key], entries[1][key]
        assert g0 == l0 == g1 == l1 == (HF_CONFIG["num_experts"], HF_CONFIG["hidden_size"])
        assert r0 != r1  # the same full tensor, one replica per TP rank


def test_routing_metrics_are_reported_per_local_layer(parallel_runs, reference):
    ref_steps = reference["metrics"]
    assert "layer_1/zero_deviation_ratio" in ref_steps[0]
    assert "layer_4/predictor_topk_acc" in ref_steps[1] and "layer_4/predictor_loss" in ref_steps[1]
    assert not any("predictor" in key for key in ref_steps[0])  # mini-step 1: no predictor loss
    assert not any(key.startswith("layer_2/") for key in ref_steps[0])  # dense layer
    for layout, stages in LOCAL_MOE_LAYERS.items():
        for results in parallel_runs:
            result = results[layout]
            layers = {int(key.split("/")[0][len("layer_"):]) for key in result["metrics"][1]}
            assert sorted(layers) == stages[result["pp_rank"]]
