"""How a rollout batch is cut into data-parallel shards, mini-steps and micro-batches."""

from __future__ import annotations

import dataclasses

from megatron_pr2.config import RunConfig
from megatron_pr2.launch.placement import Layout
from megatron_pr2.launch.problems import ValidationError


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a rollout batch is cut: samples -> data-parallel ranks -> mini-steps -> micro-batches."""

    samples: int
    samples_per_dp_rank: int
    samples_per_ministep: int  # per data-parallel rank
    microbatches_per_ministep: int  # per data-parallel rank
    ministeps: int


def plan_batch(cfg: RunConfig, layout: Layout) -> BatchPlan:
    """Split the rollout batch as the trainer does (``RLLoop._microbatches``).

    Raises:
        ValidationError: samples do not split into whole micro-batches on every rank and
            mini-step, or the interleaved pipeline schedule would refuse the micro-batch count.
    """
    rollout = cfg.rollout
    samples = rollout.rollout_batch_prompts * rollout.n_samples_per_prompt
    window, mbs = cfg.algo.off_policy_window, cfg.train.micro_batch_size
    unit = layout.dp * window * mbs
    if samples % unit:
        raise ValidationError([
            (f"a rollout batch of {samples} samples (--rollout-batch-prompts "
             f"{rollout.rollout_batch_prompts} x --n-samples-per-prompt "
             f"{rollout.n_samples_per_prompt}) is not divisible by DP x --off-policy-window x "
             f"--micro-batch-size = {layout.dp} x {window} x {mbs} = {unit}")])
    per_rank = samples // layout.dp
    per_step = per_rank // window
    plan = BatchPlan(samples, per_rank, per_step, per_step // mbs, window)
    if layout.vpp > 1 and plan.microbatches_per_ministep % layout.pp:
        raise ValidationError([
            (f"the interleaved pipeline schedule (--virtual-pipeline-model-parallel-size "
             f"{layout.vpp}) needs the micro-batches per mini-step "
             f"({plan.microbatches_per_ministep}) to be a multiple of "
             f"--pipeline-model-parallel-size {layout.pp}")])
    return plan
