"""Paired differences, asynchronous minus synchronous rollout, of two ``compare`` output dirs.

Run the comparison twice with the same seeds, once with ``--async-rollout``, then::

    python -m megatron_pr2.compare --methods r2,r3 --out outputs/sync
    python -m megatron_pr2.compare --methods r2,r3 --out outputs/async --async-rollout
    python tools/async_vs_sync.py outputs/sync outputs/async

For every method in both, and every metric below, it prints the mean of each mode and the 95%
interval of the paired difference (same seed), and whether that interval contains 0 or lies
above or below it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from megatron_pr2.compare import EVAL, REWARD, ZERO_DEV_GE2, reduce_run, with_derived
from megatron_pr2.confidence import paired_difference
from megatron_pr2.training.metrics_log import read_jsonl

METRICS = [  # (what, key, reduction)
    ("reward (mean)", REWARD, "mean"),
    ("reward gain", REWARD, "gain"),
    ("eval greedy reward (after RL)", EVAL, "final"),
    ("train/rollout k3 KL (mean)", "mismatch/k3_kl", "mean"),
    ("zero-dev, mini-steps >= 2", ZERO_DEV_GE2, "mean"),
    ("zero-dev, old pass", "routing/old_pass/zero_deviation_ratio", "mean"),
    ("weight-version lag", "rollout/weight_version_lag", "mean"),
    ("seconds per iteration", "time/iteration_s", "mean"),
]


def load(out_dir: str) -> dict[str, dict[int, list[dict]]]:
    """method -> seed -> records of a compare output directory."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "metrics", "*", "seed*.jsonl"))):
        method = os.path.basename(os.path.dirname(path))
        seed = int(os.path.basename(path)[len("seed"):-len(".jsonl")])
        runs.setdefault(method, {})[seed] = with_derived(read_jsonl(path))
    if not runs:
        raise SystemExit(f"{out_dir} has no metrics/<method>/seed*.jsonl: not a compare output")
    return runs


def rows(sync, asynchronous) -> list[list[str]]:
    out = []
    for method in sorted(sync.keys() & asynchronous.keys()):
        seeds = sorted(sync[method].keys() & asynchronous[method].keys())
        for what, key, how in METRICS:
            a = [reduce_run(asynchronous[method][s], key, how) for s in seeds]
            b = [reduce_run(sync[method][s], key, how) for s in seeds]
            if any(v is None for v in a + b):
                continue
            diff = paired_difference(a, b)
            where = ("n/a (one seed)" if diff.n < 2 else "contains 0" if not diff.excludes(0.0)
                     else "async higher" if diff.low > 0 else "async lower")
            out.append([method, what, f"{sum(b) / len(b):.4f}", f"{sum(a) / len(a):.4f}",
                        diff.text(), where, str(len(seeds))])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sync_dir")
    parser.add_argument("async_dir")
    args = parser.parse_args(argv)
    table = rows(load(args.sync_dir), load(args.async_dir))
    if not table:
        print("no method with the same seeds in both directories", file=sys.stderr)
        return 1
    print_table(table)
    return 0


def print_table(table: list[list[str]]) -> None:
    """The rows as a Markdown table."""
    header = ["method", "metric", "sync", "async", "async - sync (95%)", "interval", "seeds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
