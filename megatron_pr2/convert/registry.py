"""Pick the state-dict adapter for a config: one adapter class per model family."""

from __future__ import annotations

from megatron_pr2.convert.adapter import StateDictAdapter
from megatron_pr2.convert.qwen2_moe import Qwen2MoeAdapter
from megatron_pr2.convert.qwen3_moe import Qwen3MoeAdapter
from megatron_pr2.models.hf_config import QwenMoeSizes, parse_hf_config

ADAPTERS: dict[str, type[StateDictAdapter]] = {
    "qwen3_moe": Qwen3MoeAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
}


def adapter_for(hf_config) -> StateDictAdapter:
    """The adapter for an HF config (dir, ``config.json`` path, dict or parsed spec).

    Raises:
        UnsupportedConfigError: unknown architecture or an unsupported config field.
    """
    spec = hf_config if isinstance(hf_config, QwenMoeSizes) else parse_hf_config(hf_config)
    return ADAPTERS[spec.family](spec)
