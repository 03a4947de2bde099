"""Synchronous vs asynchronous rollout against a CPU SGLang server: seconds per iteration and the
comparison metrics.

One SGLang server (its venv from ``tools/sglang_env.sh``) serves the model. For every method and
seed the trainer runs the same RL job against it twice, ``--async-rollout`` off and then on.
The benchmark prints:

- per mode, the mean seconds per iteration (iterations 2..: the first has nothing to overlap),
  the rollout and training seconds, and the async / sync ratio;
- the paired differences async - sync of reward, train/rollout KL and route deviation over
  the seeds (the table of ``tools/async_vs_sync.py``).

    python tools/bench_async_rollout.py                       # r3, seed 3, 6 iterations
    python tools/bench_async_rollout.py --methods r2,r3 --seeds 3 --iterations 16 \\
        --model tiny-qwen3-moe-fg --prompts 12 --load outputs/cpu_compare/warmstart

With ``--load`` (e.g. the warm start a ``compare`` run saved) the runs start from those weights
instead of a short SFT warm-up. The server starts from random weights either way: the trainer's
first weight sync replaces them.

Rollout and training get separate devices on a GPU cluster. Here they get separate cores: the
server runs on core 0 and the trainer on core 1 (``--cores split``, the default on a machine
with 2 or more cores). ``--cores shared`` lets both use every core. On a 2-core machine the
overlapped rollout then slows down by as much as it overlaps, so that ratio says little.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MODES = ("sync", "async")


def serve(root: str, model: str, cores: set[int] | None):
    """A started SGLang server on a random-weight checkpoint of ``model``, on ``cores``
    (None: every core)."""
    from megatron_pr2.convert.random_init import save_random_hf_checkpoint
    from megatron_pr2.models.hf_config import resolve_hf_config
    from megatron_pr2.rollout.sglang_server import SGLangServer, sglang_venv_ready

    if not sglang_venv_ready():
        raise SystemExit("no SGLang venv: run `bash tools/sglang_env.sh` (or "
                         "`bash tools/setup_env.sh --with-sglang`) first")
    path = os.path.join(root, "served")
    save_random_hf_checkpoint(resolve_hf_config(model), path, seed=0)
    print("starting the SGLang CPU server (about a minute) ...", flush=True)
    server = SGLangServer(path, startup_timeout=900, max_lifetime=7200)
    everything = os.sched_getaffinity(0)
    threads = os.environ.get("OMP_NUM_THREADS")
    if cores is not None:  # the server's processes inherit the affinity and thread count
        os.sched_setaffinity(0, cores)
        os.environ["OMP_NUM_THREADS"] = str(len(cores))
    try:
        server.launch()
    finally:
        os.sched_setaffinity(0, everything)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return server.wait_ready()


def train_command(args, method: str, seed: int, address: str, jsonl: str,
                  asynchronous: bool) -> list[str]:
    start = (["--load", args.load] if args.load
             else ["--warmup-sft-steps", str(args.warmup_steps)])
    return [sys.executable, "-m", "megatron_pr2.train", "--device", "cpu",
            "--hf-config", args.model, "--routing-method", method,
            "--rollout-engine", "sglang", "--sglang-urls", address,
            "--train-iters", str(args.iterations), "--rollout-batch-prompts", str(args.prompts),
            "--n-samples-per-prompt", "4", "--off-policy-window", "4", "--micro-batch-size", "4",
            "--max-new-tokens", str(args.max_new_tokens), "--lr", "1e-4", "--partial-credit",
            *start, "--seed", str(seed), "--log-jsonl", jsonl,
            *(["--async-rollout"] if asynchronous else [])]


def train(command: list[str], jsonl: str, label: str, threads: int,
          cores: set[int] | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3600, check=False,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores))
                          if cores is not None else None)
    if done.returncode:
        raise SystemExit(f"the {label} run failed:\n{' '.join(command)}\n{done.stderr[-3000:]}")
    print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)
    with open(jsonl, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def timing(records: list[dict]) -> dict[str, float]:
    steady = [r for r in records if r.get("step", 0) >= 2]  # nothing overlaps iteration 1

    def mean(values):
        return sum(values) / len(values)

    return {"iteration": mean([r["time/iteration_s"] for r in steady]),
            "rollout": mean([r["time/rollout_end_s"] - r["time/rollout_start_s"] for r in steady]),
            "train": mean([r["time/train_end_s"] - r["time/train_start_s"] for r in steady])}


def print_timing(runs: dict[str, list[dict]]) -> None:
    rows = {mode: [timing(records) for records in runs[mode]] for mode in MODES}
    print(f"\n{'loop':6} {'s/iteration':>12} {'rollout s':>10} {'train s':>8}")
    means = {}
    for mode in MODES:
        means[mode] = {k: sum(r[k] for r in rows[mode]) / len(rows[mode]) for k in rows[mode][0]}
        print(f"{mode:6} {means[mode]['iteration']:12.2f} {means[mode]['rollout']:10.2f} "
              f"{means[mode]['train']:8.2f}")
    print(f"async / sync seconds per iteration: "
          f"{means['async']['iteration'] / means['sync']['iteration']:.2f}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="r3", help="comma-separated routing methods")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method and mode")
    parser.add_argument("--seed", type=int, default=3, help="first seed")
    parser.add_argument("--model", default="tiny-qwen3-moe", help="embedded preset or HF config")
    parser.add_argument("--load", help="Megatron checkpoint to start every run from")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=40,
                        help="SFT steps before RL (without --load)")
    parser.add_argument("--threads", type=int, default=1, help="trainer torch threads")
    parser.add_argument("--cores", choices=("split", "shared"),
                        default="split" if len(os.sched_getaffinity(0)) >= 2 else "shared",
                        help="split: the server on core 0, the trainer on core 1")
    parser.add_argument("--out", help="keep the JSONL metrics here (MODE/metrics/METHOD/"
                        "seedS.jsonl, as compare writes them); default: a temporary directory")
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first iteration has nothing to overlap)")
    return args


def main() -> None:
    args = parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [args.seed + i for i in range(args.seeds)]
    available = sorted(os.sched_getaffinity(0))
    server_cores, trainer_cores = (({available[0]}, {available[1]}) if args.cores == "split"
                                   else (None, None))
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        server = serve(scratch, args.model, server_cores)
        try:
            for method in methods:
                for seed in seeds:
                    for mode in MODES:
                        jsonl = os.path.join(out, mode, "metrics", method, f"seed{seed}.jsonl")
                        os.makedirs(os.path.dirname(jsonl), exist_ok=True)
                        command = train_command(args, method, seed, server.address, jsonl,
                                                mode == "async")
                        runs[mode].append(train(command, jsonl, f"{method} seed {seed} {mode}",
                                                args.threads, trainer_cores))
        finally:
            server.stop()
        print(f"\n{', '.join(methods)}; seeds {seeds}; {args.iterations} iterations of "
              f"{args.prompts} prompts x 4 samples, {args.max_new_tokens} new tokens; one CPU "
              f"SGLang server; cores {args.cores} (iterations 2..):")
        print_timing(runs)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import async_vs_sync  # tools/async_vs_sync.py

        table = async_vs_sync.rows(async_vs_sync.load(os.path.join(out, "sync")),
                                   async_vs_sync.load(os.path.join(out, "async")))
        print()
        async_vs_sync.print_table(table)


if __name__ == "__main__":
    main()
