"""Drift attribution in the trainer: per layer and per mini-step, on a token sample.

Forward pre-hooks on every ``ReplayRouter`` keep, for one micro-batch per mini-batch, a sample of
the router inputs ``h`` (and the router weight ``W``) seen in the old-log-prob pass (``old``) and
in that mini-batch's training mini-step (``cur``); :func:`~megatron_pr2.routing.drift_attribution.
drift_counts` compares the four routes. Counts are summed over all ranks (every layout), so each
global layer's figures cover the tokens of every rank that holds it.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_pr2.platform.distributed import host_group
from megatron_pr2.routing.drift_attribution import DriftCounts, drift_counts
from megatron_pr2.routing.router import ReplayRouter


class DriftProbe:
    """Samples router inputs and weights in chosen passes and turns them into drift metrics.

    Args:
        routers: this rank's ``ReplayRouter`` modules.
        num_layers: the model's number of layers (global numbering, for the reduction).
        max_tokens: tokens sampled per layer and micro-batch.
    """

    def __init__(self, routers: list[ReplayRouter], num_layers: int, max_tokens: int):
        self.routers = routers
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self._phase: str | None = None
        self._wanted: set[int] = set()
        self._samples: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [r.register_forward_pre_hook(self._hook) for r in routers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rows(self, num_rows: int) -> torch.Tensor:
        stride = max(1, num_rows // self.max_tokens)
        return torch.arange(0, num_rows, stride)[:self.max_tokens]

    def _hook(self, router: ReplayRouter, args) -> None:
        mb = router.replay_state.microbatch_id
        if self._phase is None or mb not in self._wanted:
            return
        hidden_TH = args[0].detach().reshape(-1, args[0].shape[-1])
        rows = self._rows(hidden_TH.shape[0]).to(hidden_TH.device)
        # later forwards of the same phase (recompute, the final theta_0 pass) overwrite
        self._samples[(self._phase, router.layer_number, mb)] = (
            hidden_TH[rows].float().cpu(), router.weight.detach().float().cpu().clone())

    @contextlib.contextmanager
    def capture(self, phase: str, microbatch_ids):
        """Record samples of ``microbatch_ids`` in the block's forwards under ``phase``."""
        self._phase, self._wanted = phase, set(microbatch_ids)
        try:
            yield
        finally:
            self._phase, self._wanted = None, set()

    def ministep_counts(self, microbatch_id: int) -> dict[int, DriftCounts]:
        """This rank's counts per global layer for a micro-batch sampled as ``old`` and ``cur``."""
        out = {}
        for router in self.routers:
            key_old, key_cur = ("old", router.layer_number, microbatch_id), \
                ("cur", router.layer_number, microbatch_id)
            if key_old not in self._samples or key_cur not in self._samples:
                continue
            (h_old, w_old), (h_cur, w_cur) = self._samples.pop(key_old), self._samples.pop(key_cur)
            out[router.layer_number] = drift_counts(h_old, h_cur, w_old, w_cur, router.topk)
        return out

    def reduce(self, counts: dict[int, DriftCounts]) -> dict[int, DriftCounts]:
        """Counts per global layer summed over every rank (a collective: all ranks call it)."""
        table = torch.zeros(self.num_layers + 1, 4, dtype=torch.float64)
        for layer, layer_counts in counts.items():
            table[layer] = layer_counts.as_tensor()
        torch.distributed.all_reduce(table, group=host_group())  # host-side counts
        return {layer: DriftCounts.from_tensor(table[layer])
                for layer in range(1, self.num_layers + 1) if table[layer, 0] > 0}

    def reset(self) -> None:
        self._samples = {}


def drift_metrics(per_ministep: list[dict[int, DriftCounts]]) -> dict[str, float]:
    """Metric dict: per layer and mini-step, per mini-step over layers, and over mini-steps >= 2."""
    metrics: dict[str, float] = {}
    later = DriftCounts()
    for m, per_layer in enumerate(per_ministep, start=1):
        total = DriftCounts()
        for layer, counts in sorted(per_layer.items()):
            total = total + counts
            for name, value in counts.summary().items():
                metrics[f"drift_layer/layer_{layer}/{name}/ministep{m}"] = value
        for name, value in total.summary().items():
            metrics[f"drift/{name}/ministep{m}"] = value
        if m > 1:
            later = later + total
    for name, value in later.summary().items():
        metrics[f"drift/{name}/ministeps_ge2"] = value
    return metrics
