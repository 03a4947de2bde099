"""Trainer -> rollout engine weight sync, called after each optimizer phase.

The trainer hands over Hugging Face-named tensors (produced by the conversion adapters,
``megatron_pr2.convert``); in PR2-in-engine mode the adapters already write each router's
predictive gate weight ``W_r + W_p`` under the HF gate name, so an unmodified engine routes with
``TopK(p + h W_p)``. Two transports:

- :class:`TensorWeightSync`: in memory / over HTTP (``engine.update_weights``);
- :class:`DiskWeightSync`: write an HF checkpoint directory (``config.json`` + safetensors) and
  make the engine reload it (``engine.update_weights_from_disk``), for engines on other hosts that
  share a file system, or models too large for one HTTP body.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SyncReport:
    """What one sync moved."""

    version: int
    num_tensors: int
    num_bytes: int
    seconds: float


def _prepared(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None):
    seen = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight sync got tensor {name!r} twice")
        seen.add(name)
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor


class TensorWeightSync:
    """Push tensors through the engine's ``update_weights``.

    Args:
        engine: a :class:`~megatron_pr2.rollout.engine.RolloutEngine`.
        dtype: cast floating tensors to this dtype first (None: keep).
    """

    def __init__(self, engine, dtype: torch.dtype | None = None):
        self.engine = engine
        self.dtype = dtype
        self.version = 0

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        start = time.perf_counter()
        counted = _Counter(_prepared(named_tensors, self.dtype))
        self.engine.update_weights(counted)
        self.version += 1
        report = SyncReport(self.version, counted.count, counted.bytes, time.perf_counter() - start)
        logger.info("weight sync v%d: %d tensors, %.1f MB, %.2f s", report.version, report.num_tensors,
                    report.num_bytes / 2**20, report.seconds)
        return report


class DiskWeightSync:
    """Write an HF checkpoint directory, then have the engine reload it.

    Args:
        engine: has ``update_weights_from_disk(path)``.
        directory: where to write (must be readable by the engine's host).
        hf_config: written as ``config.json``.
        dtype: cast floating tensors first (None: keep).
    """

    def __init__(self, engine, directory: str, hf_config: dict, dtype: torch.dtype | None = None):
        self.engine = engine
        self.directory = directory
        self.hf_config = dict(hf_config)
        self.dtype = dtype
        self.version = 0

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        from safetensors.torch import save_file

        start = time.perf_counter()
        tensors = {name: t.contiguous() for name, t in _prepared(named_tensors, self.dtype)}
        os.makedirs(self.directory, exist_ok=True)
        save_file(tensors, os.path.join(self.directory, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(self.directory, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(self.hf_config, handle, indent=2)
        self.engine.update_weights_from_disk(self.directory)
        self.version += 1
        num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return SyncReport(self.version, len(tensors), num_bytes, time.perf_counter() - start)


class _Counter:
    """Counts tensors and bytes while an engine consumes them."""

    def __init__(self, named_tensors):
        self._source = named_tensors
        self.count = 0
        self.bytes = 0

    def __iter__(self):
        for name, tensor in self._source:
            self.count += 1
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
