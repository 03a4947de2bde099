"""Supervised warm-up on the embedded digit task, so RL starts from a model with some reward."""

from __future__ import annotations

import logging

import torch

from megatron_pr2.platform.device import compute_device, to_device
from megatron_pr2.platform.distributed import process_groups
from megatron_pr2.tasks import CharTokenizer, DigitTask, sft_batch
from megatron_pr2.training.model_setup import build_optimizer
from megatron_pr2.training.nonfinite import NonFiniteGuard
from megatron_pr2.training.pipeline_schedule import (
    broadcast_from_last_stage,
    run_schedule,
)

logger = logging.getLogger(__name__)


def _sft_step(inputs, model):
    output = model(inputs["tokens"], inputs["positions"], None, labels=inputs["labels"])
    mask = inputs["loss_mask"]

    def loss_func(per_token_loss):
        loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def sft_warmup(model, controller, task: DigitTask, steps: int, lr: float, batch_size: int = 32,
               micro_batch_size: int = 8, log_every: int = 25,
               max_consecutive_skips: int = 8, groups=None, refresh=()) -> float:
    """Train ``model`` on answer tokens for ``steps`` steps (live routing); return the last loss.

    Uses its own Megatron optimizer (Adam at ``lr``, the model's precision and grad-buffer
    layout), discarded afterwards. Each optimizer in ``refresh`` (built before the warm-up, e.g.
    the RL one) reloads its fp32 main params from the warmed-up model, else its first step
    would write the pre-warm-up weights back under ``--bf16``. A step with a
    non-finite loss or gradient is skipped; ``max_consecutive_skips`` in a row stop the run
    (:class:`~megatron_pr2.training.nonfinite.NonFiniteError`). ``groups``: the run's
    ``ProcessGroupCollection`` (default: Megatron's initialised groups).
    """
    groups = process_groups(groups)
    guard = NonFiniteGuard(max_consecutive_skips, where="warm-up")
    tokenizer = CharTokenizer()
    optimizer = build_optimizer(model, lr=lr)
    controller.begin_step("live")
    controller.end_step()
    loss_value = float("nan")
    for step in range(steps):
        batch = sft_batch(tokenizer, task.problems(step * batch_size, batch_size, "warmup"))
        tokens, labels, loss_mask = (to_device(t) for t in
                                     (batch.input_ids, batch.labels, batch.loss_mask))
        positions = torch.arange(tokens.shape[1], device=compute_device()).expand_as(tokens)
        micro = [{"tokens": tokens[i:i + micro_batch_size],
                  "positions": positions[i:i + micro_batch_size],
                  "labels": labels[i:i + micro_batch_size],
                  "loss_mask": loss_mask[i:i + micro_batch_size]}
                 for i in range(0, batch_size, micro_batch_size)]
        for chunk in model:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = run_schedule(model, micro, _sft_step, seq_length=batch.input_ids.shape[1],
                              micro_batch_size=micro_batch_size, groups=groups)
        guard.step(optimizer, model, [float(item["loss"]) for item in losses],
                   label=f"step {step + 1}")
        local = torch.stack([item["loss"] for item in losses]).mean() if losses else \
            torch.zeros((), device=compute_device())
        loss_value = float(broadcast_from_last_stage(local, groups.pp))
        if (step + 1) % log_every == 0 or step + 1 == steps or guard.consecutive:
            logger.info("warm-up step %d/%d: answer loss %.4f", step + 1, steps, loss_value)
    for stale in refresh:
        stale.reload_model_params()
    return loss_value
