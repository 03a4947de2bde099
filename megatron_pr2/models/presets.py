"""Embedded tiny HF configs: the CPU default and the test fixtures."""

from __future__ import annotations

import copy

TINY_QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

TINY_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "qkv_bias": True,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# The main job's model: routing shaped like a real fine-grained MoE (many small experts, top-4;
# Qwen3-30B-A3B has 128 of 768 wide, top-8), the rest as TINY_QWEN3_MOE.
TINY_QWEN3_MOE_FINE_GRAINED = {**TINY_QWEN3_MOE, "num_experts": 32, "num_experts_per_tok": 4,
                               "moe_intermediate_size": 16}

PRESETS = {"tiny-qwen3-moe": TINY_QWEN3_MOE, "tiny-qwen2-moe": TINY_QWEN2_MOE,
           "tiny-qwen3-moe-fg": TINY_QWEN3_MOE_FINE_GRAINED}


def preset(name: str, **overrides) -> dict:
    """A copy of an embedded HF config dict, with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg.update(overrides)
    return cfg
