"""Metrics to TensorBoard and a JSONL file (rank 0), with a one-line progress summary."""

from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger(__name__)


NONFINITE_COUNT = "metrics/nonfinite_count"


class MetricsLogger:
    """Writes each step's scalar metrics to TensorBoard and to a JSONL file.

    Non-finite values are kept as such in the JSONL file (``NaN``/``Infinity``, which Python's
    ``json`` reads back); TensorBoard cannot plot them, so it receives their count per step as
    ``metrics/nonfinite_count`` (also in the JSONL), and a warning names them.

    Args:
        tensorboard_dir: TensorBoard log directory (None: off).
        jsonl_path: JSONL file, one object per step (None: off).
        enabled: False on ranks other than 0.
        resume_step: drop JSONL records after this step (they are recomputed after a resume).
    """

    def __init__(self, tensorboard_dir: str | None, jsonl_path: str | None, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl_path = jsonl_path
        self._writer = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir, purge_step=resume_step and resume_step + 1)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            _truncate_after(jsonl_path, resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        nonfinite = sorted(k for k, v in clean.items() if not math.isfinite(v))
        clean[NONFINITE_COUNT] = float(len(nonfinite))
        if nonfinite:
            logger.warning("step %d: non-finite metrics %s", step,
                           ", ".join(f"{k}={clean[k]}" for k in nonfinite))
        if self._writer is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self.jsonl_path:
            with open(self.jsonl_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _truncate_after(path: str, step: int | None) -> None:
    if not os.path.exists(path):
        return
    if step is None:
        os.remove(path)
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics JSONL file."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
