"""The dry run (``megatron_pr2.preflight.validate``) and the trainer refuse the same bad
configurations with the same message: each rule is written once and both call it.

The trainer's side is reached through its own entry points: ``python -m megatron_pr2.train``'s
``main`` (config rules), the model builder (model divisibility) and the RL loop's batch split
(rules that depend on the data-parallel size, which only the launched world knows).
"""

from __future__ import annotations

import pytest

from megatron_pr2.config import parse_config
from megatron_pr2.preflight.problems import ValidationError
from megatron_pr2.preflight.validate import validate

SMALL = ["--hf-config", "tiny-qwen3-moe", "--device", "cpu", "--rollout-batch-prompts", "4",
         "--n-samples-per-prompt", "2", "--off-policy-window", "2", "--micro-batch-size", "2"]


def _dry_run_problems(argv, gpus: int = 1) -> list[str]:
    with pytest.raises(ValidationError) as err:
        validate(argv, nnodes=1, gpus_per_node=gpus)
    return err.value.problems


def _trainer_error(argv, capsys) -> str:
    from megatron_pr2.train import main

    assert main(argv) == 2  # refused before anything is built
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("extra,needle", [
    (["--save-interval", "2"], "--save-interval needs --save DIR"),
    (["--off-policy-window", "3"], "DP x --off-policy-window x --micro-batch-size = 1 x 3 x 2"),
    (["--micro-batch-size", "3"], "DP x --off-policy-window x --micro-batch-size = 1 x 2 x 3"),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
      "--micro-batch-size", "1", "--rollout-batch-prompts", "3"], "interleaved pipeline"),
    (["--transformer-impl", "transformer_engine"],
     "--transformer-impl transformer_engine cannot run with --device cpu"),
    (["--max-new-tokens", "256"],  # tiny-qwen3-moe has 256 positions
     "--max-new-tokens 256 does not fit the model's max_position_embeddings 256"),
    (["--lr-decay-style", "cosine", "--lr-warmup-iters", "400"],  # 20 iterations x window 2
     "the run's optimizer steps (--train-iters x --off-policy-window) = 40 must exceed"),
])
def test_config_rules_refused_alike(extra, needle, capsys):
    argv = [*SMALL, *extra]
    trainer = _trainer_error(argv, capsys)
    assert needle in trainer
    assert _dry_run_problems(argv, gpus=2) == [trainer]


def test_model_divisibility_refused_alike():
    from megatron_pr2.models import build_model_chunks
    from megatron_pr2.models.hf_config import resolve_hf_config

    argv = [*SMALL, "--expert-model-parallel-size", "3"]
    cfg = parse_config(argv)
    with pytest.raises(ValueError) as err:
        build_model_chunks(resolve_hf_config(cfg.model.hf_config), cfg.parallel)
    assert str(err.value) == "num_experts=8 is not divisible by --expert-model-parallel-size=3"
    assert str(err.value) in _dry_run_problems(argv, gpus=3)


def test_fp8_gemm_sizes_refused_alike():
    """FP8 needs each expert-tensor-parallel shard of the expert FFN to be a multiple of 16:
    tiny-qwen3-moe's 32 over ETP 4 is 8. The trainer's own model options carry the FP8 flag."""
    from megatron_pr2.models import build_model_chunks
    from megatron_pr2.models.hf_config import resolve_hf_config
    from megatron_pr2.training.components import _model_options

    argv = [*SMALL, "--device", "cuda", "--micro-batch-size", "1",
            "--transformer-impl", "transformer_engine",
            "--fp8-format", "e4m3", "--expert-tensor-parallel-size", "4"]
    cfg = parse_config(argv)
    with pytest.raises(ValueError) as err:
        build_model_chunks(resolve_hf_config(cfg.model.hf_config), cfg.parallel,
                           _model_options(cfg))
    assert str(err.value) == "FP8 GEMMs need moe_intermediate_size / ETP divisible by 16, got 8"
    assert _dry_run_problems(argv, gpus=4) == [str(err.value)]
    validate([*argv, "--expert-tensor-parallel-size", "2"], nnodes=1, gpus_per_node=4)  # 16: fits


class _DataParallelGroup:
    """Stands in for a data-parallel process group of two ranks (this one rank 0)."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_data_parallel_batch_split_refused_alike():
    from types import SimpleNamespace

    from megatron_pr2.training.loop import RLLoop

    argv = [*SMALL, "--rollout-batch-prompts", "2"]  # 4 samples: 2 x 2 at DP 1, not at DP 2
    loop = object.__new__(RLLoop)
    loop.cfg = parse_config(argv)
    loop.parts = SimpleNamespace(groups=SimpleNamespace(dp=_DataParallelGroup()))
    with pytest.raises(ValueError) as err:
        loop._microbatches(samples=[None] * 4, advantages=None)
    assert "= 2 x 2 x 2 = 8" in str(err.value)
    assert _dry_run_problems(argv, gpus=2) == [str(err.value)]
