"""``python -m megatron_pr2.compare``: the main CPU job — every routing method over several seeds.

1. Warm up the embedded tiny fine-grained Qwen3-MoE on the digit task (supervised), once.
2. From that checkpoint, run the same RL budget for every method x seed (in-process bf16
   rollout engine vs the fp32 trainer): seeds change rollout sampling, the data order and the
   predictor sampling, nothing else.
3. Write TensorBoard logs and JSONL metrics per run; ``summary.md`` / ``summary.csv`` (each
   column as mean ± 95% t-interval over seeds; whether RL learned: reward gain per method, greedy
   eval before/after RL, and per run the degeneracy checks (zero-advantage groups, mini-steps
   without policy gradient, collapsed reward); paired differences against R2 in words, marked
   where they rest on degenerate runs; R3/none KL ratio; how far the updates follow Adam's
   predicted step; drift attribution), ``costs.md`` (seconds per iteration) and
   ``comparison.png`` (mean and 95% band per iteration). docs/learning_regime.md says how the
   default regime was chosen.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import logging
import math
import os
import statistics
import time

import torch
import torch.multiprocessing

from megatron_pr2.cli_errors import debug_requested, run_reporting
from megatron_pr2.cli_help import COMPARE_HELP, describe_flags
from megatron_pr2.confidence import (
    Interval,
    mean_ci,
    paired_difference,
    ratio_interval,
    verdict,
)
from megatron_pr2.config import RunConfig
from megatron_pr2.platform.process_tree import (
    die_with_parent_if_helper,
    helpers_tied_to_this_process,
)
from megatron_pr2.progress import describe_seconds, seconds_left
from megatron_pr2.train import BAD_INPUT, RUN_FAULTS, configure_logging, run_training
from megatron_pr2.training.metrics_log import read_jsonl

logger = logging.getLogger("megatron_pr2.compare")

# A process that multiprocessing spawns below the comparison imports this module first.
die_with_parent_if_helper()

DEFAULT_METHODS = ("none", "r2", "r3", "pr2", "pr2-engine", "pr2-lookahead")
BASELINE = "r2"  # the report's reference: paired differences and cost ratios are against it
REPLAY_VS_LIVE = ("r3", "none")  # the train/rollout KL ratio the R3 paper reports
DEFAULT_MODEL = "tiny-qwen3-moe-fg"
ZERO_DEV_GE2 = "routing/zero_deviation_ratio/ministeps_ge2"

REWARD = "rollout/reward_mean"
EVAL = "eval/greedy_reward"
ZERO_ADV = "rollout/zero_advantage_group_frac"
POLICY_GRAD = "train/policy_grad_norm"
ZERO_GRAD = "train/zero_grad_ministep_frac"  # derived per iteration (see with_derived)
GAIN_TAIL = 4  # reward gain: mean of the last GAIN_TAIL iterations minus mean of the first ones

# (column title, metric key, reduction over a run's iterations)
TABLE_COLUMNS = [
    ("reward (mean)", REWARD, "mean"),
    (f"reward gain (last {GAIN_TAIL} - first {GAIN_TAIL})", REWARD, "gain"),
    ("eval greedy reward (before RL)", EVAL, "first"),
    ("eval greedy reward (after RL)", EVAL, "final"),
    ("zero-advantage group frac", ZERO_ADV, "mean"),
    ("zero-grad mini-step frac", ZERO_GRAD, "mean"),
    ("policy grad norm (mean)", POLICY_GRAD, "mean"),
    ("train/rollout k3 KL (mean)", "mismatch/k3_kl", "mean"),
    ("train/rollout k3 KL (median)", "mismatch/k3_kl", "median"),
    ("extreme-token frac (tau=2)", "mismatch/extreme_token_fraction", "mean"),
    ("zero-dev, mini-step 1", "routing/zero_deviation_ratio/ministep1", "mean"),
    ("zero-dev, mini-step 2", "routing/zero_deviation_ratio/ministep2", "mean"),
    ("zero-dev, mini-steps >= 2", ZERO_DEV_GE2, "mean"),
    ("predictor top-k acc", "routing/predictor_topk_acc", "mean"),
    ("zero-predictor top-k acc", "routing/zero_predictor_topk_acc", "mean"),
]

# (what, metric key, reduction, transform, lower is better): paired against R2
PAIRED = [
    ("route deviation, mini-steps >= 2", ZERO_DEV_GE2, "mean", lambda v: 1.0 - v, True),
    ("train/rollout k3 KL (mean)", "mismatch/k3_kl", "mean", None, True),
    ("train/rollout k3 KL (median)", "mismatch/k3_kl", "median", None, True),
    ("extreme-token fraction", "mismatch/extreme_token_fraction", "mean", None, True),
    ("reward (mean)", REWARD, "mean", None, False),
    ("reward gain", REWARD, "gain", None, False),
    ("eval greedy reward (after RL)", EVAL, "final", None, False),
]

# a run is degenerate (its method comparisons say so) when any of these holds
MAX_ZERO_GRAD_FRAC = 0.10  # mini-steps with no policy gradient (or skipped)
MAX_ZERO_ADV_FRAC = 0.50  # mean share of groups whose rewards are all equal
COLLAPSED_REWARD = 0.01  # mean reward of the last GAIN_TAIL iterations below this

UPDATE_COLUMNS = [("cos(theta_k - theta_0, u)", "update/cos_displacement_vs_adam_step"),
                  ("|theta_k - theta_0| / (k |u|)", "update/displacement_norm_ratio"),
                  ("cos(step_k, step_k-1)", "update/cos_consecutive_steps")]

DRIFT_COLUMNS = ["deviation", "weight_known_zero_dev", "input_known_zero_dev", "weight_share",
                 "input_share"]

PLOTS = [(REWARD, "sampled reward"), (EVAL, "greedy eval reward (before / after RL)"),
         (ZERO_ADV, "zero-advantage group fraction"), (POLICY_GRAD, "policy grad norm"),
         ("mismatch/k3_kl", "train/rollout k3 KL"),
         ("mismatch/extreme_token_fraction", "extreme-token fraction (tau=2)"),
         (ZERO_DEV_GE2, "zero-deviation ratio (mini-steps >= 2)"),
         ("drift/input_share/ministeps_ge2", "route drift share explained by router input"),
         ("time/iteration_s", "seconds per iteration")]


# ----------------------------------------------------------------------------------- runs
def base_config(args, seed: int) -> RunConfig:
    """The shared RL budget of every method."""
    cfg = RunConfig()
    cfg.model.hf_config = args.model
    cfg.train.train_iters = args.iterations
    cfg.train.eval_interval = args.iterations
    cfg.train.eval_prompts = args.eval_prompts
    cfg.train.eval_before_train = True
    cfg.algo.log_update_direction = True
    cfg.train.lr = args.lr
    cfg.train.lr_warmup_iters = args.lr_warmup_iters
    cfg.train.micro_batch_size = 4
    cfg.train.seed = seed
    cfg.rollout.rollout_batch_prompts = args.prompts
    cfg.rollout.n_samples_per_prompt = args.group_size
    cfg.rollout.rollout_dtype = "bf16"
    cfg.algo.off_policy_window = args.off_policy_window
    cfg.algo.lookahead_scale = args.lookahead_scale
    cfg.predictor.predictor_lr_mult = args.predictor_lr_mult
    cfg.task.partial_credit = args.partial_credit
    cfg.rollout.async_rollout = args.async_rollout
    cfg.task.task_stratified = args.task_stratified
    cfg.task.task_min_len, cfg.task.task_max_len = args.task_min_len, args.task_max_len
    return cfg


def warm_start(args, out_dir: str) -> str:
    """Supervised warm-up, saved once as a Megatron checkpoint; reused by every run."""
    from megatron_pr2.platform import destroy_model_parallel
    from megatron_pr2.training.checkpoint.model_weights import save_model_checkpoint
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.rollout_source import make_prompts
    from megatron_pr2.training.warmup import sft_warmup

    path = os.path.join(out_dir, "warmstart")
    if os.path.exists(os.path.join(path, "metadata.json")):
        logger.info("reusing warm-start checkpoint %s", path)
        return path
    cfg = base_config(args, args.seed)
    parts = build_components(cfg)
    try:
        sft_warmup(parts.model, parts.actor.controller, make_prompts(cfg).task,
                   args.warmup_steps, cfg.train.warmup_sft_lr, groups=parts.groups)
        save_model_checkpoint([c.module for c in parts.model], path)
    finally:
        parts.actor.controller.close()
        destroy_model_parallel()
    return path


def _fresh_process_setup(threads: int) -> None:
    """In a worker process: a 1-process group on its own port, torch threads, logging."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    torch.set_num_threads(threads)
    configure_logging()


