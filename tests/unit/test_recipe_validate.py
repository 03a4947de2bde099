"""megatron_pr2.preflight (validate): layout, batch and parameter arithmetic against independent
references.

References: parameter counts of the Hugging Face model built on the meta device (no memory),
per-rank counts re-derived from HF parameter names, Megatron-Core's own layer-offset functions,
the trainer's data-parallel sharding, and numbers worked out by hand in the tests.
"""

from __future__ import annotations

import functools
import json
import os
import re

import pytest
import torch
import transformers

from megatron_pr2.config import parse_config
from megatron_pr2.models.pipeline_stages import rank_layer_numbers
from megatron_pr2.platform import ParallelConfig
from megatron_pr2.preflight.checks import runtime_problems
from megatron_pr2.preflight.memory import (
    estimate_params,
    predictor_host_gib_per_gpu,
    training_state_bytes_per_param,
)
from megatron_pr2.preflight.parsing import check_flags, load_model_sizes
from megatron_pr2.preflight.placement import (
    Placement,
    model_division_problems,
    placement_problems,
    plan_placement,
)
from megatron_pr2.preflight.problems import ValidationError
from megatron_pr2.preflight.timeouts import (
    host_timeout_problems,
    rollout_worst_case_seconds,
)
from megatron_pr2.preflight.urls import parse_sglang_urls
from megatron_pr2.preflight.validate import validate
from megatron_pr2.rl.batch_plan import plan_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN3_30B = os.path.join(REPO, "examples", "pr2", "configs", "qwen3_30b_a3b_config.json")
RECIPE_YAML = os.path.join(REPO, "examples", "pr2", "qwen3_30b_a3b.yaml")
RECIPE_ARGS = ["--config", RECIPE_YAML, "--hf-config", QWEN3_30B, "--data-path", "/data/x.jsonl",
               "--tokenizer", "/ckpt/qwen", "--sglang-urls", "http://r0:30000,http://r0:30001",
               "--save", "/out/ckpt", "--tensorboard-dir", "/out/tb"]
RECIPE_LAYOUT = ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=2,
                             expert_model_parallel_size=8, expert_tensor_parallel_size=1,
                             sequence_parallel=True)


def _hf_model_class(config: dict):
    return {"Qwen3MoeForCausalLM": transformers.Qwen3MoeForCausalLM,
            "Qwen2MoeForCausalLM": transformers.Qwen2MoeForCausalLM}[config["architectures"][0]]


