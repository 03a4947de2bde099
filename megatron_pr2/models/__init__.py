"""HF Qwen-MoE configs -> Megatron-Core models with the project's layer spec."""

from megatron_pr2.models.builder import ModelOptions, build_model, build_model_chunks
from megatron_pr2.models.hf_config import (
    QwenMoeSizes,
    UnsupportedConfigError,
    parse_hf_config,
    to_transformer_config,
)
from megatron_pr2.models.spec import TransformerEngineMissingError, decoder_block_spec

__all__ = [
    "ModelOptions",
    "QwenMoeSizes",
    "TransformerEngineMissingError",
    "UnsupportedConfigError",
    "build_model",
    "build_model_chunks",
    "decoder_block_spec",
    "parse_hf_config",
    "to_transformer_config",
]
