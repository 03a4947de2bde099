"""State-dict adapters: key tables against what transformers writes, and streaming behaviour."""

import json
import os
import random

import pytest
import torch

from megatron_pr2.convert.adapter import PREDICTOR_SUFFIX
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.models import UnsupportedConfigError
from megatron_pr2.models.presets import preset

CONFIGS = [
    preset("tiny-qwen3-moe", num_hidden_layers=3, mlp_only_layers=[1]),
    preset("tiny-qwen3-moe", num_hidden_layers=2, tie_word_embeddings=True),
    preset("tiny-qwen2-moe", num_hidden_layers=2, decoder_sparse_step=2),
    preset("tiny-qwen2-moe", num_hidden_layers=2, qkv_bias=False),
]


def _random_hf_tensors(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen)
            for rule in adapter.rules for name, shape in zip(rule.hf_names, rule.hf_shapes)}


@pytest.mark.parametrize("cfg", CONFIGS)
def test_key_table_names_and_shapes_match_what_transformers_saves(tmp_path, cfg):
    save_random_hf_checkpoint(cfg, str(tmp_path), max_shard_size="10MB")
    from safetensors import safe_open

    saved = {}
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            saved[name] = tuple(handle.get_slice(name).get_shape())
    adapter = adapter_for(cfg)
    table = {n: tuple(s) for r in adapter.rules for n, s in zip(r.hf_names, r.hf_shapes)}
    assert table == saved


def test_streaming_round_trip_in_any_order_is_exact():
    adapter = adapter_for(CONFIGS[0])
    hf = _random_hf_tensors(adapter)
    items = list(hf.items())
    random.Random(0).shuffle(items)
    megatron = dict(adapter.to_megatron(items))
    assert set(megatron) == {r.megatron_name for r in adapter.rules}
    back = dict(adapter.to_hf(reversed(list(megatron.items()))))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_each_megatron_tensor_is_emitted_as_soon_as_its_sources_arrived():
    adapter = adapter_for(CONFIGS[0])
    hf = _random_hf_tensors(adapter)
    qkv = adapter.rule_for_megatron("decoder.layers.0.self_attention.linear_qkv.weight")
    fed = []

    def feed():
        for name in qkv.hf_names:
            fed.append(name)
            yield name, hf[name]
        raise AssertionError("the adapter read past the tensors it needed")

    name, tensor = next(adapter.to_megatron(feed()))
    assert name == qkv.megatron_name and fed == list(qkv.hf_names)
    assert tensor.shape == qkv.megatron_shape


def test_unexpected_duplicate_misshaped_and_missing_hf_tensors_are_refused():
    adapter = adapter_for(CONFIGS[0])
    hf = _random_hf_tensors(adapter)
    with pytest.raises(ConversionError, match="unexpected HF tensor 'model.layers.9.mlp.gate.weight'"):
        list(adapter.to_megatron([("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))]))
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ConversionError, match=f"HF tensor '{name}' was given twice"):
        list(adapter.to_megatron([(name, hf[name]), (name, hf[name])]))
    with pytest.raises(ConversionError, match=r"shape mismatch for model.norm.weight: got \(63,\)"):
        list(adapter.to_megatron([("model.norm.weight", torch.zeros(63))]))
    del hf["model.layers.2.mlp.experts.7.up_proj.weight"]
    with pytest.raises(ConversionError, match="missing HF tensors: model.layers.2.mlp.experts.7.up_proj"):
        list(adapter.to_megatron(hf.items()))


def test_tied_embeddings_have_no_output_layer_and_ignore_a_stored_lm_head():
    adapter = adapter_for(CONFIGS[1])
    hf = _random_hf_tensors(adapter)
    assert "lm_head.weight" not in hf
    megatron = dict(adapter.to_megatron([*hf.items(), ("lm_head.weight", torch.zeros(64, 64))]))
    assert "output_layer.weight" not in megatron


def _megatron_with_predictors(adapter, seed=1):
    megatron = dict(adapter.to_megatron(_random_hf_tensors(adapter).items()))
    gen = torch.Generator().manual_seed(seed)
    predictors = {n: torch.randn(adapter.predictor_shape(), generator=gen)
                  for n in adapter.predictor_names()}
    return megatron, predictors


def test_predictor_weights_are_dropped_or_folded_into_the_gate():
    adapter = adapter_for(CONFIGS[0])
    megatron, predictors = _megatron_with_predictors(adapter)
    assert sorted(predictors) == [f"decoder.layers.{i}.{PREDICTOR_SUFFIX}" for i in (0, 2)]
    plain = dict(adapter.to_hf([*megatron.items(), *predictors.items()]))
    gate = "model.layers.2.mlp.gate.weight"
    assert torch.equal(plain[gate], megatron["decoder.layers.2.mlp.router.weight"])
    folded = dict(adapter.to_hf([*predictors.items(), *megatron.items()], predictive_gate=True))
    expected = megatron["decoder.layers.2.mlp.router.weight"] + predictors[
        f"decoder.layers.2.{PREDICTOR_SUFFIX}"]
    assert torch.equal(folded[gate], expected)
    assert folded.keys() == plain.keys()
    with pytest.raises(ConversionError, match=f"missing Megatron tensors: decoder.layers.0.{PREDICTOR_SUFFIX}"):
        list(adapter.to_hf(megatron.items(), predictive_gate=True))


def test_unknown_architecture_and_empty_shared_expert_are_refused():
    with pytest.raises(UnsupportedConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        adapter_for(preset("tiny-qwen3-moe", architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConversionError, match="shared_expert_intermediate_size=0"):
        adapter_for(preset("tiny-qwen2-moe", shared_expert_intermediate_size=0))


def test_transformers5_qwen3_config_alias_is_accepted(tmp_path):
    from megatron_pr2.convert.hf_checkpoint import read_hf_config

    save_random_hf_checkpoint(preset("tiny-qwen3-moe", num_hidden_layers=1), str(tmp_path))
    with open(tmp_path / "config.json") as handle:
        assert "num_local_experts" in json.load(handle)   # how transformers 5 saves it
    assert adapter_for(read_hf_config(str(tmp_path))).spec.num_experts == 8
