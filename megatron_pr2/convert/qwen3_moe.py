"""Qwen3-MoE key table (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B).

HF checkpoints on the Hub store routed experts one by one
(``mlp.experts.{e}.gate_proj.weight``); transformers 5.x fuses them into
``mlp.experts.gate_up_proj`` at load time and splits them again on save, so the per-expert
form below is the one both the Hub and transformers read.
"""

from __future__ import annotations

from megatron_pr2.convert.adapter import KeyTable, RuleTemplate, StateDictAdapter
from megatron_pr2.convert.rules import GluRule, QkvRule, TensorRule

HF_LAYER = "model.layers.{layer}."
MG_LAYER = "decoder.layers.{layer}."


def hidden(s):
    return s.hidden_size


def q_rows(s):
    return s.num_attention_heads * s.head_dim


def kv_rows(s):
    return s.num_key_value_heads * s.head_dim


EMBEDDING = RuleTemplate(TensorRule, ("model.embed_tokens.weight",),
                         "embedding.word_embeddings.weight",
                         lambda s: [(s.vocab_size, s.hidden_size)], tp_axis=0)
FINAL_NORM = RuleTemplate(TensorRule, ("model.norm.weight",), "decoder.final_layernorm.weight",
                          lambda s: [(hidden(s),)])
LM_HEAD = RuleTemplate(TensorRule, ("lm_head.weight",), "output_layer.weight",
                       lambda s: [(s.vocab_size, s.hidden_size)], tp_axis=0,
                       when=lambda s: not s.tie_word_embeddings)

INPUT_NORM = RuleTemplate(TensorRule, (HF_LAYER + "input_layernorm.weight",),
                          MG_LAYER + "input_layernorm.weight", lambda s: [(hidden(s),)])
QKV_WEIGHT = RuleTemplate(
    QkvRule,
    tuple(HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
    MG_LAYER + "self_attention.linear_qkv.weight",
    lambda s: [(q_rows(s), hidden(s)), (kv_rows(s), hidden(s)), (kv_rows(s), hidden(s))],
    tp_axis=0,
)
QKV_BIAS = RuleTemplate(
    QkvRule,
    tuple(HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
    MG_LAYER + "self_attention.linear_qkv.bias",
    lambda s: [(q_rows(s),), (kv_rows(s),), (kv_rows(s),)],
    tp_axis=0,
    when=lambda s: s.qkv_bias,
)
O_PROJ = RuleTemplate(TensorRule, (HF_LAYER + "self_attn.o_proj.weight",),
                      MG_LAYER + "self_attention.linear_proj.weight",
                      lambda s: [(hidden(s), q_rows(s))], tp_axis=1)
Q_NORM = RuleTemplate(TensorRule, (HF_LAYER + "self_attn.q_norm.weight",),
                      MG_LAYER + "self_attention.q_layernorm.weight", lambda s: [(s.head_dim,)])
K_NORM = RuleTemplate(TensorRule, (HF_LAYER + "self_attn.k_norm.weight",),
                      MG_LAYER + "self_attention.k_layernorm.weight", lambda s: [(s.head_dim,)])
POST_ATTN_NORM = RuleTemplate(TensorRule, (HF_LAYER + "post_attention_layernorm.weight",),
                              MG_LAYER + "pre_mlp_layernorm.weight", lambda s: [(hidden(s),)])


def glu_pair(hf_prefix: str, mg_prefix: str, rows):
    """``gate_proj``/``up_proj`` -> ``linear_fc1`` and ``down_proj`` -> ``linear_fc2``."""
    return (
        RuleTemplate(GluRule, (hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight"),
                     mg_prefix + "linear_fc1.weight",
                     lambda s: [(rows(s), hidden(s))] * 2, tp_axis=0, glu=True),
        RuleTemplate(TensorRule, (hf_prefix + "down_proj.weight",),
                     mg_prefix + "linear_fc2.weight",
                     lambda s: [(hidden(s), rows(s))], tp_axis=1),
    )


DENSE_MLP = glu_pair(HF_LAYER + "mlp.", MG_LAYER + "mlp.", lambda s: s.ffn_hidden_size)
ROUTER = RuleTemplate(TensorRule, (HF_LAYER + "mlp.gate.weight",), MG_LAYER + "mlp.router.weight",
                      lambda s: [(s.num_experts, hidden(s))])
EXPERT = glu_pair(HF_LAYER + "mlp.experts.{expert}.",
                  MG_LAYER + "mlp.experts.local_experts.{expert}.",
                  lambda s: s.moe_ffn_hidden_size)

TABLE = KeyTable(
    first=(EMBEDDING,),
    attention=(INPUT_NORM, QKV_WEIGHT, O_PROJ, Q_NORM, K_NORM, POST_ATTN_NORM),
    dense_mlp=DENSE_MLP,
    moe=(ROUTER,),
    expert=EXPERT,
    last=(FINAL_NORM, LM_HEAD),
)


class Qwen3MoeAdapter(StateDictAdapter):
    """Qwen3-MoE: q/k RMSNorm per head, no attention bias, no shared expert."""

    architecture = "Qwen3MoeForCausalLM"
    table = TABLE
