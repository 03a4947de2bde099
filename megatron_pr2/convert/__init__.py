"""HF <-> Megatron checkpoint conversion for Qwen3-MoE and Qwen2-MoE.

* :func:`adapter_for` -> a :class:`StateDictAdapter` (explicit key table per family) that maps
  single-process Megatron tensors to HF tensors and back, tensor by tensor (CLI and weight sync).
* :func:`hf_to_megatron` / :func:`megatron_to_hf`: streamed whole-checkpoint conversions.
* :func:`load_megatron_checkpoint`: load a ``torch_dist`` checkpoint into model chunks built
  with any TP/PP/EP layout.
* :func:`global_megatron_name` / :func:`merge_tp_shards`: turn a rank's parameters into the
  single-process tensors the adapter expects (weight sync from a parallel trainer).
"""

from megatron_pr2.convert.adapter import PREDICTOR_SUFFIX, StateDictAdapter
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.layout import ParallelLayout, global_megatron_name, merge_tp_shards
from megatron_pr2.convert.loading import load_megatron_checkpoint, model_state_for_export
from megatron_pr2.convert.pipeline import (
    ConversionStats,
    describe_megatron_checkpoint,
    hf_to_megatron,
    megatron_to_hf,
)
from megatron_pr2.convert.registry import adapter_for

__all__ = [
    "PREDICTOR_SUFFIX",
    "ConversionError",
    "ConversionStats",
    "ParallelLayout",
    "StateDictAdapter",
    "adapter_for",
    "describe_megatron_checkpoint",
    "global_megatron_name",
    "hf_to_megatron",
    "load_megatron_checkpoint",
    "megatron_to_hf",
    "merge_tp_shards",
    "model_state_for_export",
]
