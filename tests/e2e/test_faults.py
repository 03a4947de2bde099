"""Faults met as a user meets them, on tiny trainer runs (subprocesses): the README's fault table.

NaN at chosen iterations (skipped steps, visible metrics, clear stop, no non-finite checkpoint);
resume with a changed routing method (refused) or learning rate (applied); two trainers on one
directory; a corrupt latest checkpoint (falls back, names the file); a full tmpfs.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from megatron_pr2.training.checkpoint.checkpoint_verify import verify_checkpoint
from megatron_pr2.training.checkpoint.model_weights import read_full_tensors
from megatron_pr2.training.metrics_log import read_jsonl

ARGS = ["--routing-method", "pr2", "--rollout-batch-prompts", "4", "--n-samples-per-prompt", "2",
        "--off-policy-window", "2", "--micro-batch-size", "2", "--max-new-tokens", "4",
        "--save-interval", "1", "--lr", "1e-3", "--seed", "11"]
TIMEOUT = 600


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(save, iters, *extra, module="megatron_pr2.train", pre=()):
    command = [sys.executable, "-m", module, *pre, *ARGS, "--train-iters", str(iters),
               "--save", str(save), *extra]
    return subprocess.run(command, env=_env(), timeout=TIMEOUT, capture_output=True, text=True,
                          check=False)


def _latest(save) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


def _float_tensors(directory) -> dict:
    """Weights and Adam moments of a checkpoint, by global key."""
    tensors = {k: v for k, v in read_full_tensors(directory).items() if v.is_floating_point()}
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors)
    return tensors


def _group_lrs(directory) -> list[float]:
    common = torch.load(os.path.join(directory, "common.pt"), weights_only=True)
    return [group["lr"] for group in common["optimizer"]["param_groups"]]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 2 iterations at lr 1e-3 with a checkpoint after each (copied by the tests)."""
    save = tmp_path_factory.mktemp("base") / "ckpt"
    result = _train(save, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return save


def _copy(save, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(save, target)
    return target


# ------------------------------------------------------------------------------------- NaN
def test_nan_steps_are_skipped_shown_and_stop_the_run(tmp_path):
    save, jsonl = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    # NaN rewards at iteration 2 (2 skipped mini-steps, then recovery) and from iteration 4 on;
    # the third skipped step in a row (iteration 5) stops the run
    result = _train(save, 5, "--log-jsonl", str(jsonl), "--max-consecutive-skips", "3",
                    module="tests.e2e.nan_reward_trainer", pre=("rewards:2,4,5",))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: iteration 5: RL stopped" in result.stderr
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in result.stderr
    assert "NON-FINITE train/grad_norm" in result.stderr  # the progress line of iteration 2

    records = {r["step"]: r for r in read_jsonl(jsonl)}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[2]["train/update_skipped"] == 1.0 and records[3]["train/update_skipped"] == 0.0
    assert math.isnan(records[2]["train/grad_norm"]) and math.isnan(records[2]["train/policy_loss"])
    assert records[2]["metrics/nonfinite_count"] >= 2 and records[1]["metrics/nonfinite_count"] == 0
    assert records[4]["train/skipped_steps_total"] == 4.0

    assert _latest(save) == 4 and not (save / "iter_0000005").exists()
    weights = {i: _float_tensors(save / f"iter_{i:07d}") for i in (1, 2, 3, 4)}
    for i, tensors in weights.items():
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), i
    # skipped iterations leave the weights exactly as they were; the finite one changes them
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])


def test_nan_stop_with_a_batch_generating_ahead_exits_cleanly(tmp_path):
    # asynchronous rollout: batch 6 is generating in the background when iteration 5 stops
    jsonl = tmp_path / "metrics.jsonl"
    result = _train(tmp_path / "ckpt", 6, "--log-jsonl", str(jsonl), "--max-consecutive-skips",
                    "3", "--async-rollout", module="tests.e2e.nan_reward_trainer",
                    pre=("rewards:2,4,5",))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: iteration 5: RL stopped" in result.stderr
    records = {r["step"]: r for r in read_jsonl(jsonl)}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[2]["train/update_skipped"] == 1.0 and records[3]["train/update_skipped"] == 0.0
    assert _latest(tmp_path / "ckpt") == 4


def test_nan_in_warmup_is_skipped_and_stops_the_run(tmp_path):
    result = _train(tmp_path / "ckpt", 1, "--warmup-sft-steps", "3", "--max-consecutive-skips",
                    "2", module="tests.e2e.nan_reward_trainer", pre=("warmup:2,3",))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "warm-up step 2: non-finite loss or gradient, optimizer step skipped" in result.stderr
    assert "error: warm-up stopped at step 3: 2 optimizer steps in a row" in result.stderr
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


