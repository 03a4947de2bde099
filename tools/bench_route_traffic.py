"""Route traffic per RL iteration for the recipe's layout, by routing method: engine -> driver
(SGLang's base64 int32 routes) and driver -> trainer ranks (the pickled compact samples each
rank receives over the gloo host group: its data-parallel share).

Default: Qwen3-30B-A3B (48 MoE layers, top-8 of 128 experts), 2 x 8 H100 with TP=4 (+SP) PP=2
EP=8 (DP=2), micro-batch size 1, 64 prompts x 8 samples of 4608 tokens
(examples/pr2/train_qwen_moe.sh). Sizes are measured on pickled samples as ``dp_view`` cuts them
for each rank, then scaled. Engine -> driver: "before" asks every request for routes, "after"
only where the method replays the engine's routes (``RoutingMethod.uses_engine_routes``).
Driver -> ranks, three steps: every rank all MoE layers of every token; each rank its pipeline
stage's MoE layers (``route_slots``); and also only the token rows its routers read under
sequence parallelism (``GridLayout``, about 1/TP; what the trainer sends now).

    PYTHONPATH=. .venv/bin/python tools/bench_route_traffic.py [--tokens 4608 --tp 4 --pp 2 --world 16]
"""

from __future__ import annotations

import argparse
import base64
import pickle

import torch

from megatron_pr2.rollout.alignment import TokenParallel
from megatron_pr2.rollout.exchange import dp_view
from megatron_pr2.rollout.grid_layout import GridLayout
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.routing.methods import ROUTING_METHODS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4608, help="tokens per sample")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--world", type=int, default=16)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    return parser.parse_args(argv)


def routes(rows: int, shape: RouteShape) -> torch.Tensor:
    """Distinct expert ids per (row, layer), int32 as SGLang holds them."""
    base = torch.arange(rows)[:, None, None] + torch.arange(shape.num_moe_layers)[None, :, None]
    return ((base * shape.top_k + torch.arange(shape.top_k)) % shape.num_experts).to(torch.int32)


def wire_bytes(ids: torch.Tensor) -> int:
    """One sample's routes as SGLang sends them: base64 of little-endian int32."""
    return len(base64.b64encode(ids.numpy().astype("<i4").tobytes()))


def host_bytes(sample: Sample, with_routes: bool, route_slots=None,
               layout: GridLayout | None = None) -> tuple[int, int]:
    """Pickled bytes of a sample in a rank's own share (routes cut to ``route_slots`` and to the
    rows ``layout``'s routers read) and as a token stub (another rank's share)."""
    own = sample if with_routes else Sample(sample.tokens, sample.prompt_length,
                                            sample.rollout_log_probs)
    mine, stub = dp_view([own, own], 2, 0, route_slots, layout)
    return len(pickle.dumps(mine)), len(pickle.dumps(stub))


def main(argv=None) -> None:
    args = parse_args(argv)
    shape = RouteShape(args.layers, tuple(range(args.layers)), args.top_k, args.experts)
    samples = args.prompts * args.samples_per_prompt
    dp = args.world // (args.tp * args.pp)
    ids = routes(args.tokens - 1, shape)
    sample = Sample(torch.zeros(args.tokens, dtype=torch.long), args.tokens // 8,
                    torch.zeros(args.tokens - args.tokens // 8),
                    ids.to(shape.compact_dtype))  # exact: ids < E
    per_wire = wire_bytes(ids)
    share = samples // dp
    gb = 1e9
    print(f"layout: {args.world} GPUs, TP={args.tp} (+SP) PP={args.pp} DP={dp}, micro-batch "
          f"{args.micro_batch_size}; {samples} samples of {args.tokens} tokens; routes "
          f"[T-1, {args.layers}, {args.top_k}] of {args.experts}")
    print(f"one sample: {per_wire / 1e6:.2f} MB of base64 routes from SGLang; "
          f"{host_bytes(sample, True)[0] / 1e6:.2f} MB pickled with compact routes, "
          f"{host_bytes(sample, False)[0] / 1e6:.3f} MB without")
    print(f"{'method':<15}{'engine->driver GB':>20}   driver->ranks GB: all layers -> stage "
          f"layers -> + SP token slice")
    stages = [tuple(range(s * args.layers // args.pp, (s + 1) * args.layers // args.pp))
              for s in range(args.pp)]
    layouts = [GridLayout(args.micro_batch_size,
                          TokenParallel(tp_size=args.tp, tp_rank=r, sequence_parallel=True),
                          uniform_width=args.pp > 1) for r in range(args.tp)]

    def per_iteration(own_and_stub) -> int:  # one rank's bytes (dp ranks alike)
        own, stub = own_and_stub
        return dp * (share * own + (samples - share) * stub)

    for name, method in ROUTING_METHODS.items():
        wants = method.uses_engine_routes
        engine_before, engine_after = samples * per_wire, samples * per_wire if wants else 0
        host_before = args.world // dp * per_iteration(host_bytes(sample, True))
        host_stage = sum(args.tp * per_iteration(host_bytes(sample, wants, slots))
                         for slots in stages)
        host_sliced = sum(per_iteration(host_bytes(sample, wants, slots, layout))
                          for slots in stages for layout in layouts)
        print(f"{name:<15}{engine_before / gb:>9.2f} -> {engine_after / gb:<8.2f}"
              f"{host_before / gb:>12.2f} -> {host_stage / gb:.2f} -> {host_sliced / gb:.2f}")


if __name__ == "__main__":
    main()
