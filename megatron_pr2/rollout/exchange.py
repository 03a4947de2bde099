"""Move samples (with their compact routes) between ranks over a host (gloo) group.

Routes travel in their compact dtype (uint8 for E <= 256) inside the pickled samples. The
rollout driver (rank 0) sends each rank only what its data-parallel rank trains on
(:func:`dp_view`, cut by :func:`megatron_pr2.rollout.alignment.shard_for_dp`, routes cut to its
pipeline stage's MoE layers and, under sequence parallelism, to the token rows its routers
read); the other ranks wait on the host group, whose timeout (``--distributed-timeout-minutes``)
bounds the wait.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_pr2.rollout.alignment import shard_for_dp
from megatron_pr2.rollout.grid_layout import GridLayout, cut_to_rows, read_route_rows
from megatron_pr2.rollout.sample import Sample


def all_gather_samples(local: Sequence[Sample], group=None) -> list[Sample]:
    """Every rank's samples, concatenated in rank order, on every rank of ``group``."""
    gathered: list[list[Sample] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(local), group=group)
    return [sample for part in gathered for sample in part]


def token_stub(sample: Sample) -> Sample:
    """``sample`` without its routes and log-probs (tokens, reward, status and plain metadata):
    enough for batch-wide facts (group rewards, the padded width), ~2% of the routed bytes."""
    metadata = {k: v for k, v in sample.metadata.items() if not isinstance(v, torch.Tensor)}
    return Sample(tokens=sample.tokens, prompt_length=sample.prompt_length, reward=sample.reward,
                  status=sample.status, metadata={**metadata, "dp_remote": True})


def dp_view(samples: Sequence[Sample], dp_size: int, dp_rank: int,
            route_slots: Sequence[int] | None = None,
            layout: GridLayout | None = None) -> list[Sample]:
    """The batch as data-parallel rank ``dp_rank`` needs it: its share (``shard_for_dp``) whole,
    every other sample as a :func:`token_stub` (no routes, no log-probs). ``route_slots``: the
    positions on the MoE-layer axis of the receiving pipeline stage's layers (None: all); the
    share's routes keep only those. ``layout``: the receiving rank's micro-batch layout; where
    its routers read only part of each grid row (sequence/context parallelism), the share's
    routes keep only the rows they read (:func:`~megatron_pr2.rollout.grid_layout.cut_to_rows`)."""
    indices = shard_for_dp(len(samples), dp_size, dp_rank)
    rows = (read_route_rows(samples, indices, layout)
            if layout is not None and layout.splits_tokens else {})
    share = set(indices)
    return [(_with_route_slots(_with_rows(s, rows.get(i)), route_slots) if i in share
             else token_stub(s)) for i, s in enumerate(samples)]


def _with_rows(sample: Sample, rows) -> Sample:
    return sample if rows is None else cut_to_rows(sample, rows)


def _with_route_slots(sample: Sample, route_slots: Sequence[int] | None) -> Sample:
    if route_slots is None or sample.routed_experts is None:
        return sample
    if len(route_slots) == sample.routed_experts.shape[1]:
        return sample
    # a copy: pickling a view would send the whole base tensor
    routes = sample.routed_experts[:, list(route_slots)].clone() if route_slots else None
    return dataclasses.replace(sample, routed_experts=routes)


def scatter_object(per_rank: Sequence[Any] | None, src: int = 0, group=None) -> Any:
    """Entry ``r`` of ``per_rank`` (given on ``src`` only; others pass None) on rank ``r``."""
    box: list[Any] = [None]
    dist.scatter_object_list(box, list(per_rank) if dist.get_rank() == src else None, src=src,
                             group=group)
    return box[0]


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` on every rank of ``group`` (others pass anything)."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_rank_views(view: tuple, group=None) -> list[tuple]:
    """Each rank's ``view`` (what it needs of a batch: ``dp_view``'s arguments after the batch)
    in rank order, on every rank of ``group``."""
    gathered: list[tuple | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, tuple(view), group=group)
    return gathered
