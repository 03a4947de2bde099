"""The trainer on one GPU in bf16, for every routing method, with the in-process engine; the same
run under torchrun with NCCL over all local GPUs; model placement on the GPU."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_pr2.routing.methods import ROUTING_METHODS
from tests.multiproc import run_distributed

ZERO_DEV_STEP1 = "routing/zero_deviation_ratio/ministep1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flags(out_dir: str, method: str, prompts: int = 4, bf16: bool = True) -> list[str]:
    return ["--routing-method", method, *(["--bf16"] if bf16 else []), "--device", "cuda",
            "--train-iters", "1", "--off-policy-window", "2",
            "--rollout-batch-prompts", str(prompts), "--n-samples-per-prompt", "2",
            "--max-new-tokens", "6", "--micro-batch-size", "2",
            "--save", os.path.join(out_dir, "ckpt"),
            "--log-jsonl", os.path.join(out_dir, "metrics.jsonl")]


def _known_flags() -> set[str]:
    from megatron_pr2.config import build_parser

    return {option for action in build_parser()._actions for option in action.option_strings}


def _require_flags(*flags: str) -> None:
    """Skip, naming the flags, when the trainer does not have them (yet)."""
    missing = [flag for flag in flags if flag not in _known_flags()]
    if missing:
        pytest.skip(f"the trainer has no {', '.join(missing)} flag")


def _deterministic() -> None:
    """Same kernels, same sums: R2's mini-step 1 must see exactly the routes it recorded."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _train_worker(rank, argv):
    from megatron_pr2.config import parse_config
    from megatron_pr2.train import run_training
    from megatron_pr2.training.metrics_log import read_jsonl

    _deterministic()
    cfg = parse_config(argv)
    run_training(cfg)
    return read_jsonl(cfg.train.log_jsonl) if rank == 0 else None


def _check_records(records: list[dict], method: str) -> None:
    assert [r["step"] for r in records] == [1]
    bad = {k: v for k, v in records[0].items()
           if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    for key in ("rollout/reward_mean", "mismatch/k3_kl", "train/policy_loss", "train/grad_norm"):
        assert key in records[0], key


@pytest.mark.parametrize("method", sorted(ROUTING_METHODS))
def test_each_routing_method_trains_in_bf16(method, tmp_path):
    _require_flags("--bf16")
    records = run_distributed(_train_worker, 1, _flags(str(tmp_path), method))[0]
    _check_records(records, method)
    row = ROUTING_METHODS[method]
    if row.replay.needs_old_pass_routes:
        # mini-step 1 runs the weights that chose the replayed route (PR2: zero predictor;
        # lookahead and current-route: R2 in mini-step 1)
        assert records[0][ZERO_DEV_STEP1] == 1.0


def test_h100_recipe_flags_train(tmp_path):
    recipe = ["--use-distributed-optimizer", "--moe-token-dispatcher-type", "alltoall",
              "--clip-grad", "1.0"]
    _require_flags("--bf16", "--use-distributed-optimizer", "--moe-token-dispatcher-type")
    records = run_distributed(_train_worker, 1, _flags(str(tmp_path), "pr2") + recipe)[0]
    _check_records(records, "pr2")
    assert records[0][ZERO_DEV_STEP1] == 1.0


def test_bf16_with_the_sft_warmup_and_the_distributed_optimizer_trains(tmp_path):
    _require_flags("--bf16", "--warmup-sft-steps", "--use-distributed-optimizer")
    argv = _flags(str(tmp_path), "pr2") + ["--warmup-sft-steps", "2",
                                           "--use-distributed-optimizer"]
    _check_records(run_distributed(_train_worker, 1, argv)[0], "pr2")


def test_two_pipeline_stages_train(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("PP=2 needs 2 GPUs here: NCCL refuses two ranks on one device")
    _torchrun(tmp_path, _flags(str(tmp_path), "pr2", prompts=4) + [
        "--pipeline-model-parallel-size", "2"], nproc=2)


def _torchrun(tmp_path, argv, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "-m", "megatron_pr2.train", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    _check_records(records, "pr2")
    return result


def test_torchrun_nccl_over_all_local_gpus(tmp_path):
    _require_flags("--bf16")
    gpus = torch.cuda.device_count()
    argv = _flags(str(tmp_path), "pr2", prompts=4 * gpus)
    if 8 % gpus == 0:  # the tiny preset has 8 experts
        argv += ["--expert-model-parallel-size", str(gpus)]
    result = _torchrun(tmp_path, argv, nproc=gpus)
    assert "backend=nccl" in result.stderr


def _placement_worker(rank, argv):
    from megatron_pr2.config import parse_config
    from megatron_pr2.platform import compute_device, destroy_model_parallel
    from megatron_pr2.training.components import build_components

    parts = build_components(parse_config(argv))
    try:
        device = compute_device()
        off_device = [name for chunk in parts.model for name, p in chunk.named_parameters()
                      if p.device != device]
        return {"device": str(device), "off_device": off_device,
                "backend": torch.distributed.get_backend()}
    finally:
        parts.actor.controller.close()
        destroy_model_parallel()


def test_model_lives_on_the_gpu(tmp_path):
    argv = _flags(str(tmp_path), "pr2", bf16="--bf16" in _known_flags())
    out = run_distributed(_placement_worker, 1, argv)[0]
    assert out["device"] == "cuda:0"
    assert out["backend"] == "nccl"
    assert out["off_device"] == []  # norms and PR2 predictors included

