"""Padded-token fraction of the trainer's micro-batches for a long-tailed response-length mix.

Before: every micro-batch padded to the rollout batch's longest sample (what PP > 1 or the
allgather dispatcher with EP > 1 needs). After: each micro-batch only as wide as its own longest
sample (PP = 1 with the alltoall dispatcher, or EP = 1). Response lengths are log-normal, capped at
``--max-new-tokens`` (the usual RL shape: most answers short, a few run to the cap). Figures
come from the trainer's own ``build_train_microbatches``.

    .venv/bin/python tools/bench_padding.py
    .venv/bin/python tools/bench_padding.py --samples 512 --micro-batch-size 2 --tp 4 --sp
"""

from __future__ import annotations

import argparse

import torch

from megatron_pr2.rollout.alignment import TokenParallel
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.training.rollout_batch import build_train_microbatches


def long_tailed_samples(count: int, prompt_len: int, median: int, sigma: float, cap: int,
                        seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(count, generator=generator)
    lengths = (median * torch.exp(sigma * normal)).clamp(1, cap).long().tolist()
    return [Sample(torch.zeros(prompt_len + n, dtype=torch.long), prompt_length=prompt_len,
                   rollout_log_probs=torch.zeros(n)) for n in lengths]


def padded_fractions(samples, micro_batch_size: int, parallel: TokenParallel,
                     uniform_width: bool) -> list[float]:
    microbatches = build_train_microbatches(samples, range(len(samples)),
                                            torch.zeros(len(samples)), micro_batch_size,
                                            parallel, pad_token_id=0, uniform_width=uniform_width)
    return [float((mb.grid.sample_of < 0).float().mean()) for mb in microbatches]


def _describe(name: str, fractions: list[float]) -> str:
    ordered = sorted(fractions)
    return (f"{name:<28} mean {sum(fractions) / len(fractions):6.1%}   median "
            f"{ordered[len(ordered) // 2]:6.1%}   min {ordered[0]:6.1%}   max {ordered[-1]:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--median-response", type=int, default=600)
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal spread")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true", help="sequence parallel")
    parser.add_argument("--fp8-multiple", type=int, default=1, help="e.g. 16 for FP8 GEMMs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    samples = long_tailed_samples(args.samples, args.prompt_len, args.median_response, args.sigma,
                                  args.max_new_tokens, args.seed)
    parallel = TokenParallel(tp_size=args.tp, sequence_parallel=args.sp,
                             token_multiple=args.fp8_multiple)
    before = padded_fractions(samples, args.micro_batch_size, parallel, uniform_width=True)
    after = padded_fractions(samples, args.micro_batch_size, parallel, uniform_width=False)
    lengths = sorted(s.total_length for s in samples)
    print(f"{args.samples} samples, micro-batch size {args.micro_batch_size}, lengths: median "
          f"{lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, max "
          f"{lengths[-1]} tokens; padding multiple {parallel.sequence_multiple}")
    print("padded-token fraction per micro-batch:")
    print(_describe("before (rollout-batch width)", before))
    print(_describe("after (own width)", after))
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    print(f"tokens computed per real token: before {1 / (1 - mean_before):.2f}, after "
          f"{1 / (1 - mean_after):.2f} ({(1 - mean_after) / (1 - mean_before):.2f}x fewer)")


if __name__ == "__main__":
    main()
