"""Which parallel sizes split a Qwen-MoE model evenly (and, with FP8, into GEMMs FP8 can run):
the one rule the builder, the converter and the launch-side validation all apply."""

from __future__ import annotations

from megatron_pr2.models.hf_config import QwenMoeSizes

# How each size is named in messages: Megatron-LM's training flags by default.
MEGATRON_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                  "vpp": "--virtual-pipeline-model-parallel-size",
                  "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}
FP8_GEMM_MULTIPLE = 16  # TransformerEngine's FP8 GEMMs need both weight dimensions divisible by it


def division_problems(spec: QwenMoeSizes, tp: int = 1, pp: int = 1, ep: int = 1,
                      etp: int | None = None, vpp: int = 1, fp8: bool = False,
                      flags: dict[str, str] = MEGATRON_FLAGS) -> list[str]:
    """Every way the sizes fail to split ``spec`` evenly, one message each (empty if none).

    Sizes below 1 are skipped (the layout's own checks name them).

    Args:
        spec: the parsed HF config.
        tp, pp, ep, etp, vpp: tensor, pipeline, expert, expert-tensor (default: ``tp``) and
            virtual-pipeline sizes.
        fp8: the GEMMs run in FP8 (``--fp8-format``): the hidden size and each expert-tensor-
            parallel shard of the expert FFN must be multiples of 16.
        flags: how each size is named in the messages (keys ``tp pp vpp ep etp``).
    """
    etp = etp or tp
    chunks = f"{flags['pp']} x {flags['vpp']}" if vpp > 1 else flags["pp"]
    checks = [
        ("num_attention_heads", spec.num_attention_heads, flags["tp"], tp),
        ("num_key_value_heads", spec.num_key_value_heads, flags["tp"], tp),
        ("vocab_size", spec.vocab_size, flags["tp"], tp),
        ("num_experts", spec.num_experts, flags["ep"], ep),
        ("moe_intermediate_size", spec.moe_ffn_hidden_size, flags["etp"], etp),
        ("num_hidden_layers", spec.num_layers, chunks, pp * vpp),
    ]
    if not all(spec.moe_layer_pattern):
        checks.append(("intermediate_size (dense layers)", spec.ffn_hidden_size, flags["tp"], tp))
    if spec.shared_expert_intermediate_size:
        checks.append(("shared_expert_intermediate_size", spec.shared_expert_intermediate_size,
                       flags["tp"], tp))
    problems = [f"{name}={value} is not divisible by {flag}={size}"
                for name, value, flag, size in checks if size >= 1 and value % size]
    return problems + (_fp8_problems(spec, etp) if fp8 else [])


def _fp8_problems(spec: QwenMoeSizes, etp: int) -> list[str]:
    sizes = (("hidden_size", spec.hidden_size),
             ("moe_intermediate_size / ETP", spec.moe_ffn_hidden_size // max(etp, 1)))
    return [f"FP8 GEMMs need {name} divisible by {FP8_GEMM_MULTIPLE}, got {size}"
            for name, size in sizes if size % FP8_GEMM_MULTIPLE]
