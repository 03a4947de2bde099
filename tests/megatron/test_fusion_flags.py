"""Megatron-LM's fusion and overlap flags reach Megatron-Core, and the ones it cannot run here are
refused by name. References: the unfused model on the same weights (a fusion must not change the
forward) and Megatron-Core's own config fields."""

import re

import pytest
import torch

from megatron_pr2.config import parse_config
from megatron_pr2.models.moe_options import fusion_overrides
from tests.megatron.test_router_replay import build, tokens_and_positions


@pytest.mark.parametrize("flag", ["--moe-permute-fusion", "--apply-rope-fusion",
                                  "--gradient-accumulation-fusion"])
def test_te_fusions_without_transformer_engine_are_refused_by_name(flag):
    with pytest.raises(ValueError, match=re.escape(
            f"{flag} need --transformer-impl transformer_engine")):
        parse_config([flag])


def test_flags_map_to_megatron_config_fields():
    cfg = parse_config(["--bias-swiglu-fusion", "--transformer-impl", "transformer_engine",
                        "--moe-permute-fusion", "--device", "cuda"])
    assert fusion_overrides(cfg.model) == {
        "moe_permute_fusion": True, "apply_rope_fusion": False,
        "bias_activation_fusion": True, "gradient_accumulation_fusion": False}


def test_bias_swiglu_fusion_keeps_the_forward(megatron_single_process):
    tokens, positions = tokens_and_positions(seed=3)
    outputs = []
    for fused in (False, True):
        config, model = build(seed=11, **fusion_overrides(
            parse_config(["--bias-swiglu-fusion"] if fused else []).model))
        assert config.bias_activation_fusion is fused
        with torch.no_grad():
            outputs.append(model(tokens, positions, None))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)

