#!/usr/bin/env python
"""Step time and peak memory of PR2 routing vs. live routing, on the same model and batch.

One "step" is what an RL iteration does per rollout batch with one mini-step: an old-log-prob
pass (forward only) over every micro-batch, then a training forward + backward over every
micro-batch.

- live: Megatron-Core's own ``TopKRouter``, live routing in both passes;
- pr2: ``PR2Router``, a predict pass (``TopK(p + h W_p)``, recording routes and ``h, p``) and a
  replayed training pass with the predictor loss on (the mini-step >= 2 case, the costliest).

Each variant runs in its own process (same seed, same weights, same tokens). Memory is the
process's peak resident set above its level right after building the model and the batch
(CPU), or ``torch.cuda.max_memory_allocated`` above the post-build allocation (GPU). Also
reported: the bytes PR2 keeps between passes (routes and predictor inputs). Not part of CI.

    .venv/bin/python tools/bench_router.py
    .venv/bin/python tools/bench_router.py --hidden-size 512 --seq-length 1024 --steps 5
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("bench_router")


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-qwen3-moe")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--sample-ratio", type=float, default=1.0,
                        help="predictor token-subsampling ratio")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def _hf_config(args) -> dict:
    from megatron_pr2.models.presets import preset

    heads = max(1, args.hidden_size // 64)
    return preset(args.preset, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                  num_experts=args.num_experts, num_experts_per_tok=args.top_k,
                  num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
                  intermediate_size=2 * args.hidden_size,
                  moe_intermediate_size=args.hidden_size // 2,
                  max_position_embeddings=max(256, args.seq_length), vocab_size=1024)


def _memory_now(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _stored_bytes(routers) -> int:
    total = 0
    for router in routers:
        state = router.replay_state
        for sample in state.predictor_samples.values():
            total += sum(t.numel() * t.element_size()
                         for t in (sample.token_rows, sample.hidden_TH, sample.logits_TE))
    return total


def _measure(variant: str, args) -> dict:
    """Build the model and time ``args.steps`` steps of ``variant`` in this process."""
    import torch

    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel
    from megatron_pr2.routing.controller import RoutingController
    from megatron_pr2.routing.predictor import PredictorConfig
    from megatron_pr2.routing.router import PR2Router

    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_model_parallel(ParallelConfig(), seed=1234, device=args.device)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    options = ModelOptions(router_class=PR2Router) if variant == "pr2" else ModelOptions()
    _, _, model = build_model(_hf_config(args), options=options)
    model = model.to(device)
    gen = torch.Generator().manual_seed(0)
    s, b = args.seq_length, args.micro_batch_size
    batches = [torch.randint(0, 1024, (b, s + 1), generator=gen).to(device)
               for _ in range(args.num_microbatches)]
    positions = torch.arange(s, device=device).expand(b, -1)
    controller = None
    if variant == "pr2":
        controller = RoutingController(model, PredictorConfig(sample_ratio=args.sample_ratio))

    def forward(mb, tokens):
        if controller is not None:
            controller.set_microbatch(mb)
        return model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

    def step():
        if controller is not None:
            controller.begin_step("predict")
        with torch.no_grad():
            for mb, tokens in enumerate(batches):
                forward(mb, tokens)
        plan = controller.end_step().routes if controller is not None else None
        if controller is not None:
            controller.begin_step("replay", plan=plan, train_predictor=True)
        for mb, tokens in enumerate(batches):
            torch.autograd.backward(forward(mb, tokens).float().mean())
        if controller is not None:
            controller.end_step()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _memory_now(cuda)
    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    stored = _stored_bytes(controller.routers) if controller is not None else 0
    return {"variant": variant, "step_s": statistics.median(times),
            "peak_mb": _memory_now(cuda) - base, "stored_mb": stored / 2**20,
            "memory": "cuda allocated" if cuda else "peak RSS"}


def _run_isolated(variant: str, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (variant, args))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    results = {}
    for variant in ("live", "pr2"):
        logger.info("measuring %s ...", variant)
        results[variant] = _run_isolated(variant, args)
    live, pr2 = results["live"], results["pr2"]
    print(f"model: hidden {args.hidden_size}, {args.num_layers} MoE layers, {args.num_experts} "
          f"experts, top-{args.top_k}; batch {args.num_microbatches} x {args.micro_batch_size} x "
          f"{args.seq_length} tokens; predictor sample ratio {args.sample_ratio}")
    print(f"{'variant':8s} {'step time (s)':>14s} {'peak mem above build (MiB)':>28s} "
          f"{'PR2 stored (MiB)':>17s}")
    for r in (live, pr2):
        print(f"{r['variant']:8s} {r['step_s']:14.3f} {r['peak_mb']:28.1f} {r['stored_mb']:17.2f}")
    mem_ratio = pr2["peak_mb"] / live["peak_mb"] if live["peak_mb"] > 0 else float("nan")
    print(f"ratio pr2/live: step time {pr2['step_s'] / live['step_s']:.3f}, "
          f"peak memory ({live['memory']}) {mem_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
