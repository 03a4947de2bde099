#!/usr/bin/env python
"""Compute and memory cost of lookahead routing and current-route replay against R2.

On one rollout batch of the embedded default (in-process engine), in one process, with the
variants alternated (machine-load drift hits all alike), median of ``--repeats``:

- r2: the old-log-prob pass (record) + the N training mini-steps (replay);
- pr2-lookahead: its old-log-prob pass (record mini-batch 1, N-1 shifted no-grad forwards, the
  replayed pass at theta_0) + the same mini-steps;
- current-route: R2's old pass + per mini-step m >= 2 a record pass and a frozen-weight replay
  pass + the mini-steps.

Memory: the bytes of the parameter copies each keeps (deterministic). Not part of CI.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_lookahead.py --repeats 5
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from megatron_pr2.config import RunConfig
    from megatron_pr2.rl.advantages import grpo_advantages
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.current_route import CurrentRouteReplay, FrozenWeights
    from megatron_pr2.training.lookahead import WeightLookahead, lookahead_old_pass
    from megatron_pr2.training.loop import RLLoop
    from megatron_pr2.training.rollout_source import (
        RolloutSource,
        make_engine,
        make_prompts,
    )

    args = _parse_args(argv)
    torch.set_num_threads(1)
    cfg = RunConfig()
    cfg.model.hf_config = args.model
    cfg.algo.off_policy_window = args.off_policy_window
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

    def ministeps(plan_of):
        for m in range(window):
            chunk = microbatches[m * per_step:(m + 1) * per_step]
            actor.train_ministep(chunk, plan_of(m, chunk), "replay", train_predictor=False)

    def r2():
        old = actor.logprob_pass(microbatches, "record")
        ministeps(lambda m, chunk: old.routing.routes.select([mb.microbatch_id for mb in chunk]))

    def lookahead():
        old = lookahead_old_pass(actor, microbatches, window, 0.75)
        ministeps(lambda m, chunk: old.routing.routes.select([mb.microbatch_id for mb in chunk]))

    def current_route():
        old = actor.logprob_pass(microbatches, "record")
        replay = CurrentRouteReplay(actor, old.routing.routes)
        ministeps(replay.ministep_plan)

    variants = {"r2": r2, "pr2-lookahead": lookahead, "current-route": current_route}
    r2()  # Adam state for the lookahead, and warm caches
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["r2"])
    params = sum(p.numel() * p.element_size() for c in parts.model for p in c.parameters())
    copies = {"r2": 0, "pr2-lookahead": WeightLookahead(parts.optimizer).saved_bytes(),
              "current-route": 2 * FrozenWeights(parts.model).nbytes()}
    print(f"{args.model}, {len(microbatches)} micro-batches, off-policy window {window}, "
          f"{args.repeats} repeats, load average {os.getloadavg()[0]:.1f}")
    print("| variant | old pass + mini-steps (s, median) | relative to r2 | weight copies (MB) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {copies[name] / 1e6:.2f} "
              f"({copies[name] / params:.0f}x the weights) |")
    actor.controller.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