def warm_start_worker(args, out_dir: str) -> tuple[str, float]:
    """Warm start in a fresh process; returns the checkpoint path and the CPU seconds spent."""
    _fresh_process_setup(args.threads)
    started = time.process_time()
    return warm_start(args, out_dir), time.process_time() - started


def run_method(args, method: str, seed: int, warm: str, out_dir: str):
    """One RL run in a fresh process: (JSONL records, wall seconds, CPU seconds)."""
    _fresh_process_setup(args.threads)
    cfg = copy.deepcopy(base_config(args, seed))
    cfg.algo.routing_method = method
    cfg.model.load = warm
    cfg.train.tensorboard_dir = os.path.join(out_dir, "tensorboard", method, f"seed{seed}")
    cfg.train.log_jsonl = os.path.join(out_dir, "metrics", method, f"seed{seed}.jsonl")
    started, cpu_started = time.perf_counter(), time.process_time()
    run_training(cfg.validate())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    logger.info("%s seed %d finished in %.0f s (%.0f s CPU)", method, seed, wall, cpu)
    return with_derived(read_jsonl(cfg.train.log_jsonl)), wall, cpu


# ----------------------------------------------------------------------------------- stats
def with_derived(records: list[dict]) -> list[dict]:
    """Records plus per-iteration values derived from the logged counts."""
    out = []
    for record in records:
        record = dict(record)
        steps = record.get("train/ministeps")
        if steps:
            bad = record.get("train/zero_grad_ministeps", 0.0) + \
                record.get("train/skipped_ministeps", 0.0)
            record[ZERO_GRAD] = bad / steps
        out.append(record)
    return out


