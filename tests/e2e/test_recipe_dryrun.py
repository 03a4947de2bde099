"""The recipe scripts of examples/pr2 in --dry-run mode, run as a user would run them.

The dry run parses and validates the whole configuration on CPU (no model is built); the
expected figures are worked out by hand for Qwen3-30B-A3B on 2 nodes x 8 GPUs with the recipe's
TP=4/SP, PP=2, EP=8, ETP=1: DP = 16 / (4 * 2) = 2, expert DP = 16 / (1 * 8 * 2) = 1, and
64 prompts x 8 samples / DP 2 / 4 mini-steps / micro-batch 1 = 64 micro-batches per mini-step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "examples", "pr2", "train_qwen_moe.sh")
SGLANG_LAUNCHER = os.path.join(REPO, "examples", "pr2", "launch_sglang_servers.sh")
RECIPE_ENV = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "HF_CKPT",
              "DATA", "SGLANG_URLS", "OUTPUT", "METHOD", "FP8", "OFF_POLICY_WINDOW",
              "PREDICTOR_LR_MULT", "TP", "PP", "EP", "ETP", "VPP", "CONFIG", "SGLANG_TP")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in RECIPE_ENV}
    clean.update({"PYTHON": sys.executable, **env})
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=clean,
                          timeout=300, cwd=REPO, check=False)


def test_dry_run_validates_the_recipe(tmp_path):
    result = run(RECIPE, "--dry-run", OUTPUT=str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "model: Qwen3MoeForCausalLM, 48 layers (48 MoE), 128 experts top-8, hidden 2048",
        "world: 16 GPUs",
        "layout: TP=4 PP=2 VPP=1 CP=1 EP=8 ETP=1 sequence_parallel=True",
        "data parallel: DP=2 (dense), expert DP=1",
        "layers per pipeline stage: 24",
        "experts per EP rank: 16 of 128",
        "rollout batch: 512 samples (64 prompts x 8), 256 per DP rank",
        "micro-batches per mini-step: 64 per DP rank (micro-batch size 1, 64 samples)",
        "routing: pr2, loss ppo_clip, predictor LR x1000",
        "parameters: 30.53B total",
        "TransformerEngine: required at launch (not checked in a dry run)",
        "configuration OK",
        "dry run OK",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "using the embedded Qwen3-30B-A3B config" in out
    convert = next(line for line in out.splitlines() if "tools/convert.py hf-to-megatron" in line)
    assert "--tp 4 --pp 2 --ep 8 --etp 1" in convert
    launch = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    assert "--nnodes 2 --node-rank 0 --nproc-per-node 8" in launch
    assert "-m megatron_pr2.train --config" in launch
    assert "--routing-method pr2" in launch and "--tensorboard-dir" in launch
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_names_every_impossible_layout_constraint(tmp_path):
    result = run(RECIPE, "--dry-run", TP="3", EP="6", OUTPUT=str(tmp_path))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    text = "\n".join(errors)
    assert "world size 16 is not divisible by TP*PP*CP = 3*2*1 = 6" in text
    assert "num_attention_heads=32 is not divisible by --tensor-model-parallel-size=3" in text
    assert "num_key_value_heads=4 is not divisible by --tensor-model-parallel-size=3" in text
    assert "num_experts=128 is not divisible by --expert-model-parallel-size=6" in text
    assert "dry run OK" not in result.stdout


def test_dry_run_uses_the_checkpoint_config_given_by_hf_ckpt(tmp_path):
    from megatron_pr2.models.presets import PRESETS

    ckpt = tmp_path / "tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(PRESETS["tiny-qwen3-moe"]))
    # 2 KV heads and 8 experts: TP=4 and EP=8 x 2 nodes cannot hold it; NNODES=1 is too small.
    result = run(RECIPE, "--dry-run", HF_CKPT=str(ckpt), NNODES="1", OUTPUT=str(tmp_path))
    assert result.returncode != 0
    assert "world size 8 is not divisible by ETP*EP*PP = 16" in result.stderr
    assert ("num_key_value_heads=2 is not divisible by --tensor-model-parallel-size=4"
            in result.stderr)


@pytest.mark.parametrize("args,needle", [
    (["--tensor-paralel-size", "2"],
     ("unrecognized arguments: --tensor-paralel-size 2 "
      "(did you mean --tensor-model-parallel-size?)")),
    (["--micro-batch-size", "two"], "argument --micro-batch-size: invalid int value: 'two'"),
])
def test_dry_run_rejects_bad_trainer_flags(tmp_path, args, needle):
    result = run(RECIPE, "--dry-run", *args, OUTPUT=str(tmp_path))
    assert result.returncode != 0
    assert needle in result.stderr
    assert "usage:" not in result.stderr  # one line naming the problem, not argparse's usage dump


@pytest.mark.parametrize("env,needle", [
    ({"NNODES": "two"}, "NNODES must be a positive integer, got 'two'"),
    ({"NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"FP8": "yes"}, "FP8 must be 0 or 1"),
    ({"CONFIG": "/nonexistent.yaml"}, "CONFIG=/nonexistent.yaml does not exist"),
    ({"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python is not an executable"),
])
def test_bad_environment_is_named(tmp_path, env, needle):
    result = run(RECIPE, "--dry-run", OUTPUT=str(tmp_path), **env)
    assert result.returncode != 0
    assert f"error: {needle}" in result.stderr


def test_launch_without_inputs_names_them(tmp_path):
    result = run(RECIPE, OUTPUT=str(tmp_path))
    assert result.returncode != 0
    assert "error: set HF_CKPT DATA SGLANG_URLS" in result.stderr
    assert not any(tmp_path.iterdir())


def test_sglang_launcher_dry_run_splits_the_node():
    result = run(SGLANG_LAUNCHER, "--dry-run", GPUS_PER_NODE="8", SGLANG_TP="2",
                 SGLANG_ADVERTISE_HOST="rollout0", SGLANG_BASE_PORT="31000")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("would run:")]
    assert len(commands) == 4  # 8 GPUs / TP 2
    for index, command in enumerate(commands):
        assert f"CUDA_VISIBLE_DEVICES={2 * index},{2 * index + 1} " in command
        assert f"--port {31000 + index} " in command
        assert "--tp-size 2" in command and "--enable-return-routed-experts" in command
        assert "--api-key" in command and "SGLANG_API_KEY" in command  # from the environment
    assert ("SGLANG_URLS=http://rollout0:31000,http://rollout0:31001,http://rollout0:31002,"
            "http://rollout0:31003") in result.stdout


def test_sglang_launcher_refuses_a_split_that_wastes_gpus():
    result = run(SGLANG_LAUNCHER, "--dry-run", GPUS_PER_NODE="8", SGLANG_TP="3")
    assert result.returncode != 0
    assert "GPUS_PER_NODE=8 is not divisible by SGLANG_TP=3" in result.stderr


def test_launch_converts_once_then_stops_at_the_runtime_check_without_gpus(tmp_path):
    """The real launch path on CPU: validation, conversion (once), then the GPU check refuses."""
    import torch

    from megatron_pr2.convert.random_init import save_random_hf_checkpoint
    from megatron_pr2.models.presets import PRESETS

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    ckpt, out = tmp_path / "hf", tmp_path / "run"
    save_random_hf_checkpoint(dict(PRESETS["tiny-qwen3-moe"]), str(ckpt))
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    env = {"HF_CKPT": str(ckpt), "DATA": str(data), "SGLANG_URLS": "http://127.0.0.1:30000",
           "OUTPUT": str(out), "NNODES": "1", "GPUS_PER_NODE": "1",
           "TP": "1", "PP": "1", "EP": "1", "ETP": "1"}
    flags = ("--no-sequence-parallel", "--max-new-tokens", "64")  # the tiny model: 256 positions
    keyless = run(RECIPE, *flags, **env)
    assert keyless.returncode != 0
    assert "error: the SGLang servers require an API key" in keyless.stderr
    assert not out.exists() or not any(out.iterdir())
    key_file = tmp_path / "sglang_api_key"
    key_file.write_text("secret-key\n")
    env["SGLANG_API_KEY_FILE"] = str(key_file)
    first = run(RECIPE, *flags, **env)
    assert first.returncode != 0
    assert "== converting" in first.stdout
    assert (out / "megatron_ckpt.converted").exists()
    assert any((out / "megatron_ckpt").iterdir())
    assert "error: CUDA is not available on this machine" in first.stderr
    assert not (out / "logs" / "train_node0.log").exists()  # torchrun never started
    second = run(RECIPE, *flags, **env)
    assert "== converting" not in second.stdout  # converted once
    assert "error: CUDA is not available on this machine" in second.stderr
