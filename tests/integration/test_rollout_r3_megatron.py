"""R3 end to end: engine routes, aligned by the route plan, replayed by Megatron under TP+SP and PP.

The in-process engine generates from an HF checkpoint; Megatron loads the same weights (converted)
and replays the engine's routes through ``ReplayRouter``. Reference: Megatron's own live top-k at
each router row, which the router compares with the replayed route (zero-deviation ratio). With
the same fp32 weights the engine's route of a token is Megatron's live route of that token, so
only a route that reached exactly its token's router row agrees; a plan with rows in the wrong
order (the negative control) does not. The plan a rank builds from the routes the driver cuts to
its token slice (``dp_view`` with its ``GridLayout``) replays as exactly.
"""

import torch
import torch.distributed as dist

from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.convert.pipeline import hf_to_megatron
from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.convert.sharding import TargetParallelism
from megatron_pr2.models import ModelOptions, build_model
from megatron_pr2.models.pipeline_stages import stage_layer_numbers
from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from megatron_pr2.rollout.alignment import (
    TokenParallel,
    build_micro_batches,
    build_route_plan,
    local_moe_layer_numbers,
)
from megatron_pr2.rollout.exchange import dp_view
from megatron_pr2.rollout.grid_layout import GridLayout, build_grids
from megatron_pr2.rollout.inprocess import InProcessEngine
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan
from tests.multiproc import run_distributed

CFG = preset("tiny-qwen3-moe", mlp_only_layers=[1])  # MoE layers 1, 3, 4 (global numbers)
PROMPTS = [[5, 7, 9, 11, 13], [3, 4, 6], [8, 9, 10, 11, 12, 13, 14], [20, 21]]
ROUTE_SHAPES = {
    "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}


@torch.no_grad()
def _stage_forward(model, tokens):
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    output = model(tokens, positions, attention_mask=None)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())


def _scrambled(plan: RoutePlan) -> RoutePlan:
    """The same routes with rows in batch-first instead of sequence-first order."""
    out = RoutePlan()
    for (mb, layer), routes in plan.routes.items():
        rows = routes.expert_ids.shape[0]
        order = torch.arange(rows).view(-1, 2).T.reshape(-1)  # B = 2 per micro-batch
        out.add(mb, layer, LayerRoutes(routes.expert_ids[order], routes.valid[order]))
    return out


def _replay(rank, ckpt_dir, samples):
    from megatron.core import parallel_state

    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.routing.controller import RoutingController
    from megatron_pr2.routing.router import ReplayRouter

    route_shape = RouteShape.from_hf_config(CFG)
    results = {}
    for name, parallel in ROUTE_SHAPES.items():
        initialize_model_parallel(parallel)
        _, _, model = build_model(CFG, parallel, ModelOptions(router_class=ReplayRouter))
        load_megatron_checkpoint(model, ckpt_dir)
        model.eval()
        token_parallel = TokenParallel(
            tp_size=parallel.tensor_model_parallel_size,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            sequence_parallel=parallel.sequence_parallel)
        stage = stage_layer_numbers(CFG["num_hidden_layers"], parallel.pipeline_model_parallel_size,
                                    parallel_state.get_pipeline_model_parallel_rank())
        controller = RoutingController(model)
        assert controller.layer_numbers() == local_moe_layer_numbers(stage, route_shape)
        micro_batches = build_micro_batches(samples, list(range(len(samples))), 2, "bshd", token_parallel)
        plan = build_route_plan(micro_batches, samples, route_shape, layer_numbers=stage,
                                parallel=token_parallel)
        layout = GridLayout(2, token_parallel)
        cut = dp_view(samples, 1, 0, layout=layout)  # what the driver sends this rank
        results[(name, "rows_sent")] = sum(s.routed_experts.shape[0] for s in cut)
        cut_plan = build_route_plan(build_grids(cut, range(len(cut)), layout), cut, route_shape,
                                    layer_numbers=stage, parallel=token_parallel)
        for label, this_plan in (("aligned", plan), ("token_slice", cut_plan),
                                 ("scrambled", _scrambled(plan))):
            controller.begin_step("replay", plan=this_plan)
            for mb_id, micro_batch in enumerate(micro_batches):
                controller.set_microbatch(mb_id)
                _stage_forward(model, micro_batch.tokens)
            step = controller.end_step()
            results[(name, label)] = {
                layer: (m.summary()["zero_deviation_ratio"], m.replay_tokens)
                for layer, m in step.metrics.items()}
            if label == "aligned":
                results[(name, "valid_rows")] = {
                    layer: sum(int(plan.get(mb, layer).valid.sum()) for mb in plan.microbatch_ids())
                    for layer in plan.layer_numbers()}
        controller.close()
    return results


def test_engine_routes_replayed_in_megatron_match_its_live_routes(megatron_single_process, tmp_path):
    hf_dir, ckpt_dir = str(tmp_path / "hf"), str(tmp_path / "megatron")
    save_random_hf_checkpoint(CFG, hf_dir, seed=4)
    hf_to_megatron(hf_dir, ckpt_dir, TargetParallelism(2, 2, 2))
    engine = InProcessEngine.from_pretrained(hf_dir)
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, greedy=True, ignore_eos=True))

    per_rank = run_distributed(_replay, 2, ckpt_dir, samples)

    layers_seen = {"tp2-sp": set(), "pp2": set()}
    for rank, results in enumerate(per_rank):
        for name in ROUTE_SHAPES:
            aligned, scrambled = results[(name, "aligned")], results[(name, "scrambled")]
            assert results[(name, "token_slice")] == aligned
            for layer, (ratio, tokens) in aligned.items():
                assert tokens == results[(name, "valid_rows")][layer] > 0
                assert ratio == 1.0, f"{name} rank {rank} layer {layer}: zero-deviation {ratio}"
                assert scrambled[layer][0] < 0.6, f"{name} layer {layer}: control {scrambled[layer]}"
            layers_seen[name] |= set(aligned)
    assert layers_seen == {"tp2-sp": {1, 3, 4}, "pp2": {1, 3, 4}}
    all_rows = sum(s.total_length - 1 for s in samples)
    assert [r[("pp2", "rows_sent")] for r in per_rank] == [all_rows, all_rows]  # no SP: whole
    assert sum(r[("tp2-sp", "rows_sent")] for r in per_rank) == all_rows  # SP: split in two