def reduce_run(records: list[dict], key: str, how: str) -> float | None:
    """One number per run from ``key`` over its iterations: ``mean`` / ``median`` / ``first``
    / ``final`` value, ``head`` / ``tail`` (mean of the first / last :data:`GAIN_TAIL`
    values) or ``gain`` (the tail minus the head; they may not overlap: one batch's reward
    varies by about 0.05 from the next, a mean of 4 by half that)."""
    values = [r[key] for r in records if key in r and math.isfinite(r[key])]
    if not values:
        return None
    if how == "first":
        return values[0]
    if how == "final":
        return values[-1]
    head, tail = values[:GAIN_TAIL], values[-GAIN_TAIL:]
    if how == "head":
        return sum(head) / len(head)
    if how == "tail":
        return sum(tail) / len(tail)
    if how == "gain":
        return (sum(tail) - sum(head)) / GAIN_TAIL if len(values) >= 2 * GAIN_TAIL else None
    if how == "median":
        return statistics.median(values)
    return sum(values) / len(values)


def degeneracy(records: list[dict]) -> list[str]:
    """Why a run proves nothing about routing methods (empty when it learns)."""
    reasons = []
    zero_grad = reduce_run(records, ZERO_GRAD, "mean")
    if zero_grad is not None and zero_grad > MAX_ZERO_GRAD_FRAC:
        reasons.append(f"{100 * zero_grad:.0f}% of mini-steps had no policy gradient or were "
                       "skipped")
    zero_adv = reduce_run(records, ZERO_ADV, "mean")
    if zero_adv is not None and zero_adv > MAX_ZERO_ADV_FRAC:
        reasons.append(f"{100 * zero_adv:.0f}% of groups had equal rewards")
    tail = reduce_run(records, REWARD, "tail")
    if tail is not None and tail < COLLAPSED_REWARD:
        reasons.append(f"reward collapsed ({tail:.3f}, mean of the last {GAIN_TAIL} "
                       "iterations or fewer)")
    return reasons


def per_seed(runs: dict[int, list[dict]], key: str, how: str) -> list[float] | None:
    """The reduced value of every seed's run (None if any run lacks the metric)."""
    values = [reduce_run(records, key, how) for _, records in sorted(runs.items())]
    return None if any(v is None for v in values) else values


