"""Trainer -> rollout engine weight sync (in memory for every layout; disk only on request).

* :func:`build_weight_syncer` / :class:`WeightSyncOptions`: pick the transport for an engine;
* :class:`WeightSyncer`: gather, convert (the ``convert`` key tables), bucket and push;
* :mod:`~megatron_pr2.rollout.sglang_weight_api`: SGLang's weight-update HTTP endpoints.
"""

from megatron_pr2.rollout.sglang_weight_api import SGLangWeightAPI, WeightUpdateError
from megatron_pr2.weight_sync.build import WeightSyncOptions, build_weight_syncer
from megatron_pr2.weight_sync.syncer import SyncReport, WeightSyncer, WeightSyncError

__all__ = [
    "SGLangWeightAPI",
    "SyncReport",
    "WeightSyncError",
    "WeightSyncOptions",
    "WeightSyncer",
    "WeightUpdateError",
    "build_weight_syncer",
]
