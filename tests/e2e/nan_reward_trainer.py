"""The trainer with NaN injected at chosen iterations: a test-only fault injection.

``python -m tests.e2e.nan_reward_trainer rewards:2,4,5 <train flags>`` runs
``megatron_pr2.train`` with every reward of those iterations' rollout batches replaced by NaN, so
their advantages, loss and gradients are NaN (what a broken reward function or a diverging model
produces). ``warmup:2`` instead makes the loss of those supervised warm-up steps NaN.
"""

import math
import sys

from megatron_pr2 import train
from megatron_pr2.training import warmup
from megatron_pr2.training.rollout_source import RolloutSource


def poison_rewards(iterations: set[int]) -> None:
    generate = RolloutSource.generate  # on the rollout driver, in step or in the background

    def generate_with_nan(self, iteration, start):
        samples, metrics = generate(self, iteration, start)
        if iteration in iterations:
            for sample in samples:
                sample.reward = math.nan
        return samples, metrics

    RolloutSource.generate = generate_with_nan


def poison_warmup(steps: set[int]) -> None:
    sft_batch, calls = warmup.sft_batch, [0]

    def batch_with_nan_mask(*args, **kwargs):
        calls[0] += 1
        batch = sft_batch(*args, **kwargs)
        if calls[0] in steps:
            batch.loss_mask[:] = math.nan
        return batch

    warmup.sft_batch = batch_with_nan_mask


if __name__ == "__main__":
    kind, numbers = sys.argv[1].split(":")
    chosen = {int(i) for i in numbers.split(",")}
    {"rewards": poison_rewards, "warmup": poison_warmup}[kind](chosen)
    sys.exit(train.main(sys.argv[2:]))