def _layer_drift(runs: dict[int, list[dict]], name: str) -> dict[int, Interval]:
    """Per layer: the run mean over iterations and mini-steps >= 2 of a drift metric, over seeds."""
    by_layer: dict[int, list[float]] = {}
    for _, records in sorted(runs.items()):
        sums: dict[int, list[float]] = {}
        for record in records:
            for key, value in record.items():
                parts = key.split("/")
                if (len(parts) == 4 and parts[0] == "drift_layer" and parts[2] == name
                        and parts[3] != "ministep1"):
                    sums.setdefault(int(parts[1][len("layer_"):]), []).append(value)
        for layer, values in sums.items():
            by_layer.setdefault(layer, []).append(sum(values) / len(values))
    return {layer: mean_ci(values) for layer, values in sorted(by_layer.items())}


# ----------------------------------------------------------------------------------- tables
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(results) -> tuple[str, list[list]]:
    header = ["method"] + [title for title, _, _ in TABLE_COLUMNS]
    rows, csv_rows = [], []
    for method, runs in results.items():
        cells, raw = [method], [method]
        for _, key, how in TABLE_COLUMNS:
            values = per_seed(runs, key, how)
            interval = mean_ci(values) if values else None
            cells.append(interval.text() if interval else "n/a")
            raw += [interval.mean, interval.half_width] if interval else ["", ""]
        rows.append(cells)
        csv_rows.append(raw)
    return _md_table(header, rows), csv_rows


