"""Hugging Face Qwen-MoE ``config.json`` -> Megatron-Core ``TransformerConfig``.

Every HF field that changes the computation is either mapped or refused with
:class:`UnsupportedConfigError` naming it; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")


class UnsupportedConfigError(ValueError):
    """An HF config asks for something this project cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class QwenMoeSizes:
    """The sizes of a Qwen-MoE model (the computation-relevant facts of its HF config); not a
    Megatron layer spec (``models/spec.py``)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layer_pattern: tuple[int, ...]
    shared_expert_intermediate_size: int
    qk_layernorm: bool
    qkv_bias: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def family(self) -> str:
        return "qwen3_moe" if self.architecture == "Qwen3MoeForCausalLM" else "qwen2_moe"

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layer_pattern) if is_moe]


def load_hf_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Read ``config.json`` (a directory, a file path, or an already-parsed dict).

    transformers >= 5 saves Qwen-MoE's ``num_experts`` as ``num_local_experts``; the alias is
    resolved here so every reader sees ``num_experts``.
    """
    if isinstance(path_or_dict, dict):
        config = dict(path_or_dict)
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no Hugging Face config at {path}")
        with open(path, encoding="utf-8") as handle:
            try:
                config = json.load(handle)
            except json.JSONDecodeError as err:
                raise UnsupportedConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") \
                    from err
        if not isinstance(config, dict):
            raise UnsupportedConfigError(f"{path}: expected a JSON object of config fields")
    if "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    return config


def resolve_hf_config(name_or_path: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """An embedded preset name (``megatron_pr2.models.presets``), else :func:`load_hf_config`."""
    from megatron_pr2.models.presets import PRESETS

    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return load_hf_config(PRESETS[name_or_path])
    return load_hf_config(name_or_path)


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    by_type = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
    arch = archs[0] if archs else by_type.get(model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"unsupported architecture {arch or model_type!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    expected_type = next((t for t, a in by_type.items() if a == arch), None)
    if model_type is not None and expected_type is not None and model_type != expected_type:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} contradicts architectures {archs!r} (which needs "
            f"model_type {expected_type!r}); fix config.json")
    return arch


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedConfigError(
            f"rope scaling {rope_type!r} (rope_parameters/rope_scaling) is not supported; "
            "only default RoPE is reproduced exactly"
        )
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise UnsupportedConfigError("config has no rope_theta")
    return float(theta)


def _refuse_unsupported(cfg: dict[str, Any], arch: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    if cfg.get("use_sliding_window", False):
        raise UnsupportedConfigError("use_sliding_window=true is not supported")
    if arch == "Qwen3MoeForCausalLM" and cfg.get("attention_bias", False):
        raise UnsupportedConfigError("attention_bias=true (bias on q/k/v/o) is not supported")
    if float(cfg.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise UnsupportedConfigError("attention_dropout != 0 is not supported")
    if int(cfg.get("num_experts", 0) or 0) <= 0:
        raise UnsupportedConfigError("num_experts must be > 0 for a Qwen-MoE model")
    if int(cfg.get("num_experts_per_tok", 0)) == 1 and cfg.get("norm_topk_prob", False):
        raise UnsupportedConfigError(
            "num_experts_per_tok=1 with norm_topk_prob=true (a constant gate of 1.0) is not "
            "supported: Megatron-Core's top-1 routing keeps the softmax probability"
        )


def _moe_layer_pattern(cfg: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= i < num_layers)
    if bad:
        raise UnsupportedConfigError(f"mlp_only_layers has layer ids out of range: {bad}")
    return tuple(int(i not in dense and (i + 1) % step == 0) for i in range(num_layers))


def parse_hf_config(path_or_dict) -> QwenMoeSizes:
    """Read and validate a Qwen3-MoE / Qwen2-MoE HF config."""
    cfg = load_hf_config(path_or_dict)
    arch = _architecture(cfg)
    _refuse_unsupported(cfg, arch)
    try:
        return _spec(cfg, arch)
    except KeyError as err:
        raise UnsupportedConfigError(f"the config has no {err.args[0]!r} field") from err


def _spec(cfg: dict[str, Any], arch: str) -> QwenMoeSizes:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    num_layers = int(cfg["num_hidden_layers"])
    is_qwen2 = arch == "Qwen2MoeForCausalLM"
    return QwenMoeSizes(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        num_experts=int(cfg["num_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layer_pattern=_moe_layer_pattern(cfg, num_layers),
        shared_expert_intermediate_size=(
            int(cfg.get("shared_expert_intermediate_size") or 0) if is_qwen2 else 0
        ),
        qk_layernorm=not is_qwen2,
        qkv_bias=bool(cfg.get("qkv_bias", True)) if is_qwen2 else False,
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def to_transformer_config(spec: QwenMoeSizes, parallel=None, **overrides):
    """Build the Megatron-Core ``TransformerConfig`` that computes what HF computes.

    Args:
        spec: the parsed HF config.
        parallel: a :class:`megatron_pr2.platform.ParallelConfig` (default: no parallelism).
        **overrides: further ``TransformerConfig`` fields (e.g. ``recompute_granularity``).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_pr2.platform import ParallelConfig

    parallel = parallel or ParallelConfig()
    fields = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        qk_layernorm=spec.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.top_k,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_layer_freq=list(spec.moe_layer_pattern),
        moe_router_pre_softmax=not spec.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",
        moe_shared_expert_intermediate_size=spec.shared_expert_intermediate_size or None,
        moe_shared_expert_gate=bool(spec.shared_expert_intermediate_size),
        moe_shared_expert_overlap=False,
        moe_grouped_gemm=False,
        params_dtype=torch.float32,
        **parallel.megatron_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch.float32,
        cuda_graph_scope=[],  # the whole layer; Megatron's default "full" is deprecated (warns)
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
