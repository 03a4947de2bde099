"""Move samples (with their compact routes) between ranks: all-gather and broadcast.

Routes travel in their compact dtype (uint8 for E <= 256) inside the pickled samples; ranks
then take their data-parallel share with :func:`megatron_pr2.rollout.alignment.shard_for_dp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

from megatron_pr2.rollout.sample import Sample


def all_gather_samples(local: Sequence[Sample], group=None) -> list[Sample]:
    """Every rank's samples, concatenated in rank order, on every rank of ``group``."""
    gathered: list[list[Sample] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(local), group=group)
    return [sample for part in gathered for sample in part]


def broadcast_samples(samples: Sequence[Sample] | None, src: int = 0, group=None) -> list[Sample]:
    """The samples of global rank ``src`` on every rank of ``group`` (others pass None)."""
    box = [list(samples) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    if box[0] is None:
        raise RuntimeError(f"rank {src} broadcast no samples")
    return box[0]
