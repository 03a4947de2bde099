#!/usr/bin/env python
"""Step time and peak memory of PR2 routing vs. live routing, on the same model and batch.

One "step" is what an RL iteration does per rollout batch with one mini-step: an old-log-prob
pass (forward only) over every micro-batch, then a training forward + backward over every
micro-batch.

- live: Megatron-Core's own ``TopKRouter``, live routing in both passes;
- pr2: ``ReplayRouter``, a predict pass (``TopK(p + h W_p)``, recording routes and ``h, p``) and a
  replayed training pass with the predictor loss on (the mini-step >= 2 case, the costliest).

Same seed, weights and tokens for both. Step time: both models in one process, steps
alternated (machine-load drift hits both alike), median per variant. Memory: each variant
alone in its own process, peak resident set above its level right after building the model
and batch (CPU), or ``torch.cuda.max_memory_allocated`` above the post-build allocation (GPU).
Also reported, deterministic: the bytes autograd holds for backward per training micro-batch
(activation memory) and the bytes PR2 keeps between passes (predictor inputs); peak RSS on CPU
is noisy (allocator reuse). Not part of CI.

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
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
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


class _Variant:
    """A model (live ``TopKRouter`` or ``ReplayRouter``) and one RL step on a fixed batch."""

    def __init__(self, name: str, args, device: str):
        import torch

        from megatron_pr2.models import ModelOptions, build_model
        from megatron_pr2.platform import seed_model_parallel
        from megatron_pr2.routing.controller import RoutingController
        from megatron_pr2.routing.predictor import PredictorConfig
        from megatron_pr2.routing.router import ReplayRouter

        self.name = name
        seed_model_parallel(1234)  # same weights for both variants
        options = ModelOptions(router_class=ReplayRouter) if name == "pr2" else ModelOptions()
        _, _, self.model = build_model(_hf_config(args), options=options)
        self.model = self.model.to(device)
        gen = torch.Generator().manual_seed(0)
        s, b = args.seq_length, args.micro_batch_size
        self.batches = [torch.randint(0, 1024, (b, s + 1), generator=gen).to(device)
                        for _ in range(args.num_microbatches)]
        self.positions = torch.arange(s, device=device).expand(b, -1)
        self.controller = (
            RoutingController(self.model, PredictorConfig(sample_ratio=args.sample_ratio))
            if name == "pr2" else None)

    def _forward(self, mb, tokens):
        if self.controller is not None:
            self.controller.set_microbatch(mb)
        return self.model(tokens[:, :-1], self.positions, None, labels=tokens[:, 1:])

    def step(self, saved_bytes: list | None = None) -> None:
        """Old-log-prob pass (live / predict) + training pass (live / replay + predictor loss).

        With ``saved_bytes``, append each training micro-batch's bytes saved for backward.
        """
        import torch

        controller = self.controller
        if controller is not None:
            controller.begin_step("predict")
        with torch.no_grad():
            for mb, tokens in enumerate(self.batches):
                self._forward(mb, tokens)
        if controller is not None:
            plan = controller.end_step().routes
            controller.begin_step("replay", plan=plan, train_predictor=True)
        for mb, tokens in enumerate(self.batches):
            if saved_bytes is None:
                loss = self._forward(mb, tokens).float().mean()
            else:
                loss, nbytes = _counting_saved_tensors(self._forward, mb, tokens)
                saved_bytes.append(nbytes)
            torch.autograd.backward(loss.float().mean())
        if controller is not None:
            controller.end_step()
        self.model.zero_grad(set_to_none=True)
        if torch.cuda.is_available() and self.batches[0].is_cuda:
            torch.cuda.synchronize()

    def stored_bytes(self) -> int:
        return _stored_bytes(self.controller.routers) if self.controller is not None else 0

    def saved_activation_bytes(self) -> int:
        """Largest bytes autograd holds for one training micro-batch (deterministic)."""
        saved: list[int] = []
        self.step(saved_bytes=saved)
        return max(saved)


def _counting_saved_tensors(forward, *args):
    """Run ``forward(*args)``; count the bytes of the distinct storages saved for backward."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward(*args)
    return output, sum(storages.values())


def _setup(args) -> str:
    import torch

    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_model_parallel(ParallelConfig(), seed=1234, device=args.device)
    return "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"


def _measure_time(args) -> dict:
    """Both variants in one process, steps alternated (load drift hits both alike)."""
    device = _setup(args)
    variants = [_Variant("live", args, device), _Variant("pr2", args, device)]
    times = {v.name: [] for v in variants}
    for index in range(args.warmup + args.steps):
        for variant in variants if index % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            variant.step()
            if index >= args.warmup:
                times[variant.name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def _measure_memory(name: str, args) -> dict:
    """Peak memory of one variant, alone in its process, above the post-build level."""
    import torch

    device = _setup(args)
    cuda = device == "cuda"
    variant = _Variant(name, args, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _memory_now(cuda)
    for _ in range(max(1, args.warmup)):
        variant.step()
    peak = _memory_now(cuda) - base
    return {"peak_mb": peak, "stored_mb": variant.stored_bytes() / 2**20,
            "saved_mb": variant.saved_activation_bytes() / 2**20,
            "memory": "cuda allocated" if cuda else "peak RSS"}


def _run_isolated(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    logger.info("timing live and pr2 (alternating steps) ...")
    times = _run_isolated(_measure_time, args)
    memory = {}
    for name in ("live", "pr2"):
        logger.info("peak memory of %s ...", name)
        memory[name] = _run_isolated(_measure_memory, name, args)
    print(f"model: hidden {args.hidden_size}, {args.num_layers} MoE layers, {args.num_experts} "
          f"experts, top-{args.top_k}; batch {args.num_microbatches} x {args.micro_batch_size} x "
          f"{args.seq_length} tokens; predictor sample ratio {args.sample_ratio}")
    print(f"{'variant':8s} {'step s (median)':>15s} {'step s (min)':>12s} "
          f"{'peak mem (MiB)':>14s} {'saved/micro-batch (MiB)':>23s} {'PR2 stored (MiB)':>16s}")
    for name in ("live", "pr2"):
        m = memory[name]
        print(f"{name:8s} {times[name][0]:15.3f} {times[name][1]:12.3f} {m['peak_mb']:14.1f} "
              f"{m['saved_mb']:23.1f} {m['stored_mb']:16.2f}")
    live, pr2 = memory["live"], memory["pr2"]
    mem_ratio = pr2["peak_mb"] / live["peak_mb"] if live["peak_mb"] > 0 else float("nan")
    print(f"ratio pr2/live: step time {times['pr2'][0] / times['live'][0]:.3f} (median), "
          f"{times['pr2'][1] / times['live'][1]:.3f} (min); peak memory ({live['memory']} above "
          f"build) {mem_ratio:.3f}; activations per micro-batch + PR2 stored "
          f"{(pr2['saved_mb'] + pr2['stored_mb']) / live['saved_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
