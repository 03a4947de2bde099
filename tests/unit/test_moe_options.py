"""Dispatch / grouped-GEMM / FP8 options: defaults, refusals by name, FP8 token padding arithmetic."""

import importlib.util

import pytest
import torch

from megatron_pr2.config import parse_config
from megatron_pr2.models.hf_config import parse_hf_config, to_transformer_config
from megatron_pr2.models.moe_options import (
    RouteRewriteError,
    check_routes_reach_experts,
    fp8_token_multiple,
    moe_overrides,
    precision_overrides,
)
from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.alignment import TokenParallel, build_micro_batch
from megatron_pr2.rollout.sample import Sample

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def _config(**overrides):
    return to_transformer_config(parse_hf_config(preset("tiny-qwen3-moe")), **overrides)


def test_dispatcher_defaults_to_alltoall_only_when_experts_are_split():
    one = parse_config([])
    assert moe_overrides(one.model, one.parallel)["moe_token_dispatcher_type"] == "allgather"
    ep = parse_config(["--expert-model-parallel-size", "2"])
    assert moe_overrides(ep.model, ep.parallel)["moe_token_dispatcher_type"] == "alltoall"
    forced = parse_config(["--expert-model-parallel-size", "2",
                           "--moe-token-dispatcher-type", "allgather"])
    assert moe_overrides(forced.model, forced.parallel)["moe_token_dispatcher_type"] == "allgather"


def test_grouped_gemm_is_its_own_flag_and_needs_transformer_engine():
    cfg = parse_config([])
    assert moe_overrides(cfg.model, cfg.parallel)["moe_grouped_gemm"] is False
    with pytest.raises(ValueError, match="--moe-grouped-gemm needs --transformer-impl"):
        parse_config(["--moe-grouped-gemm"])
    te = parse_config(["--transformer-impl", "transformer_engine", "--moe-grouped-gemm"])
    assert moe_overrides(te.model, te.parallel)["moe_grouped_gemm"] is True


def test_fp8_flags_reach_the_transformer_config_fields():
    cfg = parse_config(["--transformer-impl", "transformer_engine", "--fp8-format", "e4m3",
                        "--fp8-recipe", "mxfp8"])
    fields = moe_overrides(cfg.model, cfg.parallel)
    assert fields["fp8"] == "e4m3" and fields["fp8_recipe"] == "mxfp8"
    with pytest.raises(ValueError, match="--fp8-recipe must be one of"):
        parse_config(["--fp8-recipe", "fp4"])
    assert precision_overrides(True) == {"bf16": True, "pipeline_dtype": torch.bfloat16}
    assert precision_overrides(False) == {}


@pytest.mark.parametrize("field, value", [
    ("moe_router_padding_for_fp8", True),
    ("moe_router_padding_for_quantization", True),
    ("moe_expert_capacity_factor", 1.25),
])
def test_settings_that_rewrite_the_routing_map_are_refused_by_name(field, value):
    config = _config()
    check_routes_reach_experts(config)  # the project's own config passes
    # set after construction: Megatron's own checks need TransformerEngine for the FP8 ones
    setattr(config, field, value)
    with pytest.raises(RouteRewriteError, match=field):
        check_routes_reach_experts(config)


@pytest.mark.parametrize("fp8, recipe, expected", [
    (None, "delayed", 1), ("e4m3", "delayed", 16), ("hybrid", "tensorwise", 16),
    ("e4m3", "blockwise", 16), ("e4m3", "mxfp8", 32),
])
def test_fp8_token_multiple_per_recipe(fp8, recipe, expected):
    assert fp8_token_multiple(fp8, recipe) == expected


@pytest.mark.parametrize("tp, sp, fp8_multiple", [(1, False, 16), (4, True, 16), (2, True, 32)])
def test_fp8_padding_gives_every_rank_a_multiple_of_the_alignment(tp, sp, fp8_multiple):
    lengths = [5, 37, 19]
    samples = [Sample(torch.arange(n) + 3, prompt_length=2) for n in lengths]
    parallel = TokenParallel(tp_size=tp, sequence_parallel=sp, token_multiple=fp8_multiple)
    mb = build_micro_batch(samples, [0, 1, 2], "bshd", parallel)
    width = mb.tokens.shape[1]
    per_rank = width // tp if sp else width
    assert width % (tp if sp else 1) == 0 and per_rank % fp8_multiple == 0
    assert width - per_rank * (tp if sp else 1) == 0
    assert width < max(lengths) + fp8_multiple * (tp if sp else 1)  # the smallest such width
    assert (mb.sample_of[:, max(lengths):] == -1).all()  # padding only, marked as such


@pytest.mark.skipif(HAVE_TE, reason="TransformerEngine is installed")
def test_transformer_engine_spec_without_te_is_a_clear_error():
    from megatron_pr2.models.spec import TransformerEngineMissingError, layer_spec

    with pytest.raises(TransformerEngineMissingError, match="transformer_engine is not importable"):
        layer_spec(True, True, use_transformer_engine=True)
    with pytest.raises(ValueError, match="moe_grouped_gemm needs the TransformerEngine spec"):
        layer_spec(True, True, moe_grouped_gemm=True)