def _hf_config(config: dict):
    cls = {"Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig,
           "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig}[config["architectures"][0]]
    return cls(**config)


def _meta_parameters(config: dict) -> dict[str, int]:
    """name -> numel of the HF model built on the meta device (shapes only)."""
    return dict(_meta_parameters_cached(json.dumps(config, sort_keys=True)))


@functools.cache
def _meta_parameters_cached(config_json: str) -> tuple[tuple[str, int], ...]:
    config = json.loads(config_json)
    with torch.device("meta"):
        model = _hf_model_class(config)(_hf_config(config))
    return tuple((name, p.numel()) for name, p in model.named_parameters())


def load_model_sizes_from(config: dict):
    from megatron_pr2.models import parse_hf_config

    return parse_hf_config(config)


def _config_dict(name: str) -> dict:
    from megatron_pr2.models.presets import PRESETS

    if name == "qwen3-30b-a3b":
        with open(QWEN3_30B, encoding="utf-8") as handle:
            return json.load(handle)
    return dict(PRESETS[name])


def _mixed_dense_config() -> dict:
    """Tiny Qwen3-MoE with dense layers 0 and 5 of 8, so pipeline stages differ."""
    config = _config_dict("tiny-qwen3-moe")
    config.update(num_hidden_layers=8, mlp_only_layers=[0, 5])
    return config


def _reference_rank_params(config: dict, layout: Placement, with_predictor: bool) -> int:
    """Parameters on the fullest GPU, re-derived from HF parameter names and shapes.

    Layer ``i`` lives in virtual chunk ``i // per_chunk``, and chunk ``c`` on pipeline rank
    ``c % PP``; embeddings on the first rank, final norm and LM head on the last one.
    """
    params = _meta_parameters(config)
    per_chunk = config["num_hidden_layers"] // (layout.pp * layout.vpp)
    per_rank = [0] * layout.pp
    for name, numel in params.items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            rank = (int(match.group(1)) // per_chunk) % layout.pp
        elif name.startswith("model.embed_tokens"):
            rank = 0
        else:  # model.norm, lm_head
            rank = layout.pp - 1
        if re.search(r"\.(q_proj|k_proj|v_proj|o_proj)\.|embed_tokens|lm_head|"
                     r"shared_expert\.(gate_proj|up_proj|down_proj)|mlp\.(gate_proj|up_proj|"
                     r"down_proj)", name):
            numel //= layout.tp
        elif ".experts." in name:
            numel //= layout.ep * layout.etp
        elif with_predictor and name.endswith("mlp.gate.weight"):
            numel *= 2  # the router and its PR2 predictor have one shape
        per_rank[rank] += numel
    return max(per_rank)


# ----------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "tiny-qwen3-moe", "tiny-qwen2-moe", "mixed"])
def test_total_parameters_match_the_hf_model(name):
    config = _mixed_dense_config() if name == "mixed" else _config_dict(name)
    sizes = load_model_sizes_from(config)
    estimate = estimate_params(sizes, Placement.of(ParallelConfig(), 1), False)
    assert estimate.total == sum(_meta_parameters(config).values())
    assert estimate.per_gpu == estimate.total  # one GPU holds everything


def test_qwen3_30b_a3b_totals_are_the_published_ones():
    spec = load_model_sizes(QWEN3_30B)
    estimate = estimate_params(spec, Placement.of(ParallelConfig(), 1), False)
    assert round(estimate.total / 1e9, 1) == 30.5  # "30.5B total"
    assert 3.3e9 <= estimate.active < 3.4e9  # "3.3B activated"
    # active = all but 120 of 128 experts in each of 48 layers (3 matrices of 2048 x 768)
    assert estimate.total - estimate.active == 48 * 120 * 3 * 2048 * 768


@pytest.mark.parametrize("case", ["recipe", "recipe-vpp", "mixed-vpp", "qwen2-tp2-ep4"])
@pytest.mark.parametrize("with_predictor", [False, True])
def test_per_gpu_parameters_match_a_name_based_count(case, with_predictor):
    config, parallel, world = {
        "recipe": (_config_dict("qwen3-30b-a3b"), RECIPE_LAYOUT, 16),
        "recipe-vpp": (_config_dict("qwen3-30b-a3b"), ParallelConfig(4, 2, 2, 8, 1, 1, True), 16),
        "mixed-vpp": (_mixed_dense_config(), ParallelConfig(2, 2, 2, 2, None, 1, True), 8),
        "qwen2-tp2-ep4": (_config_dict("tiny-qwen2-moe"),
                          ParallelConfig(2, 1, None, 4, 1, 1, True), 8),
    }[case]
    layout = plan_placement(parallel, world)
    estimate = estimate_params(load_model_sizes_from(config), layout, with_predictor)
    assert estimate.per_gpu == _reference_rank_params(config, layout, with_predictor)


def test_recipe_layout_fits_an_h100_by_hand():
    # 24 layers/stage: attention 2*2048*4096 + 2*2048*512 split over TP=4, 16 of 128 experts of
    # 3*2048*768, router 128*2048, norms 2*2048 + 2*128; embedding 151936*2048/4 on stage 0.
    per_layer = ((2 * 2048 * 4096 + 2 * 2048 * 512) // 4 + 16 * 3 * 2048 * 768
                 + 128 * 2048 + 2 * 2048 + 2 * 128)
    stage0 = 24 * per_layer + 151936 * 2048 // 4
    stage1 = 24 * per_layer + 151936 * 2048 // 4 + 2048
    layout = plan_placement(RECIPE_LAYOUT, 16)
    estimate = estimate_params(load_model_sizes(QWEN3_30B), layout, False)
    assert estimate.per_gpu == max(stage0, stage1)
    # fp32 weights + fp32 grads + Adam's two fp32 moments, nothing sharded: 16 bytes a parameter
    assert training_state_bytes_per_param(False, False, 1) == 4 + 4 + 8
    assert estimate.per_gpu * training_state_bytes_per_param(False, False, 1) / 2**30 < 80


@pytest.mark.parametrize("pp,vpp", [(2, 1), (2, 2), (4, 3), (3, 2)])
def test_rank_layer_numbers_match_megatron_layer_offsets(pp, vpp):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    num_layers = 24
    config = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    for rank in range(pp):
        expected = []
        for chunk in range(vpp):
            stage = chunk if vpp > 1 else None
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank)
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=rank)
            expected += list(range(offset, offset + count))
        assert [n - 1 for n in rank_layer_numbers(num_layers, pp, rank, vpp)] == expected


