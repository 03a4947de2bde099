"""Routed-experts transport cost: bytes per token on the wire and in memory, decode + align speed.

Default layout: Qwen3-30B-A3B (48 MoE layers, top-8 of 128 experts). Builds SGLang-style wire
payloads (base64 of int32 ``[T-1, L, K]``) for random distinct routes, then times decoding them
into compact Samples and aligning those into a route plan (padded or packed micro-batches,
optional sequence-parallel split).

    .venv/bin/python tools/bench_routes.py
    .venv/bin/python tools/bench_routes.py --samples 64 --seq-len 2048 --token-format thd --tp 2
"""

from __future__ import annotations

import argparse
import base64
import time

import numpy as np
import torch

from megatron_pr2.rollout.alignment import (
    TokenParallel,
    build_micro_batches,
    build_route_plan,
    route_bytes,
)
from megatron_pr2.rollout.route_codec import RouteShape, decode_routed_experts
from megatron_pr2.rollout.sample import Sample


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (prompt + response)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--token-format", choices=("bshd", "thd"), default="bshd")
    parser.add_argument("--tp", type=int, default=1, help="sequence-parallel TP size (rank 0 is timed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="time each phase this many times, keep the fastest (shared machines)")
    return parser.parse_args(argv)


def random_wire_payload(rows: int, layers: int, top_k: int, experts: int, rng) -> str:
    """Distinct random expert ids per (row, layer), encoded as SGLang does."""
    keys = rng.random((rows, layers, experts), dtype=np.float32)
    ids = np.argpartition(keys, top_k, axis=-1)[..., :top_k].astype("<i4")
    return base64.b64encode(ids.tobytes()).decode("ascii")


def best_of(fn, repeats: int):
    """``fn()``'s result and its fastest wall and CPU seconds over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return result, min(walls), min(cpus)


def decoder_name() -> str:
    try:
        import pybase64

        return f"pybase64 {pybase64.__version__}"
    except ImportError:
        return "base64 (standard library; pip install pybase64 for ~10x)"


def main(argv=None) -> int:
    args = parse_args(argv)
    route_shape = RouteShape(args.layers, tuple(range(args.layers)), args.top_k, args.experts)
    rng = np.random.default_rng(args.seed)
    rows = args.seq_len - 1
    payloads = [random_wire_payload(rows, args.layers, args.top_k, args.experts, rng)
                for _ in range(args.samples)]
    tokens = args.samples * args.seq_len

    def decode():
        return [Sample(torch.zeros(args.seq_len, dtype=torch.long), prompt_length=args.seq_len // 4,
                       routed_experts=decode_routed_experts(p, num_rows=rows, route_shape=route_shape))
                for p in payloads]

    parallel = TokenParallel(tp_size=args.tp, tp_rank=0, sequence_parallel=args.tp > 1)

    def align():
        micro_batches = build_micro_batches(samples, list(range(len(samples))),
                                            args.micro_batch_size, args.token_format, parallel)
        return build_route_plan(micro_batches, samples, route_shape, parallel=parallel)

    samples, decode_s, decode_cpu = best_of(decode, args.repeats)
    plan, align_s, align_cpu = best_of(align, args.repeats)

    wire_bytes = sum(len(p) for p in payloads) / (args.samples * rows)
    raw_bytes = args.layers * args.top_k * 4
    memory_bytes = samples[0].routed_experts.element_size() * args.layers * args.top_k
    plan_tokens = sum(r.valid.numel() for (_, layer), r in plan.routes.items() if layer == 1)
    print(f"layout: {args.layers} MoE layers, top-{args.top_k} of {args.experts} experts; "
          f"{args.samples} samples x {args.seq_len} tokens; {args.token_format}, TP/SP={args.tp}; "
          f"decoder: {decoder_name()}; best of {args.repeats}")
    print(f"wire (base64 int32):      {wire_bytes:8.1f} bytes/token  (raw int32 {raw_bytes} bytes/token)")
    print(f"in memory (Sample, {samples[0].routed_experts.dtype}): {memory_bytes:8.1f} bytes/token")
    print(f"route plan (ids + mask):  {route_bytes(plan) / plan_tokens:8.1f} bytes/router row "
          f"(incl. padding)")
    print("throughput (tokens/s)       wall        CPU time (this process)")
    for label, wall, cpu in (("decode+check+compact", decode_s, decode_cpu),
                             ("align (micro-batches+plan)", align_s, align_cpu),
                             ("decode+align", decode_s + align_s, decode_cpu + align_cpu)):
        print(f"{label:<27}{tokens / wall:10,.0f}  {tokens / cpu:12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
