"""Qwen2-MoE key table (``Qwen2MoeForCausalLM``, e.g. Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

Differences from Qwen3-MoE: QKV bias, no q/k norms, and a shared expert whose output is scaled
by ``sigmoid(h . shared_expert_gate)`` (Megatron ``SharedExpertMLP.gate_weight``).
"""

from __future__ import annotations

from megatron_pr2.convert import qwen3_moe as q3
from megatron_pr2.convert.adapter import KeyTable, RuleTemplate, StateDictAdapter
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.rules import TensorRule

SHARED_EXPERT = q3.glu_pair(q3.HF_LAYER + "mlp.shared_expert.",
                            q3.MG_LAYER + "mlp.shared_experts.",
                            lambda s: s.shared_expert_intermediate_size)
SHARED_EXPERT_GATE = RuleTemplate(TensorRule, (q3.HF_LAYER + "mlp.shared_expert_gate.weight",),
                                  q3.MG_LAYER + "mlp.shared_experts.gate_weight",
                                  lambda s: [(1, q3.hidden(s))])

TABLE = KeyTable(
    first=(q3.EMBEDDING,),
    attention=(q3.INPUT_NORM, q3.QKV_WEIGHT, q3.QKV_BIAS, q3.O_PROJ, q3.POST_ATTN_NORM),
    dense_mlp=q3.DENSE_MLP,
    moe=(q3.ROUTER, *SHARED_EXPERT, SHARED_EXPERT_GATE),
    expert=q3.EXPERT,
    last=(q3.FINAL_NORM, q3.LM_HEAD),
)


class Qwen2MoeAdapter(StateDictAdapter):
    """Qwen2-MoE: QKV bias (``qkv_bias``), shared expert with a sigmoid gate."""

    architecture = "Qwen2MoeForCausalLM"
    table = TABLE

    def __init__(self, spec):
        if spec.shared_expert_intermediate_size <= 0:
            raise ConversionError(
                "Qwen2-MoE with shared_expert_intermediate_size=0 is not supported: "
                "transformers still builds an (empty) shared expert there, Megatron none"
            )
        super().__init__(spec)
