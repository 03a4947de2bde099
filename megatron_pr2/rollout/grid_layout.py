"""A data-parallel rank's micro-batch grids, and the route rows its routers read from them.

The trainer lays a rank's share out in padded ``[B, S]`` grids (:func:`build_grids`). With
sequence parallelism a TP rank's routers read only positions ``[r * S / TP, (r + 1) * S / TP)``
of each grid row (with context parallelism, its chunks;
:func:`~megatron_pr2.rollout.alignment.router_token_index`). The grids follow from the samples'
lengths and the rank's :class:`GridLayout`, so the rollout driver, which holds every sample,
finds those rows (:func:`read_route_rows`) and sends the rank only them (:func:`cut_to_rows`,
used by :func:`~megatron_pr2.rollout.exchange.dp_view`): about 1/TP of the routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_pr2.rollout.alignment import (
    MicroBatch,
    TokenParallel,
    build_micro_batches,
    router_token_index,
)
from megatron_pr2.rollout.sample import RouteRows, Sample


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """How a rank lays out its data-parallel share, and which grid positions its routers read.

    Attributes:
        micro_batch_size: samples per grid (consecutive samples of the share).
        parallel: the rank's TP/SP/CP position (padding multiple and router positions).
        uniform_width: every grid as wide as the batch's longest sample (rounded up to
            ``parallel.sequence_multiple``), else each as wide as its own longest sample.
    """

    micro_batch_size: int
    parallel: TokenParallel = dataclasses.field(default_factory=TokenParallel)
    uniform_width: bool = False

    @property
    def splits_tokens(self) -> bool:
        """Whether the rank's routers read only part of each grid row (SP with TP > 1, or CP)."""
        parallel = self.parallel
        return (parallel.sequence_parallel and parallel.tp_size > 1) or parallel.cp_size > 1


def _pad_grid(grid: MicroBatch, width: int, pad_token_id: int) -> None:
    extra = width - grid.tokens.shape[1]
    if extra <= 0:
        return

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, extra), value=value)

    grid.tokens = pad(grid.tokens, pad_token_id)
    grid.position_ids = pad(grid.position_ids, 0)
    grid.sample_of = pad(grid.sample_of, -1)
    grid.token_of = pad(grid.token_of, -1)
    grid.response_mask = pad(grid.response_mask, False)


def build_grids(samples: Sequence[Sample], indices: Sequence[int], layout: GridLayout,
                pad_token_id: int = 0) -> list[MicroBatch]:
    """The padded (bshd) grids of ``samples[indices]`` under ``layout``; with ``uniform_width``
    the width is that of the longest of all ``samples`` (every rank holds every length)."""
    grids = build_micro_batches(samples, list(indices), layout.micro_batch_size, "bshd",
                                layout.parallel, pad_token_id)
    if layout.uniform_width:
        multiple = layout.parallel.sequence_multiple
        width = -(-max(s.total_length for s in samples) // multiple) * multiple
        for grid in grids:
            _pad_grid(grid, width, pad_token_id)
    return grids


def _spans(positions: torch.Tensor) -> RouteRows:
    """The runs of consecutive values of an ascending, duplicate-free 1-D tensor."""
    if positions.numel() == 0:
        return RouteRows(())
    breaks = ((positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1).tolist()
    values = positions.tolist()
    return RouteRows(tuple((values[a], values[b - 1] + 1)
                           for a, b in zip([0, *breaks], [*breaks, len(values)])))


def read_route_rows(samples: Sequence[Sample], indices: Sequence[int],
                    layout: GridLayout) -> dict[int, RouteRows]:
    """For each sample of ``indices``, the route rows (token positions ``< T - 1``) that the
    routers of a rank with ``layout`` read from its grids."""
    rows = {}
    for grid in build_grids(samples, indices, layout):
        read = router_token_index(grid, layout.parallel)
        slot, token = grid.sample_of.reshape(-1)[read], grid.token_of.reshape(-1)[read]
        for position, index in enumerate(grid.sample_indices):
            mine = (slot == position) & (token < samples[index].total_length - 1)
            rows[index] = _spans(torch.unique(token[mine]))
    return rows


def cut_to_rows(sample: Sample, rows: RouteRows) -> Sample:
    """``sample`` carrying only the routes of ``rows`` (a copy; ``sample`` itself when those
    are all of its routes, or it has none)."""
    routes = sample.routed_experts
    if routes is None or rows.spans == ((0, routes.shape[0]),):
        return sample
    if sample.route_rows is not None:
        raise ValueError("the sample's routes are already cut to a token slice")
    kept = (torch.cat([routes[start:stop] for start, stop in rows.spans]) if rows.spans
            else routes[:0].clone())
    return dataclasses.replace(sample, routed_experts=kept, route_rows=rows)


__all__ = ["GridLayout", "build_grids", "cut_to_rows", "read_route_rows"]