def _value_text(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def degenerate_methods(results) -> set[str]:
    """Methods with at least one degenerate run."""
    return {method for method, runs in results.items()
            if any(degeneracy(records) for records in runs.values())}


def learning_section(results) -> list[str]:
    """Whether RL learned: per method the reward gain over seeds in words, per run the
    degeneracy checks (a run that does not learn proves nothing about routing)."""
    words = []
    for method, runs in results.items():
        gains = per_seed(runs, REWARD, "gain")
        if not gains:
            words.append(f"- {method}: reward gain n/a (needs {2 * GAIN_TAIL} iterations or more)")
            continue
        gain = mean_ci(gains)
        side = ("rises (95% interval excludes 0)" if gain.excludes(0.0) and gain.mean > 0 else
                "falls (95% interval excludes 0)" if gain.excludes(0.0) else
                "no change distinguishable from 0 at 95%")
        words.append(f"- {method}: reward gain {gain.text(3)} -> {side}")
    header = ["method", "seed", f"reward, first {GAIN_TAIL}", f"reward, last {GAIN_TAIL}", "gain",
              "eval before -> after", "zero-adv groups", "zero-grad mini-steps",
              "policy grad norm", "verdict"]
    rows = []
    for method, runs in results.items():
        for seed, records in sorted(runs.items()):
            reasons = degeneracy(records)
            rows.append([method, str(seed), _value_text(reduce_run(records, REWARD, "head")),
                         _value_text(reduce_run(records, REWARD, "tail")),
                         _value_text(reduce_run(records, REWARD, "gain")),
                         f"{_value_text(reduce_run(records, EVAL, 'first'))} -> "
                         f"{_value_text(reduce_run(records, EVAL, 'final'))}",
                         _value_text(reduce_run(records, ZERO_ADV, "mean"), 2),
                         _value_text(reduce_run(records, ZERO_GRAD, "mean"), 2),
                         _value_text(reduce_run(records, POLICY_GRAD, "mean"), 4),
                         "DEGENERATE: " + "; ".join(reasons) if reasons else "learns"])
    degenerate = sum(row[-1] != "learns" for row in rows)
    verdict_line = (f"**{degenerate} of {len(rows)} runs are degenerate**: method comparisons "
                    "that use them are marked below and prove little." if degenerate else
                    f"No run is degenerate (each: <= {100 * MAX_ZERO_GRAD_FRAC:.0f}% mini-steps "
                    f"without policy gradient, <= {100 * MAX_ZERO_ADV_FRAC:.0f}% equal-reward "
                    f"groups, reward not collapsed).")
    return [*words, "", verdict_line, "", _md_table(header, rows)]


def paired_section(results) -> list[str]:
    """Paired differences against R2 (same seeds), each with a verdict in words."""
    if BASELINE not in results:
        return ["(no r2 run: no paired differences)"]
    header = ["method"] + [f"{what}: method - r2" for what, *_ in PAIRED]
    rows, words = [], []
    degenerate = degenerate_methods(results)
    for method, runs in results.items():
        if method == BASELINE:
            continue
        cells = [method]
        for what, key, how, transform, lower_better in PAIRED:
            mine, base = per_seed(runs, key, how), per_seed(results[BASELINE], key, how)
            if mine is None or base is None:
                cells.append("n/a")
                continue
            if transform:
                mine, base = [transform(v) for v in mine], [transform(v) for v in base]
            diff = paired_difference(mine, base)
            r2_mean = sum(base) / len(base)
            relative = f" ({100 * diff.mean / r2_mean:+.0f}%)" if r2_mean else ""
            cells.append(diff.text() + relative)
            caveat = (" [from degenerate runs]" if degenerate & {method, BASELINE} else "")
            words.append(f"- {method} vs r2, {what}: {diff.text()}{relative} -> "
                         f"{verdict(diff, higher_is_better=not lower_better)}{caveat}")
        rows.append(cells)
    return [_md_table(header, rows), "", *words]


def ratio_section(results) -> list[str]:
    replay, live = REPLAY_VS_LIVE
    if replay not in results or live not in results:
        return ["(needs r3 and none runs)"]
    lines = []
    for label, how in (("mean", "mean"), ("median", "median")):
        r3 = per_seed(results[replay], "mismatch/k3_kl", how)
        none = per_seed(results[live], "mismatch/k3_kl", how)
        ratio = ratio_interval(r3, none) if r3 and none else None
        if ratio is None:
            lines.append(f"- R3 / none train/rollout k3 KL ({label}): n/a")
            continue
        value, low, high = ratio
        degenerate = degenerate_methods(results) & set(REPLAY_VS_LIVE)
        caveat = " [from degenerate runs]" if degenerate else ""
        side = ("R3 lower, distinguishable at 95%" if high < 1 else
                "R3 higher, distinguishable at 95%" if low > 1 else "not distinguishable at 95%")
        lines.append(f"- R3 / none train/rollout k3 KL ({label} over iterations): {value:.3f} "
                     f"(95% CI {low:.3f} .. {high:.3f}; none/R3 = {1 / value:.2f}x): {side}"
                     f"{caveat}")
    return lines


def drift_section(results) -> list[str]:
    header = ["method"] + [f"{name} (mini-steps >= 2)" for name in DRIFT_COLUMNS]
    rows, layer_rows = [], []
    for method, runs in results.items():
        cells = [method]
        for name in DRIFT_COLUMNS:
            values = per_seed(runs, f"drift/{name}/ministeps_ge2", "mean")
            cells.append(mean_ci(values).text() if values else "n/a")
        if any(c != "n/a" for c in cells[1:]):
            rows.append(cells)
        per_layer = _layer_drift(runs, "input_share")
        if per_layer:
            layer_rows.append([method] + [f"L{layer}: {iv.text(2)}"
                                          for layer, iv in per_layer.items()])
    lines = [_md_table(header, rows) if rows else "(no drift attribution recorded)"]
    if layer_rows:
        lines += ["", "Share explained by the router input, per layer (mini-steps >= 2):", ""]
        lines += [f"- {row[0]}: " + ", ".join(row[1:]) for row in layer_rows]
    return lines


def update_section(results) -> list[str]:
    """How far the weights followed Adam's predicted next step ``u`` during the mini-steps."""
    header = ["method"] + [title for title, _ in UPDATE_COLUMNS]
    rows = []
    for method, runs in results.items():
        cells = [method]
        for _, key in UPDATE_COLUMNS:
            values = per_seed(runs, key, "mean")
            cells.append(mean_ci(values).text(3) if values else "n/a")
        rows.append(cells)
    return [_md_table(header, rows)]


def costs_table(results, timings: dict) -> str:
    header = ["method", "s / iteration", "relative to r2", "CPU s / run (process time)"]
    base = (per_seed(results[BASELINE], "time/iteration_s", "mean")
            if BASELINE in results else None)
    rows = []
    for method, runs in results.items():
        values = per_seed(runs, "time/iteration_s", "mean")
        if not values:
            continue
        ratio = ratio_interval(values, base) if base else None
        cpu = [c for (m, _), (_, c) in sorted(timings.items()) if m == method]
        rows.append([method, mean_ci(values).text(2),
                     f"{ratio[0]:.2f}x ({ratio[1]:.2f} .. {ratio[2]:.2f})" if ratio else "n/a",
                     mean_ci(cpu).text(1) if cpu else "n/a"])
    return _md_table(header, rows)


def summarise(results: dict[str, dict[int, list[dict]]], out_dir: str, args,
              timings: dict | None = None) -> str:
    """Write summary.md, summary.csv and costs.md; return summary.md's text."""
    table, csv_rows = main_table(results)
    seeds = sorted(next(iter(results.values())))
    text = "\n".join([
        f"# Routing methods on the embedded {args.model} (CPU), seeds {seeds}",
        "",
        (f"Each cell: mean ± 95% t-interval over {len(seeds)} seeds of the per-run value "
         f"({args.iterations} RL iterations of {args.prompts} prompts x {args.group_size} "
         f"samples, {'partial-credit' if args.partial_credit else 'exact-match'} reward, "
         f"{args.warmup_steps} warm-up steps, off-policy window {args.off_policy_window}, "
         f"lr {args.lr:g}, lookahead scale {args.lookahead_scale:g})."),
        "", table, "",
        "## Does RL learn? (reward gain per method; degeneracy per run)", "",
        *learning_section(results), "",
        "## Paired differences against R2 (same seeds)", "", *paired_section(results), "",
        "## R3 vs none: train/rollout KL ratio", "", *ratio_section(results), "",
        "## Adam-momentum extrapolation under live gradients (what lookahead assumes: "
        "theta_k ~ theta_0 + k u)", "", *update_section(results), "",
        "## Drift attribution (route deviation of the stale route TopK(h_old W_old^T))", "",
        *drift_section(results), "",
    ])
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method"] + [f"{t} {part}" for t, _, _ in TABLE_COLUMNS
                                      for part in ("mean", "ci95")])
        writer.writerows(csv_rows)
    with open(os.path.join(out_dir, "costs.md"), "w", encoding="utf-8") as handle:
        handle.write("# Seconds per RL iteration (wall time; depends on machine load)\n\n"
                     + costs_table(results, timings or {}) + "\n")
    return text


