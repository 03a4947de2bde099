"""How a rollout batch is cut: samples -> data-parallel ranks -> mini-steps -> micro-batches.

The one rule the config check, the launch-side dry run and the RL loop all apply. Pure Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from megatron_pr2.config import RunConfig

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The split of one rollout batch (counts per data-parallel rank where noted)."""

    samples: int
    samples_per_dp_rank: int
    samples_per_ministep: int  # per data-parallel rank
    microbatches_per_ministep: int  # per data-parallel rank
    ministeps: int


def plan_batch(cfg: RunConfig, dp: int) -> BatchPlan:
    """Split ``cfg``'s rollout batch over ``dp`` data-parallel ranks.

    Raises:
        ValueError: the samples do not split into whole micro-batches on every rank and
            mini-step, or the interleaved pipeline schedule would refuse the micro-batch count.
    """
    rollout = cfg.rollout
    samples = rollout.rollout_batch_prompts * rollout.n_samples_per_prompt
    window, mbs = cfg.algo.off_policy_window, cfg.train.micro_batch_size
    unit = dp * window * mbs
    if samples % unit:
        raise ValueError(
            f"a rollout batch of {samples} samples (--rollout-batch-prompts "
            f"{rollout.rollout_batch_prompts} x --n-samples-per-prompt "
            f"{rollout.n_samples_per_prompt}) is not divisible by DP x --off-policy-window x "
            f"--micro-batch-size = {dp} x {window} x {mbs} = {unit}")
    per_step = samples // dp // window
    plan = BatchPlan(samples, samples // dp, per_step, per_step // mbs, window)
    _check_interleaved_schedule(plan, cfg.parallel.pipeline_model_parallel_size,
                                cfg.parallel.virtual_pipeline_model_parallel_size or 1)
    return plan


def split_ministeps(microbatches: Sequence[T], window: int) -> list[Sequence[T]]:
    """A rank's micro-batches cut into its ``window`` mini-batches, in order (equal counts, as
    :func:`plan_batch` guarantees)."""
    per_step = len(microbatches) // window
    return [microbatches[m * per_step:(m + 1) * per_step] for m in range(window)]


def _check_interleaved_schedule(plan: BatchPlan, pp: int, vpp: int) -> None:
    if vpp > 1 and plan.microbatches_per_ministep % pp:
        raise ValueError(
            f"the interleaved pipeline schedule (--virtual-pipeline-model-parallel-size {vpp}) "
            f"needs the micro-batches per mini-step ({plan.microbatches_per_ministep}) to be a "
            f"multiple of --pipeline-model-parallel-size {pp}")
