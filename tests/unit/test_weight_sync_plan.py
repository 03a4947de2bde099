"""Weight-sync bookkeeping: bucket packing (SGLang's flattened layout) and the stage plan."""

import pytest
import torch

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.models.presets import preset
from megatron_pr2.weight_sync.bucket import FlatBucket
from megatron_pr2.weight_sync.plan import (
    ParallelSizes,
    ParamSlot,
    split_rounds,
    stage_slots,
)


def test_bucket_packs_cast_tensors_back_to_back():
    a, b = torch.randn(3, 4), torch.randn(5)
    bucket = FlatBucket(64, torch.bfloat16)
    bucket.add("a", a)
    bucket.add("b", b)
    assert bucket.used == (12 + 5) * 2
    # the flat bytes are the two bf16 tensors concatenated (what SGLang's receiver slices)
    expected = torch.cat([a.to(torch.bfloat16).reshape(-1), b.to(torch.bfloat16)])
    assert torch.equal(bucket.flat.view(torch.bfloat16), expected)
    views = dict(bucket.named_tensors())
    assert torch.equal(views["a"], a.to(torch.bfloat16)) and views["b"].shape == (5,)
    with pytest.raises(ValueError, match="bucket overflow adding c"):
        bucket.add("c", torch.zeros(20))


def slot(name, numel):
    return ParamSlot(0, name, name, False, None, False, numel)


def test_rounds_respect_the_byte_bound_and_keep_a_gate_together():
    slots = [slot("decoder.layers.0.x", 10), slot("decoder.layers.0.mlp.router.weight", 10),
             slot("decoder.layers.0.mlp.router.predictor.weight", 10),
             slot("decoder.layers.1.big", 100), slot("decoder.layers.1.y", 5)]
    rounds = split_rounds(slots, itemsize=2, max_bytes=40)
    names = [[s.local_name.split(".", 3)[-1] for s in r] for r in rounds]
    # 20 + 20 bytes fill the first bucket, but the predictor stays with its router (60 bytes);
    # a tensor larger than the bound travels alone
    assert names == [["x", "mlp.router.weight", "mlp.router.predictor.weight"], ["big"], ["y"]]
    with pytest.raises(ValueError, match=">= 1 byte"):
        split_rounds(slots, 2, 0)


CFG = preset("tiny-qwen3-moe", mlp_only_layers=[1])


def test_stage_slots_name_multiply_and_refuse():
    adapter = adapter_for(CFG)
    params = [("decoder.layers.0.self_attention.linear_qkv.weight", (64, 64)),  # TP shard
              ("decoder.layers.0.mlp.router.weight", (8, 64)),
              ("decoder.layers.0.mlp.router.predictor.weight", (8, 64)),
              ("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", (64, 32))]
    slots = stage_slots([([3], params)], adapter, ParallelSizes(tp=2, etp=1, ep=4),
                        expert_offset=2, predictive_gate=False)
    by_name = {s.global_name: s for s in slots}
    # local layer 0 is global layer 2 (layer_number 3); local expert 1 of EP rank 1 is expert 3
    assert sorted(by_name) == ["decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight",
                               "decoder.layers.2.mlp.router.weight",
                               "decoder.layers.2.self_attention.linear_qkv.weight"]
    assert by_name["decoder.layers.2.self_attention.linear_qkv.weight"].full_numel == 64 * 64 * 2
    assert by_name["decoder.layers.2.mlp.router.weight"].full_numel == 8 * 64
    expert = by_name["decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight"]
    assert expert.expert and expert.full_numel == 64 * 32 * 4  # every EP rank's copy
    with_gate = stage_slots([([3], params)], adapter, ParallelSizes(), 0, predictive_gate=True)
    assert any(s.global_name.endswith("router.predictor.weight") for s in with_gate)
    with pytest.raises(ConversionError, match="decoder.layers.0.mystery.weight .* not in the"):
        stage_slots([([1], [("decoder.layers.0.mystery.weight", (2,))])], adapter,
                    ParallelSizes(), 0, False)
