"""Megatron models built from HF configs: parameter counts against transformers, and refusals."""

import pytest
import torch
import transformers

from megatron_pr2.models import (
    ModelOptions,
    TransformerEngineMissingError,
    UnsupportedConfigError,
    build_model,
    parse_hf_config,
)
from megatron_pr2.models.presets import preset

SHAPES = [
    ("tiny-qwen3-moe", {}),
    ("tiny-qwen3-moe", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("tiny-qwen3-moe", {"mlp_only_layers": [0, 2], "num_experts": 4, "num_experts_per_tok": 1,
                        "norm_topk_prob": False}),
    ("tiny-qwen3-moe", {"decoder_sparse_step": 2, "head_dim": 8, "norm_topk_prob": False}),
    ("tiny-qwen2-moe", {}),
    ("tiny-qwen2-moe", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    ("tiny-qwen2-moe", {"mlp_only_layers": [1], "decoder_sparse_step": 1, "qkv_bias": False}),
    ("tiny-qwen2-moe", {"decoder_sparse_step": 2, "shared_expert_intermediate_size": 16}),
]


def _hf_param_count(cfg: dict) -> int:
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,overrides", SHAPES)
def test_parameter_count_matches_transformers(megatron_single_process, name, overrides):
    cfg = preset(name, **overrides)
    _, _, model = build_model(cfg)
    megatron_count = sum(p.numel() for p in model.parameters())
    assert megatron_count == _hf_param_count(cfg)


def test_moe_layer_pattern_follows_mlp_only_layers_and_sparse_step():
    spec = parse_hf_config(preset("tiny-qwen3-moe", num_hidden_layers=6, mlp_only_layers=[0],
                                  decoder_sparse_step=2))
    # layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0 (transformers' rule)
    assert spec.moe_layer_pattern == (0, 1, 0, 1, 0, 1)


def test_forward_and_backward_run_on_cpu(megatron_single_process):
    _, _, model = build_model(preset("tiny-qwen3-moe"))
    tokens = torch.randint(0, 64, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    loss = model(tokens, positions, attention_mask=None, labels=tokens).mean()
    loss.backward()
    router = model.decoder.layers[0].mlp.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value,message", [
    ("architectures", ["LlamaForCausalLM"], "unsupported architecture 'LlamaForCausalLM'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope scaling 'yarn'"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_only_layers", [7], "mlp_only_layers has layer ids out of range"),
    ("num_experts", 0, "num_experts must be > 0"),
    ("num_experts_per_tok", 1, "num_experts_per_tok=1 with norm_topk_prob=true"),
])
def test_unsupported_fields_are_refused_by_name(field, value, message):
    with pytest.raises(UnsupportedConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_hf_config(preset("tiny-qwen3-moe", **{field: value}))


def test_transformer_engine_requested_without_it_is_a_clear_error(megatron_single_process):
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("TransformerEngine is installed here")
    except ImportError:
        pass
    with pytest.raises(TransformerEngineMissingError, match="transformer_engine is not importable"):
        build_model(preset("tiny-qwen3-moe"), options=ModelOptions(use_transformer_engine=True))


def test_layout_that_does_not_divide_the_model_is_refused(megatron_single_process):
    from megatron_pr2.platform import ParallelConfig

    with pytest.raises(ValueError, match="world size 1 is not divisible by TP\\*PP\\*CP"):
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).validate(1)
    with pytest.raises(ValueError, match="needs --sequence-parallel"):
        ParallelConfig(tensor_model_parallel_size=2).validate(2)


def test_full_recompute_matches_plain_backward_without_attention_mask(megatron_single_process):
    """Recompute in backward must see the CPU backend too (Megatron builds the causal mask there)."""
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    grads = []
    for overrides in ({}, recompute):
        torch.manual_seed(0)
        from megatron_pr2.platform import seed_model_parallel

        seed_model_parallel(0)
        _, _, model = build_model(preset("tiny-qwen3-moe"), options=ModelOptions(
            config_overrides=overrides))
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(8).expand(2, -1)
        model(tokens, positions, None, labels=tokens).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_cpu_backend_keeps_cuda_requests_on_cpu(megatron_single_process):
    """Megatron's ``device="cuda"`` factories and ``.cuda()`` calls land on CPU."""
    made = torch.zeros(3, device="cuda")
    moved = torch.ones(2).cuda()
    assert made.device.type == "cpu" and moved.device.type == "cpu"
    assert torch.equal(moved, torch.ones(2))