# ------------------------------------------------------------------------------------- resume
def test_resume_with_another_routing_method_is_refused(two_checkpoints, tmp_path):
    save = _copy(two_checkpoints, tmp_path)
    before = sorted(os.listdir(save))
    result = _train(save, 3, "--routing-method", "none")
    assert result.returncode == 1
    assert "--routing-method 'pr2' -> 'none' (the routing method)" in result.stderr
    assert "resumed from" not in result.stderr
    assert sorted(os.listdir(save)) == before and _latest(save) == 2


def test_resume_with_a_new_lr_applies_it(two_checkpoints, tmp_path):
    save = _copy(two_checkpoints, tmp_path)
    assert set(_group_lrs(save / "iter_0000002")) == {1e-3}
    result = _train(save, 3, "--lr", "3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--lr changed 0.001 -> 0.003 (applied)" in result.stderr
    assert "resumed from" in result.stderr and str(save / "iter_0000002") in result.stderr
    # the optimizer state saved after the resumed step carries the new rate, not the old one
    assert set(_group_lrs(save / "iter_0000003")) == {3e-3}


def test_resume_at_train_iters_skips_the_warm_up_and_says_nothing_is_left(two_checkpoints,
                                                                           tmp_path):
    save = _copy(two_checkpoints, tmp_path)
    result = _train(save, 2, "--warmup-sft-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from --save {save}: the SFT warm-up is skipped" in result.stderr
    assert "warm-up step" not in result.stderr
    assert (f"{save / 'iter_0000002'} is at iteration 2, already at --train-iters 2: nothing "
            "left to train") in result.stderr
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000001", "iter_0000002"]


# ------------------------------------------------------------------------------------- corrupt
def test_corrupt_latest_checkpoint_falls_back_and_names_the_file(two_checkpoints, tmp_path):
    save = _copy(two_checkpoints, tmp_path)
    shard = min((save / "iter_0000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    result = _train(save, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    unusable = log.index(f"checkpoint {save / 'iter_0000002'} is unusable: {shard} is truncated")
    resumed = log.index(f"resumed from {save / 'iter_0000001'} (iteration 1)")
    assert unusable < resumed
    assert f"resumed from {save / 'iter_0000002'}" not in log
    assert _latest(save) == 3
    verify_checkpoint(str(save / "iter_0000003"), 0)


def test_every_checkpoint_unusable_is_an_error_listing_them(two_checkpoints, tmp_path):
    save = _copy(two_checkpoints, tmp_path)
    for i in (1, 2):
        os.remove(save / f"iter_{i:07d}" / "common.pt")
    result = _train(save, 3)
    assert result.returncode == 1
    assert f"error: no usable checkpoint under {save}" in result.stderr
    for i in (1, 2):
        assert f"{save / f'iter_{i:07d}' / 'common.pt'} is missing" in result.stderr


# ------------------------------------------------------------------------------------- lock
def test_second_trainer_on_one_directory_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, "-m", "megatron_pr2.train", *ARGS, "--train-iters",
                              "3", "--save", str(save)], env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (save / "trainer.lock").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        owner = json.loads((save / "trainer.lock").read_text())
        second = _train(save, 3)
        assert second.returncode == 1
        assert f"is in use by another trainer (pid {first.pid} on" in second.stderr
        assert owner["pid"] == first.pid
        _, err = first.communicate(timeout=TIMEOUT)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _latest(save) == 3 and not (save / "trainer.lock").exists()
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000001", "iter_0000002", "iter_0000003"]
    for i in (1, 2, 3):
        verify_checkpoint(str(save / f"iter_{i:07d}"), 0)


# ------------------------------------------------------------------------------------- disk
def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_full_tmpfs_reports_no_space_and_keeps_earlier_checkpoints(tmp_path):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "6m"):
        pytest.skip("needs root to mount a small tmpfs (tests/unit/test_faults_checkpoint.py "
                    "injects ENOSPC at the write seam instead)")
    try:
        save = disk / "ckpt"
        result = _train(save, 3)  # one checkpoint is ~4 MB: the second does not fit in 6 MB
        assert result.returncode == 1
        assert f"error: no space left on device while saving iteration 2 to {save}" \
            in result.stderr
        assert _latest(save) == 1
        assert sorted(p.name for p in save.iterdir()) == [
            "iter_0000001", "latest_checkpointed_iteration.txt"]  # no staging folder, no lock
        verify_checkpoint(str(save / "iter_0000001"), 0)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