# ----------------------------------------------------------------------------------- plots
def _band(runs: dict[int, list[dict]], key: str):
    """Per iteration: (step, mean, low, high) over the seeds that logged ``key``."""
    by_step: dict[int, list[float]] = {}
    for records in runs.values():
        for record in records:
            if key in record and math.isfinite(record[key]):
                by_step.setdefault(record["step"], []).append(record[key])
    points = []
    for step, values in sorted(by_step.items()):
        interval = mean_ci(values)
        half = 0.0 if math.isnan(interval.half_width) else interval.half_width
        points.append((step, interval.mean, interval.mean - half, interval.mean + half))
    return points


def plot(results, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(PLOTS) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4 * rows))
    for axis, (key, title) in zip(axes.flat, PLOTS):
        for index, (method, runs) in enumerate(results.items()):
            points = _band(runs, key)
            if points:  # one colour per method in every panel
                steps, mean, low, high = zip(*points)
                axis.plot(steps, mean, marker="o", markersize=3, label=method, color=f"C{index}")
                axis.fill_between(steps, low, high, alpha=0.15, color=f"C{index}")
        axis.set_title(title)
        axis.set_xlabel("RL iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle("mean over seeds, band: 95% t-interval")
    fig.tight_layout()
    path = os.path.join(out_dir, "comparison.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_pr2.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/cpu_compare")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seeds", type=int, default=5,
                        help="RL runs per method, seeds --seed, --seed+1, ... (>= 2 for intervals)")
    parser.add_argument("--seed", type=int, default=1234, help="first seed (and the warm-up's)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded preset or HF config")
    parser.add_argument("--iterations", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=12, help="prompts per rollout batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--off-policy-window", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=64,
                        help="greedy evaluation prompts after the last iteration")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-warmup-iters", type=int, default=0,
                        help="optimizer steps of linear LR warm-up from 0 at the start of RL")
    parser.add_argument("--lookahead-scale", type=float, default=0.75)
    parser.add_argument("--predictor-lr-mult", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--partial-credit", action=argparse.BooleanOptionalAction, default=True,
                        help="digit reward: share of matching answer positions (else exact match)")
    parser.add_argument("--task-stratified", action=argparse.BooleanOptionalAction, default=False,
                        help="consecutive problems cycle through every operation x length "
                             "(12 with the default lengths), so such batches differ only in "
                             "their digits")
    parser.add_argument("--task-min-len", type=int, default=3, help="shortest digit string")
    parser.add_argument("--task-max-len", type=int, default=6, help="longest digit string")
    parser.add_argument("--async-rollout", action="store_true",
                        help="every run generates its next batch while the current one trains "
                             "(docs/async_rollout.md); compare two output directories with "
                             "tools/async_vs_sync.py")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1 is fastest for the tiny default model)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time, each in its own process (default: 2 cores)")
    describe_flags(parser, COMPARE_HELP)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a fault (also: MEGATRON_PR2_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.off_policy_window < 1:
        parser.error("--off-policy-window must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1 (>= 2 for confidence intervals)")
    return args


def _log_progress(run: tuple[str, int], done: int, total: int, started: float) -> None:
    """One line per finished run: runs done / total and the time left at the pace so far."""
    elapsed = time.perf_counter() - started
    logger.info("run %d/%d done (%s, seed %d); %s elapsed, about %s left", done, total, *run,
                describe_seconds(elapsed), describe_seconds(seconds_left(done, total, elapsed)))


def main(argv=None) -> int:
    """Run the comparison; exit status 0, 2 for bad input, 1 for a run-time fault, 130 for
    Ctrl-C (one ``error:`` line each; the traceback only with ``--debug``)."""
    configure_logging()
    args = parse_args(argv)
    debug = args.debug or debug_requested([])
    code = run_reporting(lambda: check_args(args), bad_input=BAD_INPUT, debug=debug)
    if code:
        return code
    with helpers_tied_to_this_process():
        return run_reporting(lambda: compare(args), faults=RUN_FAULTS, debug=debug)


def check_args(args) -> None:
    """Every method's config, checked before any run starts (``ValueError`` names the flag)."""
    from megatron_pr2.preflight.checks import check_model_settings
    from megatron_pr2.preflight.inputs import check_inputs

    for method in _methods(args):
        cfg = base_config(args, args.seed)
        cfg.algo.routing_method = method
        cfg.validate()
    check_inputs(cfg)
    check_model_settings(cfg, world_size=1)
    os.makedirs(args.out, exist_ok=True)


def _methods(args) -> list[str]:
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def compare(args) -> int:
    """Warm start, the runs (``--jobs`` at a time, each in its own process), the summary."""
    started = time.perf_counter()
    methods = _methods(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    results, timings = {method: {} for method in methods}, {}
    # every run in its own process (Megatron's state is per process), --jobs at a time
    context = torch.multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context,
                                                max_tasks_per_child=1) as pool:
        warm, warm_cpu = pool.submit(warm_start_worker, args, args.out).result()
    runs = [(method, seed) for seed in seeds for method in methods]
    finished = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context,
                                                max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_method, args, method, seed, warm, args.out): (method, seed)
                   for method, seed in runs}
        runs_started = time.perf_counter()
        for future in concurrent.futures.as_completed(futures):
            finished[futures[future]] = future.result()
            _log_progress(futures[future], len(finished), len(runs), runs_started)
    for method, seed in runs:  # in submission order, whatever order they finished in
        records, wall, cpu = finished[(method, seed)]
        results[method][seed] = records
        timings[(method, seed)] = (wall, cpu)
    text = summarise(results, args.out, args, timings)
    image = plot(results, args.out)
    print(text)
    with open(os.path.join(args.out, "costs.md"), encoding="utf-8") as handle:
        print(handle.read())
    print(f"wrote {os.path.join(args.out, 'summary.md')}, summary.csv, costs.md, {image}, "
          f"TensorBoard logs in {os.path.join(args.out, 'tensorboard')} "
          f"({time.perf_counter() - started:.0f} s in all; CPU: warm-up {warm_cpu:.0f} s, runs "
          f"{sum(c for _, c in timings.values()):.0f} s over --jobs {args.jobs}; load average "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
