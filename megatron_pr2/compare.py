"""``python -m megatron_pr2.compare``: the main CPU job — none vs R2 vs R3 vs PR2 on one RL budget.

1. Warm up the embedded tiny Qwen3-MoE on the digit task (supervised), once, and save it.
2. From that checkpoint, run the same RL budget (iterations, rollout batch, off-policy window,
   seeds) for each routing method with the in-process bf16 rollout engine.
3. Write TensorBoard logs and JSONL metrics per method, a markdown and a CSV table, and a PNG
   plot of reward, train/rollout KL, extreme-token fraction and zero-deviation ratio.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import time

import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.train import configure_logging, run_training
from megatron_pr2.training.metrics_log import read_jsonl

logger = logging.getLogger("megatron_pr2.compare")

DEFAULT_METHODS = ("none", "r2", "r3", "pr2")

# (column title, metric key, how to reduce it over iterations)
TABLE_COLUMNS = [
    ("reward (mean)", "rollout/reward_mean", "mean"),
    ("reward (last 5)", "rollout/reward_mean", "last5"),
    ("eval greedy reward (final)", "eval/greedy_reward", "final"),
    ("train/rollout k3 KL", "mismatch/k3_kl", "mean"),
    ("|logp diff|", "mismatch/abs_logprob_diff", "mean"),
    ("extreme-token frac (tau=2)", "mismatch/extreme_token_fraction", "mean"),
    ("zero-dev ratio, mini-step 1", "routing/zero_deviation_ratio/ministep1", "mean"),
    ("zero-dev ratio, mini-steps >= 2", "routing/zero_deviation_ratio/ministeps_ge2", "mean"),
    ("top-k overlap, mini-steps >= 2", "routing/topk_overlap/ministeps_ge2", "mean"),
    ("predictor top-k acc", "routing/predictor_topk_acc", "mean"),
    ("zero-predictor top-k acc", "routing/zero_predictor_topk_acc", "mean"),
    ("policy clip frac", "train/pg_clip_fraction", "mean"),
]

PLOTS = [("rollout/reward_mean", "reward"), ("mismatch/k3_kl", "train/rollout k3 KL"),
         ("mismatch/extreme_token_fraction", "extreme-token fraction (tau=2)"),
         ("routing/zero_deviation_ratio/ministeps_ge2", "zero-deviation ratio (mini-steps >= 2)")]


def base_config(args) -> RunConfig:
    """The shared RL budget of every method."""
    cfg = RunConfig()
    cfg.train.train_iters = args.iterations
    cfg.train.eval_interval = args.iterations
    cfg.train.eval_prompts = 64
    cfg.train.lr = args.lr
    cfg.train.micro_batch_size = 4
    cfg.train.seed = args.seed
    cfg.rollout.rollout_batch_prompts = args.prompts
    cfg.rollout.n_samples_per_prompt = args.group_size
    cfg.rollout.rollout_dtype = "bf16"
    cfg.algo.off_policy_window = args.off_policy_window
    cfg.predictor.predictor_lr_mult = args.predictor_lr_mult
    return cfg


def warm_start(args, out_dir: str) -> str:
    """Supervised warm-up, saved once as a Megatron checkpoint; reused by every method."""
    from megatron_pr2.platform import destroy_model_parallel
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.dist_checkpoint import save_model_checkpoint
    from megatron_pr2.training.rollout_source import make_prompts
    from megatron_pr2.training.warmup import sft_warmup

    path = os.path.join(out_dir, "warmstart")
    if os.path.exists(os.path.join(path, "metadata.json")):
        logger.info("reusing warm-start checkpoint %s", path)
        return path
    cfg = base_config(args)
    parts = build_components(cfg)
    try:
        sft_warmup(parts.model, parts.actor.controller, make_prompts(cfg).task,
                   args.warmup_steps, cfg.train.warmup_sft_lr)
        save_model_checkpoint([c.module for c in parts.model], path)
    finally:
        parts.actor.controller.close()
        destroy_model_parallel()
    return path


def run_method(args, method: str, warm: str, out_dir: str) -> str:
    cfg = copy.deepcopy(base_config(args))
    cfg.algo.routing_method = method
    cfg.model.load = warm
    cfg.train.tensorboard_dir = os.path.join(out_dir, "tensorboard", method)
    cfg.train.log_jsonl = os.path.join(out_dir, "metrics", f"{method}.jsonl")
    started = time.perf_counter()
    run_training(cfg.validate())
    logger.info("%s finished in %.0f s", method, time.perf_counter() - started)
    return cfg.train.log_jsonl


def _reduce(records: list[dict], key: str, how: str):
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    if how == "final":
        return values[-1]
    if how == "last5":
        values = values[-5:]
    return sum(values) / len(values)


def summarise(results: dict[str, list[dict]], out_dir: str) -> str:
    """Write summary.md and summary.csv; return the markdown table."""
    header = ["method"] + [title for title, _, _ in TABLE_COLUMNS]
    rows = []
    for method, records in results.items():
        cells = [_reduce(records, key, how) for _, key, how in TABLE_COLUMNS]
        rows.append([method] + cells)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[c if c is not None else "" for c in row] for row in rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        shown = [row[0]] + ["n/a" if c is None else f"{c:.4f}" for c in row[1:]]
        lines.append("| " + " | ".join(shown) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("# none vs R2 vs R3 vs PR2 (embedded tiny Qwen3-MoE, CPU)\n\n")
        handle.write(table + "\n")
    return table


def plot(results: dict[str, list[dict]], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (key, title) in zip(axes.flat, PLOTS):
        for index, (method, records) in enumerate(results.items()):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:  # one colour per method in every panel, even where one has no data
                axis.plot(*zip(*points), marker="o", markersize=3, label=method,
                          color=f"C{index}")
        axis.set_title(title)
        axis.set_xlabel("RL iteration")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "comparison.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_pr2.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/cpu_compare")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--off-policy-window", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--predictor-lr-mult", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for the tiny default model)")
    args = parser.parse_args(argv)
    if args.off_policy_window < 1:
        parser.error("--off-policy-window must be >= 1")
    return args


def main(argv=None) -> int:
    configure_logging()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    warm = warm_start(args, args.out)
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        results[method] = read_jsonl(run_method(args, method, warm, args.out))
    table = summarise(results, args.out)
    image = plot(results, args.out)
    print(table)
    print(f"\nwrote {os.path.join(args.out, 'summary.md')}, summary.csv, {image}, "
          f"TensorBoard logs in {os.path.join(args.out, 'tensorboard')} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
