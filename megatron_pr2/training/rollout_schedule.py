"""When each rollout batch is generated: in step with training, or one batch ahead.

Synchronous (the default): iteration ``k`` generates batch ``k`` with the weights of iteration
``k - 1`` (version ``k - 1``), trains on it, then syncs version ``k`` to the engine.

Asynchronous (``--async-rollout``, ``--max-weight-staleness 1``): as soon as batch ``k`` is
handed to training, the rollout driver starts generating batch ``k + 1`` in a background thread,
with the weights the engine holds (version ``k - 1``), while batch ``k`` trains. Before the
weight sync of iteration ``k`` the driver waits for that generation (an engine never changes
weights under a running batch), so an iteration costs about ``max(rollout, train) + sync`` and
every batch after the first is trained by a policy one version newer than the one that
generated it. With ``--max-weight-staleness 0`` the next batch is generated only after the
sync, in the background thread but waited for at once: the synchronous loop, run through the
asynchronous path.

Only the rollout driver (rank 0) generates, and its background thread runs no collective; the
batch reaches the other ranks in the main thread (:meth:`RolloutSource.distribute`). A batch
generated ahead but not yet trained is not saved in a checkpoint: the saved data position points
at its first prompt, so a resumed run generates it again with the restored weights (nothing is
trained twice or skipped).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Generation:
    """One batch being generated on the rollout driver."""

    iteration: int
    start: int
    thread: threading.Thread | None = None
    batch: tuple | None = None
    error: BaseException | None = None
    started_s: float = 0.0
    ended_s: float = 0.0


class RolloutSchedule:
    """Hands the loop each iteration's batch, generated in step or one batch ahead.

    Args:
        source: the run's :class:`~megatron_pr2.training.rollout_source.RolloutSource`.
        asynchronous: generate in a background thread on the rollout driver.
        staleness: with ``asynchronous``, how many weight versions a trained batch may lag its
            policy: 1 (the next batch generates while this one trains) or 0.
        last_iteration: no batch is generated past it.
    """

    def __init__(self, source, *, asynchronous: bool = False, staleness: int = 1,
                 last_iteration: int):
        if staleness not in (0, 1):
            raise ValueError(f"weight staleness must be 0 or 1, got {staleness}")
        self.source = source
        self.asynchronous = asynchronous
        self.lead = staleness if asynchronous else 0  # batches generated ahead of training
        self.last_iteration = last_iteration
        self._clock_origin = time.monotonic()
        self._ahead: _Generation | None = None
        self.data_position = source.data_position  # first prompt of the next batch to train

    @property
    def max_lag(self) -> int:
        """Weight versions a trained batch may lag behind the policy that trains it."""
        return self.lead

    def resume_at(self, data_position: int) -> None:
        """Continue from a checkpoint's data position (nothing is generated ahead yet)."""
        self.data_position = self.source.data_position = data_position

    def take(self, iteration: int) -> tuple[list, dict[str, float]]:
        """Collective: the batch of ``iteration`` on every rank (each rank's view of it), plus
        its first prompt's position in the training data (``rollout/first_prompt``) and the
        times its generation started and ended (``time/rollout_*_s``, rank 0's clock).

        With a lead of one batch, the next batch starts generating before this returns."""
        if self._ahead is None or self._ahead.iteration != iteration:
            self._ahead = self._start(iteration)
        current = self._wait(self._ahead)
        self._ahead = None
        if self.lead and iteration < self.last_iteration:
            self._ahead = self._start(iteration + 1)
        self.data_position += self.source.cfg.rollout.rollout_batch_prompts
        samples, metrics = self.source.distribute(current.batch if _is_driver() else None)
        return samples, {**metrics, "rollout/first_prompt": float(current.start),
                         **self._times(current)}

    def settle(self) -> None:
        """Wait for the batch generating ahead (driver; no collective): before a weight sync."""
        if self._ahead is not None and self._ahead.thread is not None:
            self._ahead.thread.join()

    def close(self) -> None:
        """Stop waiting for a batch generating ahead (its daemon thread ends with the process)."""
        if self._ahead is not None and self._ahead.thread is not None \
                and self._ahead.thread.is_alive():
            logger.info("abandoning the rollout batch of iteration %d, still generating",
                        self._ahead.iteration)
        self._ahead = None

    # ----------------------------------------------------------------------------- internals
    def _start(self, iteration: int) -> _Generation:
        start = self.source.reserve_prompts()
        job = _Generation(iteration, start)
        if not _is_driver():
            return job
        if self.asynchronous:
            job.thread = threading.Thread(target=self._generate, args=(job,), daemon=True,
                                          name=f"rollout-{iteration}")
            job.thread.start()
        else:
            self._generate(job)
        return job

    def _generate(self, job: _Generation) -> None:
        job.started_s = self.now()
        try:
            job.batch = self.source.generate(job.iteration, job.start)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by _wait
            job.error = exc
        job.ended_s = self.now()

    def _wait(self, job: _Generation) -> _Generation:
        if job.thread is not None:
            job.thread.join()
        if job.error is not None:
            raise job.error
        return job

    def _times(self, job: _Generation) -> dict[str, float]:
        if not _is_driver():
            return {}
        return {"time/rollout_start_s": job.started_s, "time/rollout_end_s": job.ended_s}

    def now(self) -> float:
        """Seconds on the clock of the ``time/rollout_*_s`` metrics."""
        return time.monotonic() - self._clock_origin


def _is_driver() -> bool:
    return dist.get_rank() == 0
