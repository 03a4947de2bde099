"""The trainer's weight syncs to its rollout engine while SGLang servers leave and come back.

Each :meth:`EngineWeightSync.sync` is collective (every rank calls it, at the weight-sync
boundary before the next generation):

1. Rank 0 health-probes the evicted servers that are due (at most one ``/health`` per server per
   ``--server-rejoin-interval``; :mod:`megatron_pr2.rollout.rejoin_schedule`). Those that answer
   are *candidates*.
2. With candidates, the syncer is rebuilt (the old one closed) for the live servers plus the
   candidates and a full sync runs; only after it succeeded do the candidates rejoin the pool (a
   server that missed a sync holds stale weights and never generates before a full one).
3. A failed sync (with or without candidates) is redone on the servers that pass a health check;
   candidates stay evicted (a warning names them) and are probed again after a longer interval.

Rank 0 decides and every decision reaches the other ranks over the gloo host group, so every rank
takes the same path. After a sync, rank 0 tags the engine's weights with their version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch.distributed as dist

from megatron_pr2.platform.distributed import host_group
from megatron_pr2.rollout.engine import RolloutError
from megatron_pr2.rollout.exchange import broadcast_object
from megatron_pr2.rollout.sglang_weight_api import WeightUpdateError
from megatron_pr2.weight_sync.syncer import (
    SyncReport,
    WeightSyncer,
    WeightSyncError,
    agree_on_error,
)

logger = logging.getLogger(__name__)


class EngineWeightSync:
    """Owns the current :class:`WeightSyncer` and replaces it when the server set changes.

    Args:
        build: ``build(rejoining)`` -> a syncer for the live servers plus ``rejoining``
            (collective; :func:`~megatron_pr2.weight_sync.build_weight_syncer`).
        engine: the rollout engine (rank 0; None elsewhere).
        server_pool: the engine is a pool of SGLang servers (failover and rejoin on).
    """

    def __init__(self, build: Callable[[Sequence[str]], WeightSyncer], engine, server_pool: bool):
        self._build = build
        self.engine = engine
        self.server_pool = server_pool
        self.syncer = build(())

    def sync(self, version: int, predictive_gate: bool = False) -> SyncReport:
        """Push every weight to the engine's servers (and to evicted ones that came back), then
        tag them with ``version`` (:mod:`megatron_pr2.rollout.weight_version`)."""
        report = self._push(predictive_gate)
        error = None
        if dist.get_rank() == 0 and hasattr(self.engine, "set_weight_version"):
            try:
                self.engine.set_weight_version(version)
            except RolloutError as exc:  # no server left: every rank stops, not rank 0 alone
                error = f"{type(exc).__name__}: {exc}"
        agree_on_error(host_group(), error, f"tagging the engine's weights as version {version}",
                       RolloutError)
        return report

    def _push(self, predictive_gate: bool) -> SyncReport:
        candidates = self._rejoin_candidates()
        if candidates:
            return self._sync_with_candidates(candidates, predictive_gate)
        try:
            return self.syncer.sync(predictive_gate=predictive_gate)
        except WeightSyncError as exc:
            if not self.server_pool:
                raise
            return self._resync_on_live_servers(exc, predictive_gate)

    def close(self) -> None:
        self.syncer.close()

    def _rebuild(self, rejoining: Sequence[str] = ()) -> None:
        self.syncer.close()
        self.syncer = self._build(rejoining)

    def _rejoin_candidates(self) -> list[str]:
        if not self.server_pool:
            return []
        candidates = self.engine.rejoin_candidates() if dist.get_rank() == 0 else None
        return broadcast_object(candidates, group=host_group())

    def _sync_with_candidates(self, candidates: list[str], predictive_gate: bool) -> SyncReport:
        logger.info("full weight sync to rejoin %s", ", ".join(candidates))
        try:
            self._rebuild(candidates)
            report = self.syncer.sync(predictive_gate=predictive_gate)
        except (WeightSyncError, WeightUpdateError) as exc:
            if dist.get_rank() == 0:
                self.engine.pool.rejoin_failed(candidates, str(exc))
            return self._resync_on_live_servers(exc, predictive_gate)
        if dist.get_rank() == 0:
            for address in candidates:
                self.engine.pool.rejoin(address)
        return report

    def _resync_on_live_servers(self, failure: RolloutError, predictive_gate: bool) -> SyncReport:
        """Drop the servers that fail a health check, rebuild the syncer on the live ones and
        sync once more."""
        logger.warning("weight sync failed (%s); retrying on the servers that pass a health "
                       "check", failure)
        problem = None
        if dist.get_rank() == 0:
            try:
                self.engine.health()
                self.engine.pool.require_live()
            except RolloutError as exc:
                problem = f"{type(exc).__name__}: {exc}"
        problem = broadcast_object(problem, group=host_group())
        if problem:
            raise WeightSyncError(f"{failure}; {problem}") from failure
        self._rebuild()
        return self.syncer.sync(predictive_gate=predictive_gate)
