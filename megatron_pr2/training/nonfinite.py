"""Non-finite guard: skip an optimizer step whose loss or gradients are not finite.

Megatron's fp16 grad scaler skips such steps, but the fp32/bf16 optimizers apply them and the
weights and Adam moments become NaN for good. The guard checks every rank's loss values and
gradients before ``optimizer.step()``, agrees on the verdict across all ranks (one all-reduce of
one element), skips the step everywhere when any rank saw a non-finite value, counts the skips
and stops the run with :class:`NonFiniteError` after ``max_consecutive`` skips in a row.
:func:`assert_finite_weights` refuses to checkpoint weights that are no longer finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterable

import torch

from megatron_pr2.platform.distributed import any_rank

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run produced non-finite values it cannot recover from."""


@dataclasses.dataclass
class StepOutcome:
    """What one guarded optimizer step did."""

    success: bool
    grad_norm: float
    skipped: bool


def _local_grads(model) -> list[torch.Tensor]:
    """This rank's gradients: Megatron DDP's ``main_grad`` buffers, else ``.grad``."""
    grads = []
    for chunk in model:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grads.append(grad)
    return grads


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    checks = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def step_is_finite(model, loss_values: Iterable[float]) -> bool:
    """Whether every rank's ``loss_values`` and gradients are finite (collective)."""
    local_bad = not all(math.isfinite(float(v)) for v in loss_values)
    local_bad = local_bad or not _all_finite(_local_grads(model))
    return not any_rank(local_bad)


class NonFiniteGuard:
    """Counts skipped steps and stops the run after too many in a row.

    Args:
        max_consecutive: skipped steps in a row that end the run (``--max-consecutive-skips``).
        where: what is trained, for messages ("RL", "warm-up").
    """

    def __init__(self, max_consecutive: int = 8, where: str = "RL"):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.where = where
        self.consecutive = 0
        self.total = 0

    def step(self, optimizer, model, loss_values: Iterable[float], label: str) -> StepOutcome:
        """``optimizer.step()`` when loss and gradients are finite on every rank, else skip it.

        Raises:
            NonFiniteError: this was the ``max_consecutive``-th skipped step in a row.
        """
        if step_is_finite(model, loss_values):
            success, grad_norm, _ = optimizer.step()
            self.consecutive = 0
            norm = float(grad_norm) if grad_norm is not None else float("nan")
            return StepOutcome(bool(success), norm, skipped=False)
        optimizer.zero_grad()
        self.consecutive += 1
        self.total += 1
        logger.warning("%s %s: non-finite loss or gradient, optimizer step skipped "
                       "(%d in a row, %d in total)", self.where, label, self.consecutive,
                       self.total)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.where} stopped at {label}: {self.consecutive} optimizer steps in a row had "
                f"a non-finite loss or gradient and were skipped (--max-consecutive-skips "
                f"{self.max_consecutive}); the weights are those of the last finite step and no "
                "checkpoint was written for this iteration")
        return StepOutcome(False, float("nan"), skipped=True)

    def metrics(self) -> dict[str, float]:
        return {"skipped_steps_total": float(self.total),
                "skipped_steps_in_a_row": float(self.consecutive)}


def assert_finite_weights(model, label: str) -> None:
    """Raise :class:`NonFiniteError` when any rank holds a non-finite parameter (collective)."""
    local_bad = not _all_finite([p.detach() for chunk in model for p in chunk.parameters()])
    if any_rank(local_bad):
        raise NonFiniteError(f"refusing to save {label}: the model weights are not finite; "
                             "the previous checkpoint is kept")


@contextlib.contextmanager
def nonfinite_context(iteration: int):
    """Name ``iteration`` in a :class:`NonFiniteError` raised inside the block."""
    try:
        yield
    except NonFiniteError as err:
        raise NonFiniteError(f"iteration {iteration}: {err}") from err


def nonfinite_summary(metrics: dict) -> str:
    """A progress-line suffix naming non-finite metrics and skipped steps ('' when none)."""
    bad = sorted(k for k, v in metrics.items()
                 if isinstance(v, float) and not math.isfinite(v))
    skipped = metrics.get("train/skipped_steps_in_a_row") or 0.0
    parts = []
    if bad:
        parts.append(f"NON-FINITE {', '.join(bad)}")
    if skipped:
        parts.append(f"skipped {int(skipped)} step(s) in a row, "
                     f"{int(metrics.get('train/skipped_steps_total') or 0)} in total")
    return (" " + "; ".join(parts)) if parts else ""
