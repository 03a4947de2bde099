"""tools/async_vs_sync.py: paired differences of two compare output directories."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import async_vs_sync  # noqa: E402

SYNC_REWARDS = {1: [0.1, 0.2], 2: [0.3, 0.3], 3: [0.2, 0.4]}
ASYNC_REWARDS = {1: [0.2, 0.2], 2: [0.3, 0.5], 3: [0.3, 0.4]}


def _write(root, rewards):
    for seed, values in rewards.items():
        path = root / "metrics" / "r3" / f"seed{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": i + 1, "rollout/reward_mean": v}) + "\n"
                                for i, v in enumerate(values)))


def test_the_paired_difference_of_the_mean_reward(tmp_path):
    _write(tmp_path / "sync", SYNC_REWARDS)
    _write(tmp_path / "async", ASYNC_REWARDS)
    rows = async_vs_sync.rows(async_vs_sync.load(str(tmp_path / "sync")),
                              async_vs_sync.load(str(tmp_path / "async")))
    (row,) = [r for r in rows if r[1] == "reward (mean)"]
    # per-seed run means: sync 0.15, 0.30, 0.30; async 0.20, 0.40, 0.35 -> differences
    # 0.05, 0.10, 0.05: mean 0.0667, sd 0.0289, t(2) = 4.303 -> half-width 0.0717
    assert row[:4] == ["r3", "reward (mean)", "0.2500", "0.3167"]
    assert row[4] == "0.0667 ± 0.0717" and row[5] == "contains 0" and row[6] == "3"


def test_a_directory_without_runs_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a compare output"):
        async_vs_sync.load(str(tmp_path))
