"""Random HF checkpoints: tiny ones through ``transformers`` (tests, CPU quick start) and large
ones streamed shard by shard from the key table (conversion benchmarks)."""

from __future__ import annotations

import json
import os

import torch

from megatron_pr2.convert.hf_checkpoint import HfShardWriter, plan_shards
from megatron_pr2.convert.registry import adapter_for


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with noise: matrices ~ N(0, std), vectors (norms, biases) 1 + N(0, std).

    Norm weights are randomised too, so a swapped or dropped norm shows up in logits.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        param.copy_(noise if param.dim() > 1 else 1.0 + noise)
    return model


def save_random_hf_checkpoint(hf_config: dict, out_dir: str, seed: int = 0, std: float = 0.1,
                              dtype: torch.dtype = torch.float32,
                              max_shard_size: str = "100KB"):
    """Build the HF model with ``transformers``, randomise it and ``save_pretrained`` it (sharded).

    Returns the (fp32, eval-mode, eager-attention) HF model.
    """
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, std, seed).eval()
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    return model.float()


def write_random_hf_checkpoint(hf_config: dict, out_dir: str, max_shard_bytes: int,
                               dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write a random checkpoint of any size without building the model; returns its bytes.

    Tensor names and shapes come from the family's key table (per-expert HF names, as on the
    Hub); one shard is in memory at a time.
    """
    adapter = adapter_for(hf_config)
    generator = torch.Generator().manual_seed(seed)
    entries = [(name, shape, dtype) for rule in adapter.rules
               for name, shape in zip(rule.hf_names, rule.hf_shapes)]
    writer = HfShardWriter(out_dir, plan_shards(entries, max_shard_bytes))
    for name, shape, _ in entries:
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
        writer.add(name, tensor.to(dtype))
    writer.close()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(hf_config, handle, indent=2)
    return writer.total_bytes
