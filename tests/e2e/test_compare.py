"""``python -m megatron_pr2.compare`` on a tiny budget: same seeds -> identical summaries."""

import os

from tests.multiproc import run_distributed

ARGS = ["--model", "tiny-qwen3-moe", "--methods", "r2,pr2-lookahead", "--seeds", "2",
        "--iterations", "2", "--prompts", "4", "--group-size", "2", "--off-policy-window", "2",
        "--warmup-steps", "3", "--eval-prompts", "4", "--no-partial-credit"]


def _metrics(out_dir):
    """Every run's JSONL at full precision, without wall times."""
    from megatron_pr2.training.metrics_log import read_jsonl

    root = os.path.join(out_dir, "metrics")
    return {(method, name): [{k: v for k, v in r.items() if not k.startswith("time/")}
                             for r in read_jsonl(os.path.join(root, method, name))]
            for method in sorted(os.listdir(root))
            for name in sorted(os.listdir(os.path.join(root, method)))}


def _compare_worker(rank, out_dir):
    from megatron_pr2.compare import main

    main(ARGS + ["--out", out_dir])
    with open(os.path.join(out_dir, "summary.md"), encoding="utf-8") as handle:
        summary = handle.read()
    with open(os.path.join(out_dir, "summary.csv"), encoding="utf-8") as handle:
        table = handle.read()
    return summary, table, sorted(os.listdir(out_dir)), _metrics(out_dir)


def test_same_seeds_give_identical_summaries(tmp_path):
    first = run_distributed(_compare_worker, 1, str(tmp_path / "a"))[0]
    second = run_distributed(_compare_worker, 1, str(tmp_path / "b"))[0]
    assert first[0] == second[0] and first[1] == second[1]
    assert first[3] == second[3] and len(first[3]) == 4  # 2 methods x 2 seeds, bit for bit
    summary, _, files, _ = first
    assert {"summary.md", "summary.csv", "costs.md", "comparison.png"} <= set(files)
    assert "seeds [1234, 1235]" in summary
    assert " ± " in summary  # intervals over the two seeds
    assert "pr2-lookahead vs r2, route deviation, mini-steps >= 2" in summary
    # mini-step 1 is R2's exact route for both methods: zero deviation, no spread
    assert "1.0000 ± 0.0000" in summary
    _assert_zero_advantage_runs_are_flagged(summary, first[3])


def _assert_zero_advantage_runs_are_flagged(summary, metrics):
    """3 warm-up steps leave the tiny model with exact-match reward 0 on every sample: every
    group has equal rewards, so no advantage and no policy gradient; summary.md must say so."""
    for records in metrics.values():
        rl = [r for r in records if "rollout/reward_mean" in r]
        assert rl and all(r["rollout/reward_mean"] == 0.0 for r in rl)  # the forced condition
        assert all(r["rollout/zero_advantage_group_frac"] == 1.0 for r in rl)
        assert all(r["train/policy_grad_norm"] == 0.0 for r in rl)
        assert all(r["train/zero_grad_ministeps"] == r["train/ministeps"] > 0 for r in rl)
        assert records[0]["step"] == 0 and "eval/greedy_reward" in records[0]  # before RL
    for column in ("zero-advantage group frac", "zero-grad mini-step frac",
                   "policy grad norm (mean)", "eval greedy reward (before RL)"):
        assert column in summary
    assert "**4 of 4 runs are degenerate**" in summary
    assert summary.count("DEGENERATE: 100% of mini-steps had no policy gradient or were "
                         "skipped; 100% of groups had equal rewards; reward collapsed") == 4
    assert "[from degenerate runs]" in summary
