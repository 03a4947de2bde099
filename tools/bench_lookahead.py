#!/usr/bin/env python
"""Compute and memory cost of lookahead routing and current-route replay against R2.

On one rollout batch of the embedded default (in-process engine), in one process, with the
variants alternated (machine-load drift hits all alike), median of ``--repeats``:

- r2: the old-log-prob pass (record) + the N training mini-steps (replay);
- pr2-lookahead: its old-log-prob pass (record mini-batch 1, N-1 shifted no-grad forwards, the
  replayed pass at theta_0) + the same mini-steps;
- current-route: R2's old pass + per mini-step m >= 2 a record pass and a frozen-weight replay
  pass + the mini-steps.

Memory: the bytes of the parameter copies each keeps (deterministic). ``--nproc 2`` runs data
parallel on 2 gloo processes (``--use-distributed-optimizer``: each rank shifts its slice and
the parameter buffer is all-gathered), ``--bf16`` trains in bf16; the time of one lookahead
shift + restore without a forward is printed too. Not part of CI.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_lookahead.py --repeats 5
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_lookahead.py --nproc 2 --use-distributed-optimizer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen3-moe-fg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--off-policy-window", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=1, help="data-parallel gloo processes")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.nproc == 1:
        return _bench(0, args)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WORLD_SIZE=str(args.nproc))
    mp.spawn(_spawned, args=(args,), nprocs=args.nproc)
    return 0


def _spawned(rank: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    _bench(rank, args)


def _time_shift(lookahead, repeats: int) -> float:
    """Median seconds of one shift + restore (all-gathers included) without a forward."""
    import time

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with lookahead.shifted(0.75):
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _bench(rank: int, args) -> int:
    import torch

    from megatron_pr2.config import RunConfig
    from megatron_pr2.rl.advantages import grpo_advantages
    from megatron_pr2.routing.methods import routing_method
    from megatron_pr2.routing.strategies.current_route import FrozenWeights
    from megatron_pr2.routing.strategies.lookahead import WeightLookahead
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.loop import RLLoop
    from megatron_pr2.training.rollout_source import (
        RolloutSource,
        make_engine,
        make_prompts,
    )

    torch.set_num_threads(1)
    cfg = RunConfig()
    cfg.train.bf16 = args.bf16
    cfg.train.use_distributed_optimizer = args.use_distributed_optimizer
    cfg.model.hf_config = args.model
    cfg.algo.off_policy_window = args.off_policy_window
    cfg.algo.lookahead_scale = 0.75
    cfg.algo.drift_attribution_tokens = 0
    cfg.rollout.rollout_batch_prompts = args.prompts
    cfg.rollout.n_samples_per_prompt = args.group_size
    parts = build_components(cfg.validate())
    loop = RLLoop(parts, RolloutSource(cfg, make_engine(cfg, parts.hf_config), make_prompts(cfg)))
    samples, _ = loop.source.collect(1)
    advantages = grpo_advantages(torch.randn(len(samples)), cfg.rollout.n_samples_per_prompt)
    microbatches = loop._microbatches(samples, advantages)
    actor, window = parts.actor, args.off_policy_window
    per_step = len(microbatches) // window

    def run_method(name):
        """The method's old-log-prob pass and mini-steps, as the loop runs them."""
        method = routing_method(name)
        old = method.old_logprob_pass(actor, microbatches, None, cfg.algo)
        plan_of = method.ministep_plans(actor, old, None)
        for m in range(window):
            chunk = microbatches[m * per_step:(m + 1) * per_step]
            actor.train_ministep(chunk, plan_of(m, chunk), method.ministep_mode,
                                 train_predictor=False)

    names = ("r2", "pr2-lookahead", "current-route")
    variants = {name: (lambda name=name: run_method(name)) for name in names}
    run_method("r2")  # Adam state for the lookahead, and warm caches
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["r2"])
    params = sum(p.numel() * p.element_size() for c in parts.model for p in c.parameters())
    lookahead_weights = WeightLookahead(parts.optimizer)
    copies = {"r2": 0, "pr2-lookahead": lookahead_weights.saved_bytes(),
              "current-route": 2 * FrozenWeights(parts.model).nbytes()}
    shift = _time_shift(lookahead_weights, args.repeats)
    actor.controller.close()
    if rank:
        return 0
    precision = ("bf16" if args.bf16 else "fp32") + (
        ", distributed optimizer" if args.use_distributed_optimizer else "")
    updated = sum(s.model_param.numel() for s in lookahead_weights.states)
    count = sum(p.numel() for c in parts.model for p in c.parameters())
    print(f"{args.model}, {args.nproc} data-parallel process(es), {precision}, "
          f"{len(microbatches)} micro-batches per rank, off-policy window {window}, "
          f"{args.repeats} repeats, load average {os.getloadavg()[0]:.1f}")
    print(f"lookahead shift + restore without a forward: {shift * 1e3:.1f} ms (median); rank 0 "
          f"shifts {updated / 1e6:.2f}M of its {count / 1e6:.2f}M "
          "weights")
    print("| variant | old pass + mini-steps (s, median) | relative to r2 | weight copies (MB) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {copies[name] / 1e6:.2f} "
              f"({copies[name] / params:.2f}x the weights) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
