"""Pure tensor layouts of the converter: fused QKV, fused gate/up, TP chunks, layout checks."""

import pytest
import torch
import torch.nn.functional as F

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.rules import (
    PredictiveGateRule,
    fuse_glu,
    fuse_qkv,
    split_glu,
    split_qkv,
)
from megatron_pr2.convert.sharding import TargetParallelism, dist_key, tp_chunks
from megatron_pr2.models import parse_hf_config
from megatron_pr2.models.presets import preset


def _labelled(labels, head_dim, cols=3):
    """Rows of head h are all equal to labels[h] (head_dim rows per head)."""
    return torch.tensor(labels, dtype=torch.float32).repeat_interleave(head_dim)[:, None].expand(
        -1, cols).clone()


def test_fused_qkv_interleaves_query_heads_then_k_then_v_per_group():
    # 4 query heads in 2 groups (GQA), head_dim 2.
    q = _labelled([100, 101, 102, 103], 2)
    k = _labelled([200, 201], 2)
    v = _labelled([300, 301], 2)
    fused = fuse_qkv(q, k, v, num_query_groups=2)
    expected = [100, 100, 101, 101, 200, 200, 300, 300,
                102, 102, 103, 103, 201, 201, 301, 301]
    assert fused[:, 0].tolist() == expected


def test_fused_qkv_bias_and_split_are_exact_inverses():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 5, generator=gen) for rows in (12, 4, 4))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, 2), 2, 12, 4),
                                                  (q, k, v)))
    qb, kb, vb = (torch.randn(rows, generator=gen) for rows in (12, 4, 4))
    fused = fuse_qkv(qb, kb, vb, 2)
    assert fused.shape == (20,)
    assert fused[:6].tolist() == qb[:6].tolist() and fused[6:8].tolist() == kb[:2].tolist()
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 2, 12, 4), (qb, kb, vb)))


def test_fused_gate_up_computes_the_hf_swiglu():
    gen = torch.Generator().manual_seed(1)
    gate, up, x = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen)
    fc1_out = x @ fuse_glu(gate, up).T
    first, second = torch.chunk(fc1_out, 2, dim=-1)   # Megatron's GLU: act(x[0]) * x[1]
    torch.testing.assert_close(F.silu(first) * second, F.silu(x @ gate.T) * (x @ up.T))
    assert all(torch.equal(a, b) for a, b in zip(split_glu(fuse_glu(gate, up)), (gate, up)))


def test_tp_chunks_give_each_rank_its_gate_and_up_slices():
    gate = torch.arange(8.0)[:, None].expand(-1, 3)
    up = 100 + gate
    fc1 = fuse_glu(gate, up)
    chunks = tp_chunks(tuple(fc1.shape), tp_axis=0, glu=True, tp=2)
    assert [offset for offset, _ in chunks] == [(0, 0), (4, 0), (8, 0), (12, 0)]
    pieces = [fc1[o[0]:o[0] + s[0]] for o, s in chunks]
    for rank in range(2):   # rank r holds [gate_r; up_r] (ColumnParallelLinear over [gate; up])
        held = torch.cat([pieces[rank], pieces[2 + rank]])
        assert torch.equal(held, torch.cat([gate[4 * rank:4 * rank + 4], up[4 * rank:4 * rank + 4]]))
    assert tp_chunks((6, 8), tp_axis=1, glu=False, tp=4) == [
        ((0, 0), (6, 2)), ((0, 2), (6, 2)), ((0, 4), (6, 2)), ((0, 6), (6, 2))]
    assert tp_chunks((6, 8), tp_axis=None, glu=False, tp=4) == [((0, 0), (6, 8))]
    assert tp_chunks((6, 8), tp_axis=0, glu=True, tp=1) == [((0, 0), (3, 8)), ((3, 0), (3, 8))]
    assert tp_chunks((6, 8), tp_axis=0, glu=False, tp=1) == [((0, 0), (6, 8))]


def test_routed_experts_share_one_key_with_a_prepended_expert_axis():
    where = dist_key("decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight", 8)
    assert where.key == "decoder.layers.3.mlp.experts.experts.linear_fc2.weight"
    assert where.prepend == (5, 8) and where.global_shape((4, 2)) == (8, 4, 2)
    plain = dist_key("decoder.layers.3.mlp.shared_experts.linear_fc2.weight", 8)
    assert plain.key == "decoder.layers.3.mlp.shared_experts.linear_fc2.weight"
    assert plain.prepend is None


@pytest.mark.parametrize("layout,message", [
    (TargetParallelism(tensor_model_parallel_size=3), "num_attention_heads=4 is not divisible by --tp=3"),
    (TargetParallelism(tensor_model_parallel_size=4), "num_key_value_heads=2 is not divisible by --tp=4"),
    (TargetParallelism(pipeline_model_parallel_size=3), "num_hidden_layers=4 is not divisible by --pp=3"),
    (TargetParallelism(expert_model_parallel_size=3), "num_experts=8 is not divisible by --ep=3"),
    (TargetParallelism(expert_tensor_parallel_size=3), "moe_intermediate_size=32 is not divisible"),
    (TargetParallelism(tensor_model_parallel_size=0), "--tp must be >= 1"),
])
def test_layout_that_does_not_divide_the_model_is_refused(layout, message):
    spec = parse_hf_config(preset("tiny-qwen3-moe"))
    with pytest.raises(ConversionError, match=message.replace("+", r"\+")):
        layout.validate(spec)
    TargetParallelism(2, 2, 4).validate(spec)   # a layout that divides passes


def test_predictive_gate_adds_predictor_to_router_and_checks_shape():
    rule = PredictiveGateRule("r", "p", "hf.gate", (4, 3))
    router = torch.randn(4, 3, dtype=torch.bfloat16)
    predictor = torch.randn(4, 3, dtype=torch.bfloat16)
    gate = rule.to_hf(router, predictor)
    assert gate.dtype == torch.bfloat16
    assert torch.equal(gate, (router.float() + predictor.float()).bfloat16())
    with pytest.raises(ConversionError, match=r"p has shape \(3, 4\)"):
        rule.to_hf(router, torch.zeros(3, 4))


def test_merging_tp_shards_inverts_what_each_rank_holds():
    from megatron_pr2.convert.sharding import merge_tp_shards

    gen = torch.Generator().manual_seed(2)
    gate, up = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    held = [torch.cat([gate[4 * r:4 * r + 4], up[4 * r:4 * r + 4]]) for r in range(2)]
    assert torch.equal(merge_tp_shards(held, 0, glu=True), fuse_glu(gate, up))
    proj = torch.randn(3, 8, generator=gen)
    assert torch.equal(merge_tp_shards([proj[:, :4], proj[:, 4:]], 1, glu=False), proj)


def test_rank_local_names_map_to_single_process_names():
    from megatron_pr2.convert.sharding import global_megatron_name

    assert global_megatron_name(
        "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight", 2, 4
    ) == "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.weight"
    assert global_megatron_name("decoder.layers.1.mlp.experts.linear_fc2.weight3", 2, 4) == \
        "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"   # TE grouped experts
    assert global_megatron_name("decoder.layers.0.mlp.router.weight", 5, 4) == \
        "decoder.layers.5.mlp.router.weight"
    assert global_megatron_name("embedding.word_embeddings.weight", 5, 4) == \
        "embedding.word_embeddings.weight"
