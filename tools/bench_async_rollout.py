"""Seconds per RL iteration, synchronous vs asynchronous rollout, against a CPU SGLang server.

One SGLang server (its venv from ``tools/sglang_env.sh``) serves the tiny embedded model; the
trainer runs the same RL job twice against it, ``--async-rollout`` off and on, one run after the
other, and the benchmark prints the mean seconds per iteration of each (iterations 2.. : the
first has nothing to overlap), their ratio, and how much of each iteration the trainer spent
waiting for its batch.

    python tools/bench_async_rollout.py                      # r3, 6 iterations
    python tools/bench_async_rollout.py --method r2 --iterations 8 --max-new-tokens 24

Rollout and training get separate devices on a GPU cluster; here they get separate cores: the
server runs on core 0 and the trainer on core 1 (``--cores split``, the default on a machine
with 2 or more cores). ``--cores shared`` lets both use every core: on a 2-core machine the
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


def serve(root: str, cores: set[int] | None):
    """A started SGLang server on a random-weight checkpoint of the tiny preset, on ``cores``
    (None: every core)."""
    from megatron_pr2.convert.random_init import save_random_hf_checkpoint
    from megatron_pr2.models.presets import preset
    from megatron_pr2.rollout.sglang_server import SGLangServer, sglang_venv_ready

    if not sglang_venv_ready():
        raise SystemExit("no SGLang venv: run `bash tools/sglang_env.sh` (or "
                         "`bash tools/setup_env.sh --with-sglang`) first")
    path = os.path.join(root, "served")
    save_random_hf_checkpoint(preset("tiny-qwen3-moe"), path, seed=0)
    print("starting the SGLang CPU server (about a minute) ...", flush=True)
    server = SGLangServer(path, startup_timeout=900, max_lifetime=3600)
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


def train(args, address: str, jsonl: str, asynchronous: bool,
          cores: set[int] | None) -> list[dict]:
    command = [sys.executable, "-m", "megatron_pr2.train", "--device", "cpu",
               "--routing-method", args.method, "--rollout-engine", "sglang",
               "--sglang-urls", address, "--train-iters", str(args.iterations),
               "--rollout-batch-prompts", str(args.prompts), "--n-samples-per-prompt", "4",
               "--off-policy-window", "2", "--micro-batch-size", "4",
               "--max-new-tokens", str(args.max_new_tokens), "--lr", "1e-4",
               "--warmup-sft-steps", str(args.warmup_steps), "--partial-credit",
               "--seed", str(args.seed), "--log-jsonl", jsonl,
               *(["--async-rollout"] if asynchronous else [])]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = str(args.threads)
    label = "async" if asynchronous else "sync"
    print(f"{label}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3600, preexec_fn=(lambda: os.sched_setaffinity(0, cores))
                          if cores is not None else None)
    if done.returncode:
        raise SystemExit(f"the {label} run failed:\n{done.stderr[-3000:]}")
    print(f"{label}: {time.perf_counter() - started:.0f} s in all", flush=True)
    with open(jsonl, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summary(records: list[dict]) -> dict[str, float]:
    steady = records[1:]  # the first iteration has no batch generated ahead
    iteration = sum(r["time/iteration_s"] for r in steady) / len(steady)
    rollout = sum(r["time/rollout_end_s"] - r["time/rollout_start_s"] for r in steady) / len(steady)
    train_s = sum(r["time/train_end_s"] - r["time/train_start_s"] for r in steady) / len(steady)
    return {"iteration": iteration, "rollout": rollout, "train": train_s,
            "lag": sum(r["rollout/weight_version_lag"] for r in steady) / len(steady),
            "reward": sum(r["rollout/reward_mean"] for r in records) / len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="r3")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=40, help="SFT steps before RL")
    parser.add_argument("--threads", type=int, default=1, help="trainer torch threads")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--cores", choices=("split", "shared"),
                        default="split" if len(os.sched_getaffinity(0)) >= 2 else "shared",
                        help="split: the server on core 0, the trainer on core 1")
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first iteration has nothing to overlap)")
    available = sorted(os.sched_getaffinity(0))
    server_cores, trainer_cores = (({available[0]}, {available[1]}) if args.cores == "split"
                                   else (None, None))
    with tempfile.TemporaryDirectory() as root:
        server = serve(root, server_cores)
        try:
            runs = {label: summary(train(args, server.address, os.path.join(root, f"{label}.jsonl"),
                                         label == "async", trainer_cores))
                    for label in ("sync", "async")}
        finally:
            server.stop()
    print(f"\n{args.method}, {args.iterations} iterations, {args.prompts} prompts x 4 samples, "
          f"{args.max_new_tokens} new tokens, one CPU SGLang server, cores {args.cores} "
          "(iterations 2..):")
    print(f"{'loop':6} {'s/iteration':>12} {'rollout s':>10} {'train s':>8} {'lag':>5} "
          f"{'reward':>7}")
    for label, row in runs.items():
        print(f"{label:6} {row['iteration']:12.2f} {row['rollout']:10.2f} {row['train']:8.2f} "
              f"{row['lag']:5.2f} {row['reward']:7.3f}")
    print(f"async / sync seconds per iteration: "
          f"{runs['async']['iteration'] / runs['sync']['iteration']:.2f}")


if __name__ == "__main__":
    main()