def test_predictor_host_memory_by_hand():
    spec = load_model_sizes(QWEN3_30B)
    layout = plan_placement(RECIPE_LAYOUT, 16)
    cfg = parse_config(RECIPE_ARGS)
    batch = plan_batch(cfg, layout.dp)
    # 256 samples per DP rank x (512 + 4096) tokens / TP 4, x 0.1, x 24 layers x (2048 + 128) fp32
    expected = 256 * 4608 / 4 * 0.1 * 24 * (2048 + 128) * 4 / 2**30
    assert predictor_host_gib_per_gpu(spec, layout, batch, cfg, 512) == pytest.approx(expected)


# ----------------------------------------------------------------------------------- layout
def test_recipe_layout_sizes():
    layout = plan_placement(RECIPE_LAYOUT, 32)
    assert (layout.dp, layout.expert_dp) == (32 // 8, 32 // 16)


@pytest.mark.parametrize("parallel,world,needle", [
    (RECIPE_LAYOUT, 8, "world size 8 is not divisible by ETP*EP*PP = 16"),
    (ParallelConfig(tensor_model_parallel_size=3, sequence_parallel=True), 8,
     "world size 8 is not divisible by TP*PP*CP"),
    (ParallelConfig(tensor_model_parallel_size=2), 8, "needs --sequence-parallel"),
    (ParallelConfig(expert_model_parallel_size=0), 8, "--expert-model-parallel-size must be >= 1"),
    (ParallelConfig(), 0, "world size must be >= 1"),
])
def test_layout_problems_name_the_constraint(parallel, world, needle):
    problems = placement_problems(parallel, world)
    assert any(needle in p for p in problems), problems
    with pytest.raises(ValidationError, match=re.escape(needle)):
        plan_placement(parallel, world)


def test_layout_that_fits_has_no_problems():
    assert placement_problems(RECIPE_LAYOUT, 16) == []


@pytest.mark.parametrize("tp,pp,vpp,ep,etp,expected", [
    (4, 2, 1, 8, 1, []),
    (3, 1, 1, 1, 1, ["num_attention_heads=32", "num_key_value_heads=4", "vocab_size=151936"]),
    (8, 1, 1, 1, 1, ["num_key_value_heads=4"]),  # 32 heads and 151936 split 8 ways; 4 KV do not
    (1, 1, 1, 6, 1, ["num_experts=128"]),
    (1, 5, 1, 1, 1, ["num_hidden_layers=48"]),
    (1, 2, 5, 1, 1, ["num_hidden_layers=48"]),  # 48 % (2 * 5)
    (1, 1, 1, 1, 5, ["moe_intermediate_size=768"]),
])
def test_model_division_problems(tp, pp, vpp, ep, etp, expected):
    layout = Placement(world_size=1, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, cp=1,
                    sequence_parallel=tp > 1)
    problems = model_division_problems(load_model_sizes(QWEN3_30B), layout)
    assert len(problems) == len(expected), problems
    for problem, name in zip(problems, expected, strict=True):
        assert problem.startswith(name) and "not divisible" in problem


def test_dense_and_shared_expert_widths_are_checked():
    spec = load_model_sizes_from(_config_dict("tiny-qwen2-moe"))  # shared expert 48, dense none
    layout = Placement(world_size=1, tp=32, pp=1, vpp=1, ep=1, etp=1, cp=1, sequence_parallel=True)
    problems = " ".join(model_division_problems(spec, layout))
    assert "shared_expert_intermediate_size=48" in problems
    mixed = load_model_sizes_from(_mixed_dense_config())  # dense intermediate_size 128
    layout = Placement(world_size=1, tp=3, pp=1, vpp=1, ep=1, etp=1, cp=1, sequence_parallel=True)
    assert any(p.startswith("intermediate_size (dense layers)=128")
               for p in model_division_problems(mixed, layout))


# ----------------------------------------------------------------------------------- batch
def _cfg(*extra: str):
    return parse_config([*RECIPE_ARGS, *extra])


def test_batch_plan_matches_the_trainers_sharding():
    from megatron_pr2.rollout.alignment import shard_for_dp

    cfg = _cfg("--micro-batch-size", "2")
    layout = plan_placement(RECIPE_LAYOUT, 32)  # DP 4
    plan = plan_batch(cfg, layout.dp)
    shares = [shard_for_dp(512, layout.dp, rank) for rank in range(layout.dp)]
    assert all(len(share) == plan.samples_per_dp_rank for share in shares)
    assert plan.samples_per_dp_rank == 128  # 64 prompts x 8 samples / DP 4
    assert plan.samples_per_ministep == 128 // 4
    assert plan.microbatches_per_ministep == 128 // 4 // 2
    assert plan.ministeps == 4


def test_batch_that_does_not_split_names_every_factor():
    cfg = _cfg("--micro-batch-size", "128")  # splits at DP 1, not at DP 2
    with pytest.raises(ValueError) as err:
        plan_batch(cfg, plan_placement(RECIPE_LAYOUT, 16).dp)
    assert "512 samples" in str(err.value)
    assert "DP x --off-policy-window x --micro-batch-size = 2 x 4 x 128 = 1024" in str(err.value)


def test_interleaved_schedule_needs_whole_groups_of_pp_microbatches():
    vpp_layout = plan_placement(ParallelConfig(4, 2, 2, 8, 1, 1, True), 16)
    vpp = ("--virtual-pipeline-model-parallel-size", "2")
    assert plan_batch(_cfg(*vpp, "--micro-batch-size", "16"),
                      vpp_layout.dp).microbatches_per_ministep == 4
    with pytest.raises(ValueError, match="interleaved pipeline schedule"):
        plan_batch(_cfg(*vpp, "--micro-batch-size", "64"), vpp_layout.dp)  # 1 per mini-step


# ----------------------------------------------------------------------------------- rollout
def test_sglang_urls_are_split():
    assert parse_sglang_urls("http://a:1, https://b.example:30000/") == [
        "http://a:1", "https://b.example:30000/"]


@pytest.mark.parametrize("text,needle", [
    ("localhost:30000", "'localhost:30000'"),
    ("http://host", "'http://host'"),
    ("http://host:99999", "'http://host:99999'"),
    ("ftp://host:1", "'ftp://host:1'"),
    ("http://host:1/generate", "'http://host:1/generate'"),
    ("http://a:1,http://a:1", "more than once"),
    (" , ", "empty"),
])
def test_bad_sglang_urls_are_named(text, needle):
    with pytest.raises(ValidationError, match=re.escape(needle)):
        parse_sglang_urls(text)


# ----------------------------------------------------------------------------------- flags
def test_unknown_flag_names_the_closest_known_one():
    with pytest.raises(ValidationError) as err:
        check_flags(["--tensor-paralel-size", "4"])
    message = str(err.value)
    assert "unrecognized arguments: --tensor-paralel-size 4" in message
    assert "did you mean --tensor-model-parallel-size?" in message


def test_wrong_type_names_the_flag():
    with pytest.raises(ValidationError, match="--micro-batch-size: invalid int value: 'two'"):
        check_flags(["--micro-batch-size", "two"])


# ----------------------------------------------------------------------------------- validate()
def test_validate_summarises_the_recipe():
    report = validate(RECIPE_ARGS, nnodes=2, gpus_per_node=8)
    text = "\n".join(report.lines)
    assert "layout: TP=4 PP=2 VPP=1 CP=1 EP=8 ETP=1 sequence_parallel=True" in text
    assert "data parallel: DP=2 (dense), expert DP=1" in text
    assert "micro-batches per mini-step: 64 per DP rank" in text
    assert "TransformerEngine: required at launch" in text
    assert "weight sync: in memory (distributed), 512 MB buckets" in text
    disk = "\n".join(validate([*RECIPE_ARGS, "--weight-sync", "disk"], nnodes=2,
                              gpus_per_node=8).lines)
    assert "weight sync: disk, /out/ckpt/weight_sync_hf" in disk
    assert any("--data-path /data/x.jsonl: no such file here" in n for n in report.notes)


def test_validate_reports_every_problem_at_once():
    argv = [*RECIPE_ARGS, "--tensor-model-parallel-size", "3", "--expert-model-parallel-size", "6",
            "--sglang-urls", "r0:30000"]
    with pytest.raises(ValidationError) as err:
        validate(argv, nnodes=2, gpus_per_node=8)
    problems = " | ".join(err.value.problems)
    for needle in ("world size 16 is not divisible by TP*PP*CP", "num_attention_heads=32",
                   "num_experts=128", "'r0:30000'"):
        assert needle in problems


@pytest.mark.parametrize("extra,needle", [
    (["--fp8-format", "e4m3", "--transformer-impl", "local"],
     "--fp8-format needs --transformer-impl"),
    (["--hf-config", "/nonexistent/ckpt"], "--hf-config /nonexistent/ckpt: no Hugging Face config"),
    (["--routing-method", "r4"], "--routing-method must be one of"),
    (["--max-new-tokens", "50000"], "does not fit the model's max_position_embeddings 40960"),
    (["--save-interval", "5", "--save", ""], "--save-interval needs --save"),
    (["--device", "cpu"], "transformer_engine cannot run with --device cpu"),
])
def test_validate_names_bad_settings(extra, needle):
    with pytest.raises(ValidationError, match=re.escape(needle)):
        validate([*RECIPE_ARGS, *extra], nnodes=2, gpus_per_node=8)


def test_rollout_worst_case_by_hand():
    cfg = parse_config(["--rollout-engine", "sglang", "--sglang-urls", "http://r0:1",
                        "--rollout-batch-prompts", "4", "--n-samples-per-prompt", "4",
                        "--rollout-max-concurrency", "6", "--rollout-timeout", "100",
                        "--distributed-timeout-minutes", "15"])
    # 16 requests, 6 at a time: 3 waves of 3 attempts x 100 s plus backoffs of 0.5 s and 1 s
    assert rollout_worst_case_seconds(cfg) == pytest.approx(3 * (300 + 1.5))
    (problem,) = host_timeout_problems(cfg)  # 904.5 s > 15 min
    assert "up to 904 s (--rollout-timeout 100 s x 3 attempts x 3 waves" in problem
    assert "raise --distributed-timeout-minutes to at least 16" in problem
    cfg.parallel.distributed_timeout_minutes = 16
    assert host_timeout_problems(cfg) == []


def test_validate_refuses_a_rollout_that_can_outlast_the_host_timeout():
    with pytest.raises(ValidationError, match=re.escape(
            "one rollout can take up to 5402 s (--rollout-timeout 1800 s x 3 attempts), longer "
            "than --distributed-timeout-minutes 10 (600 s) that the other ranks wait for it: "
            "raise --distributed-timeout-minutes to at least 91")):
        validate([*RECIPE_ARGS, "--distributed-timeout-minutes", "10"], nnodes=2, gpus_per_node=8)


def test_validate_refuses_one_master_address_for_stages_on_two_nodes():
    argv = [*RECIPE_ARGS, "--weight-sync-master-addr", "10.0.0.1"]
    with pytest.raises(ValidationError, match=re.escape(
            "--weight-sync-master-addr 10.0.0.1 is one address, but the 2 pipeline stages push "
            "from different nodes")):
        validate(argv, nnodes=2, gpus_per_node=8)
    validate(argv, nnodes=1, gpus_per_node=16)  # both stages on one node: one address is right


def test_validate_refuses_a_layout_whose_optimizer_state_cannot_fit():
    argv = [*RECIPE_ARGS, "--tensor-model-parallel-size", "1", "--no-sequence-parallel",
            "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2"]
    with pytest.raises(ValidationError, match=r"GiB per GPU, more than the 80 GiB"):
        validate(argv, nnodes=2, gpus_per_node=8)


def test_validate_rejects_unknown_yaml_settings(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  tensor_model_paralel_size: 4\n")
    with pytest.raises(ValidationError, match="unknown setting 'tensor_model_paralel_size'"):
        validate(["--config", str(bad)], nnodes=1, gpus_per_node=1)


def test_runtime_check_on_this_cpu_machine(tmp_path):
    cfg = _cfg()
    problems = runtime_problems(cfg, 8)
    assert "--data-path /data/x.jsonl: no such file" in problems
    if not torch.cuda.is_available():
        assert any(p.startswith("CUDA is not available") for p in problems)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    (tmp_path / "tokenizer.json").write_text("{}")
    cpu = parse_config(["--device", "cpu", "--task", "math", "--data-path", str(data),
                        "--tokenizer", str(tmp_path)])
    assert runtime_problems(cpu, 1) == []


@pytest.mark.parametrize("bf16, distributed, dp, expected", [
    (False, False, 4, 4 + 4 + 8),  # fp32 weights, fp32 grads, Adam m + v
    (True, False, 4, 2 + 4 + 4 + 8),  # bf16 weights, fp32 grads, fp32 main weights, Adam
    (True, True, 4, 2 + 4 + (4 + 8) / 4),  # main weights + Adam sharded over 4 DP ranks
    (False, True, 2, 4 + 4 + 8 / 2),
])
def test_training_state_bytes_per_param_by_precision_and_optimizer(bf16, distributed, dp,
                                                                   expected):
    from megatron_pr2.preflight.memory import training_state_bytes_per_param

    assert training_state_bytes_per_param(bf16, distributed, dp) == pytest.approx(expected)


def _weight_copy_gib(method, extra):
    report = validate(RECIPE_ARGS + ["--routing-method", method] + extra, nnodes=2,
                      gpus_per_node=8)
    lines = [line for line in report.lines if line.startswith(f"{method}: ")]
    return float(lines[0].split("GiB pinned")[0].split()[-1]) if lines else None


def _recipe_stage_params():
    """The recipe's fullest GPU at 2 nodes (stage 1, see the H100 test): dense and expert
    weights by hand."""
    experts = 24 * 16 * 3 * 2048 * 768
    dense = 24 * ((2 * 2048 * 4096 + 2 * 2048 * 512) // 4 + 128 * 2048 + 2 * 2048 + 2 * 128)
    return dense + 151936 * 2048 // 4 + 2048, experts


@pytest.mark.parametrize("extra, expected", [
    ([], lambda dense, experts: 0.0),  # bf16: cast again from the fp32 main weights
    (["--no-bf16"],  # fp32, distributed optimizer: dense / DP 2, experts / expert DP 1
     lambda dense, experts: 4 * (dense / 2 + experts)),
    (["--no-bf16", "--no-use-distributed-optimizer"],
     lambda dense, experts: 4 * (dense + experts)),
])
def test_validate_counts_the_host_copy_of_lookahead(extra, expected):
    gib = _weight_copy_gib("pr2-lookahead", extra)
    assert gib == pytest.approx(expected(*_recipe_stage_params()) / 2**30, abs=0.06)


@pytest.mark.parametrize("extra, weight_bytes", [([], 2), (["--no-bf16"], 4)])
def test_validate_counts_the_two_copies_of_current_route(extra, weight_bytes):
    gib = _weight_copy_gib("current-route", extra)
    assert gib == pytest.approx(2 * weight_bytes * sum(_recipe_stage_params()) / 2**30, abs=0.06)
    assert _weight_copy_gib("r2", extra) is None


@pytest.mark.parametrize("flags,counted", [
    (["--routing-method", "pr2"], True),
    (["--routing-method", "pr2", "--predictor", "optimizer",
      "--no-use-distributed-optimizer"], True),  # it needs whole router weights' Adam state
    (["--routing-method", "pr2-engine"], True),
    (["--routing-method", "r2"], False),
    (["--routing-method", "r3"], False),
    (["--routing-method", "none"], False),
])
def test_dry_run_counts_the_predictor_only_where_the_routers_hold_one(flags, counted):
    """The routers of Qwen3-30B-A3B's fullest stage hold E x d = 128 x 2048 per MoE layer."""
    lines = validate([*RECIPE_ARGS, *flags], nnodes=2, gpus_per_node=8).lines
    per_gpu = next(line for line in lines if line.startswith("parameters per GPU"))
    layers_per_stage = 48 // RECIPE_LAYOUT.pipeline_model_parallel_size
    expected = f"incl. {layers_per_stage * 128 * 2048 / 1e6:.1f}M PR2 predictor"
    assert (expected in per_gpu) == counted, per_gpu
