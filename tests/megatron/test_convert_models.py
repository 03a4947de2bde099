"""HF checkpoints converted to Megatron compute what transformers computes, and convert back exactly."""

import os

import pytest
import torch
import transformers
from safetensors import safe_open

from megatron_pr2.convert.loading import (
    load_megatron_checkpoint,
    model_state_for_export,
)
from megatron_pr2.convert.pipeline import hf_to_megatron, megatron_to_hf
from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.convert.verify import hf_forward, megatron_forward
from megatron_pr2.models import build_model
from megatron_pr2.models.presets import preset

SHAPES = [
    ("tiny-qwen3-moe", {}),                                               # GQA 4q/2kv
    ("tiny-qwen3-moe", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("tiny-qwen3-moe", {"mlp_only_layers": [0, 2], "norm_topk_prob": False}),
    ("tiny-qwen3-moe", {"decoder_sparse_step": 2, "head_dim": 8, "num_experts_per_tok": 3}),
    ("tiny-qwen2-moe", {}),                                               # MHA, QKV bias, shared expert
    ("tiny-qwen2-moe", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    ("tiny-qwen2-moe", {"mlp_only_layers": [1], "qkv_bias": False}),
    ("tiny-qwen2-moe", {"decoder_sparse_step": 2, "shared_expert_intermediate_size": 16,
                        "norm_topk_prob": True}),
]


def _read_safetensors(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


def _converted_model(cfg, tmp_path, dtype=torch.float32, seed=0):
    hf_dir, mg_dir = str(tmp_path / "hf"), str(tmp_path / "megatron")
    hf_model = save_random_hf_checkpoint(cfg, hf_dir, seed=seed, dtype=dtype)
    hf_to_megatron(hf_dir, mg_dir)
    _, _, model = build_model(cfg)
    load_megatron_checkpoint(model, mg_dir)
    return hf_model, model.eval(), hf_dir, mg_dir


@pytest.mark.parametrize("name,overrides", SHAPES)
def test_megatron_logits_and_routes_equal_transformers(megatron_single_process, tmp_path, name,
                                                       overrides):
    cfg = preset(name, **overrides)
    hf_model, model, _, _ = _converted_model(cfg, tmp_path)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    hf_logits, hf_routes = hf_forward(hf_model, tokens)
    mg_logits, mg_routes = megatron_forward(model, tokens)
    torch.testing.assert_close(mg_logits, hf_logits, rtol=0, atol=1e-5)
    moe_layers = [i for i in range(cfg["num_hidden_layers"])
                  if i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0]
    assert sorted(hf_routes) == sorted(mg_routes) == moe_layers
    for layer in moe_layers:
        assert hf_routes[layer].shape == (32, cfg["num_experts_per_tok"])
        assert torch.equal(mg_routes[layer], hf_routes[layer]), f"layer {layer} routes differ"


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_hf_to_megatron_to_hf_is_bit_exact_and_loads_in_transformers(megatron_single_process,
                                                                      tmp_path, name):
    cfg = preset(name, mlp_only_layers=[1], tie_word_embeddings=name == "tiny-qwen2-moe")
    hf_dir, mg_dir, out_dir = (str(tmp_path / d) for d in ("hf", "megatron", "back"))
    save_random_hf_checkpoint(cfg, hf_dir, dtype=torch.bfloat16)
    hf_to_megatron(hf_dir, mg_dir)
    megatron_to_hf(mg_dir, out_dir, max_shard_bytes=64 * 1024, read_group_bytes=16 * 1024)
    source, result = _read_safetensors(hf_dir), _read_safetensors(out_dir)
    assert result.keys() == source.keys()
    for key in source:
        assert result[key].dtype == torch.bfloat16
        assert torch.equal(result[key], source[key]), key
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
    tokens = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    logits = [transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(tokens).logits
              for d in (hf_dir, out_dir)]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_weight_sync_api_maps_the_megatron_state_dict_to_the_hf_tensors(megatron_single_process,
                                                                        tmp_path, name):
    cfg = preset(name, decoder_sparse_step=2)
    _, model, hf_dir, _ = _converted_model(cfg, tmp_path)
    exported = dict(adapter_for(cfg).to_hf(model_state_for_export(model).items()))
    source = _read_safetensors(hf_dir)
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)
