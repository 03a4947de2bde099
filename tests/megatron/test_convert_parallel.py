"""One converted checkpoint loads under TP=2 (+sequence parallel), EP=2 and PP=2 on two
processes, gives the logits of the transformers model it came from, and its gathered parameters
map back to the HF tensors (the weight-sync path)."""

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.convert.pipeline import describe_megatron_checkpoint, hf_to_megatron
from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.convert.sharding import (
    TargetParallelism,
    global_megatron_name,
    merge_tp_shards,
)
from megatron_pr2.convert.verify import hf_forward, megatron_forward
from megatron_pr2.models import build_model
from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from tests.multiproc import run_distributed

LAYOUTS = {
    "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": ParallelConfig(expert_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}
# name -> (HF config, layouts to load it under). Tied embeddings are not tried with PP=2:
# Megatron's tied-embedding set-up across stages calls ``weight.data.cuda()``, which the CPU
# backend does not map yet.
CONFIGS = {
    "qwen3-tied": (preset("tiny-qwen3-moe", tie_word_embeddings=True), ("tp2-sp", "ep2")),
    "qwen2-dense-layer": (preset("tiny-qwen2-moe", mlp_only_layers=[2], num_key_value_heads=2),
                          ("tp2-sp", "ep2", "pp2")),
}


@torch.no_grad()
def _forward(model, tokens):
    """Full ``[B, S, V]`` logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    output = model(tokens, positions, attention_mask=None)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(output)


@torch.no_grad()
def _global_state(model, adapter):
    """This rank's parameters under single-process names, TP shards all-gathered and merged
    (what the trainer's weight sync feeds to ``adapter.to_hf``)."""
    from megatron.core import parallel_state as ps

    layer_offset = model.decoder.layers[0].layer_number - 1
    local_experts = adapter.spec.num_experts // ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * local_experts
    state = {}
    for local_name, param in model.named_parameters():
        name = global_megatron_name(local_name, layer_offset, expert_offset)
        rule = adapter.rule_for_megatron(name)
        group = (ps.get_expert_tensor_parallel_group() if ".local_experts." in name
                 else ps.get_tensor_model_parallel_group())
        tensor = param.detach()
        if rule.tp_axis is not None and dist.get_world_size(group) > 1:
            shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = merge_tp_shards(shards, rule.tp_axis, rule.glu)
        state[name] = tensor
    return state


def _load_and_forward(rank, checkpoints, tokens):
    from megatron_pr2.platform import initialize_model_parallel

    results = {}
    for config_name, (cfg, ckpt_dir, reference_state) in checkpoints.items():
        for layout_name in CONFIGS[config_name][1]:
            parallel = LAYOUTS[layout_name]
            initialize_model_parallel(parallel)
            _, _, model = build_model(cfg, parallel)
            load_megatron_checkpoint(model, ckpt_dir)
            state = _global_state(model, adapter_for(cfg))
            differing = sorted(n for n, t in state.items() if not torch.equal(t, reference_state[n]))
            results[(config_name, layout_name)] = (_forward(model.eval(), tokens), set(state),
                                                  differing)
    return results


def test_converted_checkpoint_loads_under_tp_ep_pp(megatron_single_process, tmp_path):
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    checkpoints, references = {}, {}
    for name, (cfg, _) in CONFIGS.items():
        hf_model = save_random_hf_checkpoint(cfg, str(tmp_path / name / "hf"), seed=11)
        ckpt_dir = str(tmp_path / name / "megatron")
        hf_to_megatron(str(tmp_path / name / "hf"), ckpt_dir, TargetParallelism(2, 2, 2))
        assert describe_megatron_checkpoint(ckpt_dir)["parallel_layout"][
            "tensor_model_parallel_size"] == 2
        hf_tensors = {}
        for shard in (p for p in os.listdir(tmp_path / name / "hf") if p.endswith(".safetensors")):
            hf_tensors.update(load_file(str(tmp_path / name / "hf" / shard)))
        checkpoints[name] = (cfg, ckpt_dir, dict(adapter_for(cfg).to_megatron(hf_tensors.items())))
        references[name] = hf_forward(hf_model, tokens)[0]
        # the TP=2-chunked checkpoint also loads into one process (resharding on load)
        _, _, single = build_model(cfg)
        load_megatron_checkpoint(single, ckpt_dir)
        torch.testing.assert_close(megatron_forward(single.eval(), tokens)[0], references[name],
                                   rtol=0, atol=1e-5)

    per_rank = run_distributed(_load_and_forward, 2, checkpoints, tokens)

    assert sorted(per_rank[1]) == sorted((c, l) for c, (_, ls) in CONFIGS.items() for l in ls)
    for key in per_rank[1]:
        config_name, layout_name = key
        last_stage = per_rank[1][key][0]
        assert last_stage is not None, f"{config_name} {layout_name}: no logits on rank 1"
        where = f"{config_name} under {layout_name}"
        torch.testing.assert_close(last_stage, references[config_name], rtol=0, atol=1e-5,
                                   msg=lambda m, where=where: f"{where}: {m}")
        if layout_name != "pp2":   # TP/EP ranks both hold the full logits
            torch.testing.assert_close(per_rank[0][key][0], references[config_name], rtol=0,
                                       atol=1e-5)
        # weight-sync view: gathered, renamed parameters equal the HF-derived tensors, and the
        # two ranks together hold every tensor
        assert per_rank[0][key][2] == per_rank[1][key][2] == [], (key, per_rank[0][key][2])
        assert per_rank[0][key][1] | per_rank[1][key][1] == set(checkpoints[config_name][2])
