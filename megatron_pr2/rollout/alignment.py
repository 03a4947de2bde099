"""Align rollout routes to the trainer: DP shards, micro-batches, and the router's route plan (pure torch).

Token ``t`` of a sample was processed by the engine with route ``routed_experts[t]``
(``t = 0 .. T-2``); its last token has no route. In a micro-batch the trainer feeds the whole
sequence, so the router position holding token ``t`` replays ``routed_experts[t]``; the last
token's position and padding are marked invalid (routed live by the router).

Router token order (Megatron): hidden states are ``[S, B, H]`` and the router sees them flattened
sequence-first, row ``s * B + b``. Context parallelism (CP) first keeps this rank's sequence
chunks (the sequence in ``2 * CP`` chunks, rank ``r`` holding chunks ``r`` and ``2CP-1-r``; for
packed THD batches per sequence), then sequence parallelism (SP) keeps ``S_local / TP``
consecutive positions per TP rank. Routes are keyed by micro-batch id and Megatron's 1-based
global layer number (pipeline offset and virtual stages included), never by list position.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Literal

import torch

from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan

TokenFormat = Literal["bshd", "thd"]


@dataclasses.dataclass(frozen=True)
class TokenParallel:
    """How a micro-batch's tokens are split over tensor/context-parallel ranks.

    Attributes:
        tp_size, tp_rank: tensor-parallel group; tokens are split only with ``sequence_parallel``.
        sequence_parallel: each TP rank holds ``S_local / TP`` consecutive positions.
        cp_size, cp_rank: context-parallel group.
        token_multiple: each rank's share of a sequence is padded to a multiple of this (16 or
            32 for TransformerEngine's FP8 GEMMs, see ``models.moe_options.fp8_token_multiple``).
    """

    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    cp_size: int = 1
    cp_rank: int = 0
    token_multiple: int = 1

    def __post_init__(self):
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"ranks out of range in {self}")
        if self.token_multiple < 1:
            raise ValueError(f"token_multiple must be >= 1 in {self}")

    @property
    def sequence_multiple(self) -> int:
        """Per-sequence padding multiple that keeps every CP chunk and SP slice whole and a
        multiple of ``token_multiple`` tokens long."""
        cp = 2 * self.cp_size if self.cp_size > 1 else 1
        return cp * (self.tp_size if self.sequence_parallel else 1) * self.token_multiple


@dataclasses.dataclass
class MicroBatch:
    """Samples laid out for one trainer forward.

    Attributes:
        token_format: ``"bshd"`` (padded ``[B, S]``) or ``"thd"`` (packed ``[1, S]``).
        tokens: ``[B, S]`` token ids (pad id where ``sample_of`` is -1).
        position_ids: ``[B, S]``; restart at 0 for each packed sequence.
        sample_of: ``[B, S]`` index into ``sample_indices`` of the token's sample, -1 for padding.
        token_of: ``[B, S]`` position of the token within its sample, -1 for padding.
        response_mask: ``[B, S]`` True at response tokens.
        sample_indices: the samples of this micro-batch (indices into the caller's list).
        cu_seqlens, cu_seqlens_padded: ``[n+1]`` int32 sequence boundaries (THD only).
    """

    token_format: TokenFormat
    tokens: torch.Tensor
    position_ids: torch.Tensor
    sample_of: torch.Tensor
    token_of: torch.Tensor
    response_mask: torch.Tensor
    sample_indices: list[int]
    cu_seqlens: torch.Tensor | None = None
    cu_seqlens_padded: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


# ---------------------------------------------------------------------------------------------
# Data-parallel shards and micro-batches
# ---------------------------------------------------------------------------------------------


def shard_for_dp(num_samples: int, dp_size: int, dp_rank: int) -> list[int]:
    """Indices of the samples of one data-parallel rank: a contiguous, equal share.

    Raises:
        ValueError: the sample count does not split evenly (ranks must run as many micro-batches).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    if num_samples % dp_size:
        raise ValueError(f"{num_samples} samples do not split evenly over {dp_size} data-parallel ranks")
    share = num_samples // dp_size
    return list(range(dp_rank * share, (dp_rank + 1) * share))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _empty_grid(rows: int, cols: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.full((rows, cols), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros((rows, cols), dtype=torch.long),
        "sample_of": torch.full((rows, cols), -1, dtype=torch.long),
        "token_of": torch.full((rows, cols), -1, dtype=torch.long),
        "response_mask": torch.zeros((rows, cols), dtype=torch.bool),
    }


def _place(grid: dict, row: int, start: int, sample: Sample, slot: int) -> None:
    length = sample.total_length
    span = slice(start, start + length)
    grid["tokens"][row, span] = sample.tokens
    grid["position_ids"][row, span] = torch.arange(length)
    grid["sample_of"][row, span] = slot
    grid["token_of"][row, span] = torch.arange(length)
    grid["response_mask"][row, start + sample.prompt_length:start + length] = True


def build_micro_batch(samples: Sequence[Sample], indices: Sequence[int], token_format: TokenFormat,
                      parallel: TokenParallel = TokenParallel(), pad_token_id: int = 0) -> MicroBatch:
    """Lay out ``samples[i] for i in indices`` as one padded or packed micro-batch.

    BSHD pads every row to the longest sample, rounded up to ``parallel.sequence_multiple``.
    THD packs the samples into one row, each padded to ``parallel.sequence_multiple``.
    """
    chosen = [samples[i] for i in indices]
    if not chosen:
        raise ValueError("a micro-batch needs at least one sample")
    multiple = parallel.sequence_multiple
    if token_format == "bshd":
        width = _round_up(max(s.total_length for s in chosen), multiple)
        grid = _empty_grid(len(chosen), width, pad_token_id)
        for slot, sample in enumerate(chosen):
            _place(grid, slot, 0, sample, slot)
        return MicroBatch("bshd", sample_indices=list(indices), **grid)
    if token_format == "thd":
        lengths = [s.total_length for s in chosen]
        padded = [_round_up(n, multiple) for n in lengths]
        grid = _empty_grid(1, sum(padded), pad_token_id)
        starts = [0, *torch.tensor(padded).cumsum(0).tolist()]
        for slot, sample in enumerate(chosen):
            _place(grid, 0, starts[slot], sample, slot)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return MicroBatch("thd", sample_indices=list(indices), cu_seqlens=cu,
                          cu_seqlens_padded=torch.tensor(starts, dtype=torch.int32), **grid)
    raise ValueError(f"unknown micro-batch token format {token_format!r} (use 'bshd' or 'thd')")


def build_micro_batches(samples: Sequence[Sample], indices: Sequence[int], micro_batch_size: int,
                        token_format: TokenFormat = "bshd", parallel: TokenParallel = TokenParallel(),
                        pad_token_id: int = 0) -> list[MicroBatch]:
    """Consecutive groups of ``micro_batch_size`` samples (the last may be smaller)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [build_micro_batch(samples, indices[i:i + micro_batch_size], token_format, parallel, pad_token_id)
            for i in range(0, len(indices), micro_batch_size)]


# ---------------------------------------------------------------------------------------------
# Router token order
# ---------------------------------------------------------------------------------------------


def _cp_chunks(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions ``[0, length)`` kept by CP rank ``cp_rank`` (chunks r and 2CP-1-r of 2CP)."""
    if cp_size == 1:
        return torch.arange(length)
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not divisible by 2*CP = {2 * cp_size}")
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def _sp_slice(positions: torch.Tensor, parallel: TokenParallel) -> torch.Tensor:
    if not parallel.sequence_parallel or parallel.tp_size == 1:
        return positions
    if positions.numel() % parallel.tp_size:
        raise ValueError(
            f"{positions.numel()} local positions are not divisible by TP = {parallel.tp_size} "
            "(sequence parallelism)"
        )
    share = positions.numel() // parallel.tp_size
    return positions[parallel.tp_rank * share:(parallel.tp_rank + 1) * share]


def router_token_index(micro_batch: MicroBatch, parallel: TokenParallel = TokenParallel()) -> torch.Tensor:
    """For each router row on this rank, the flat index ``b * S + s`` into the micro-batch grid.

    Returns:
        ``[N_local]`` int64, in the router's own order.
    """
    batch, width = micro_batch.shape
    if micro_batch.token_format == "bshd":
        positions = _sp_slice(_cp_chunks(width, parallel.cp_size, parallel.cp_rank), parallel)
        return (positions[:, None] + torch.arange(batch)[None, :] * width).reshape(-1)
    bounds = micro_batch.cu_seqlens_padded.tolist()
    per_sequence = [start + _cp_chunks(end - start, parallel.cp_size, parallel.cp_rank)
                    for start, end in itertools.pairwise(bounds)]
    return _sp_slice(torch.cat(per_sequence), parallel)


# ---------------------------------------------------------------------------------------------
# Route plan
# ---------------------------------------------------------------------------------------------


def _spread_ids(rows: int, route_shape: RouteShape) -> torch.Tensor:
    """Distinct, non-constant ids for rows without a route (never sent: they are routed live)."""
    base = torch.arange(rows)[:, None] * route_shape.top_k + torch.arange(route_shape.top_k)[None, :]
    dims = (rows, route_shape.num_moe_layers, route_shape.top_k)
    return (base % route_shape.num_experts)[:, None, :].expand(*dims)


def _checked_routes(samples: Sequence[Sample], indices: Sequence[int],
                    route_shape: RouteShape) -> list[torch.Tensor]:
    routes = []
    for index in indices:
        experts = samples[index].routed_experts
        if experts is None:
            raise ValueError(f"sample {index} has no routed experts (R3 needs the engine's routes)")
        if tuple(experts.shape[1:]) != (route_shape.num_moe_layers, route_shape.top_k):
            raise ValueError(
                f"sample {index} routes have shape {tuple(experts.shape)}; expected "
                f"[T-1, {route_shape.num_moe_layers}, {route_shape.top_k}]"
            )
        routes.append(experts)
    return routes


def _held_row(chosen: Sequence[Sample], owner: torch.Tensor, token_of: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
    """The row of each valid position's token in its sample's routes: the token itself, unless
    a sample carries a token slice (``Sample.route_rows``)."""
    if all(s.route_rows is None for s in chosen):
        return token_of
    counts = [s.total_length - 1 for s in chosen]
    lookup = torch.cat([torch.arange(n) if s.route_rows is None else s.route_rows.row_of_token(n)
                        for s, n in zip(chosen, counts)])
    first_token = torch.cumsum(torch.tensor(counts), 0) - torch.tensor(counts)
    rows = lookup[torch.where(valid, first_token[owner] + token_of, 0)]
    if bool((valid & (rows < 0)).any()):
        raise ValueError("a router row reads a token whose route this rank was not sent (its "
                         "token slice was cut for another micro-batch layout)")
    return torch.where(valid, rows, 0)


def route_grid(micro_batch: MicroBatch, samples: Sequence[Sample], route_shape: RouteShape,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes at grid positions: ``([N, L_moe, K] compact, [N] valid)``.

    Args:
        positions: flat grid indices ``b * S + s`` to read (default: the whole grid, row-major).
    """
    sample_of = micro_batch.sample_of.reshape(-1)
    token_of = micro_batch.token_of.reshape(-1)
    if positions is not None:
        sample_of, token_of = sample_of[positions], token_of[positions]
    per_sample = _checked_routes(samples, micro_batch.sample_indices, route_shape)
    chosen = [samples[i] for i in micro_batch.sample_indices]
    held = torch.tensor([r.shape[0] for r in per_sample])  # T - 1, or the rows of a token slice
    first_row = torch.cumsum(held, 0) - held
    owner = sample_of.clamp(min=0)
    route_count = torch.tensor([s.total_length - 1 for s in chosen])
    valid = (sample_of >= 0) & (token_of < route_count[owner])
    source = torch.where(valid, first_row[owner] + _held_row(chosen, owner, token_of, valid), 0)
    table = torch.cat(per_sample).to(route_shape.compact_dtype)
    if table.shape[0] == 0:  # a token slice with none of these samples' routes: all invalid
        table = torch.zeros((1, *table.shape[1:]), dtype=table.dtype)
    routes = table.index_select(0, source)
    missing = (~valid).nonzero().flatten()
    routes[missing] = _spread_ids(missing.numel(), route_shape).to(route_shape.compact_dtype)
    return routes, valid


def local_moe_layer_numbers(layer_numbers: Sequence[int] | None, route_shape: RouteShape) -> list[int]:
    """The MoE layers among a stage's global layer numbers (None = every MoE layer)."""
    if layer_numbers is None:
        return list(route_shape.moe_layer_numbers)
    bad = [n for n in layer_numbers if not 1 <= n <= route_shape.num_hidden_layers]
    if bad:
        raise ValueError(f"layer numbers {bad} outside [1, {route_shape.num_hidden_layers}]")
    return [n for n in layer_numbers if n in route_shape.moe_layer_numbers]


def stage_route_shape(route_shape: RouteShape, layer_numbers: Sequence[int]) -> RouteShape | None:
    """The route shape of a pipeline stage holding global ``layer_numbers``: only its MoE layers
    (None when it has none). Samples sent to that stage carry routes for these layers only
    (:func:`stage_route_slots`), and its route plan is built with this shape."""
    numbers = set(layer_numbers)
    indices = tuple(i for i in route_shape.moe_layer_indices if i + 1 in numbers)
    if not indices:
        return None
    return dataclasses.replace(route_shape, moe_layer_indices=indices)


def stage_route_slots(route_shape: RouteShape, layer_numbers: Sequence[int]) -> tuple[int, ...]:
    """Positions on a sample's MoE-layer axis of the MoE layers among ``layer_numbers``."""
    numbers = set(layer_numbers)
    return tuple(slot for slot, number in enumerate(route_shape.moe_layer_numbers)
                 if number in numbers)


def model_layer_numbers(model_chunks) -> list[int]:
    """Global layer numbers of the decoder layers of this rank's Megatron model chunks."""
    numbers = []
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        while hasattr(module, "module") and not hasattr(module, "decoder"):
            module = module.module
        numbers.extend(int(layer.layer_number) for layer in module.decoder.layers)
    return numbers


def build_route_plan(micro_batches: Sequence[MicroBatch], samples: Sequence[Sample],
                     route_shape: RouteShape, *, layer_numbers: Sequence[int] | None = None,
                     parallel: TokenParallel = TokenParallel(), first_microbatch_id: int = 0) -> RoutePlan:
    """The route plan of this rank: micro-batch ``i`` gets id ``first_microbatch_id + i``.

    Args:
        micro_batches: this rank's micro-batches, in execution order.
        samples: the list their ``sample_indices`` point into.
        route_shape: the model's route shape (MoE layers, top-k, experts).
        layer_numbers: global layer numbers on this pipeline stage (None: all layers).
        parallel: this rank's TP/SP/CP position.
    """
    plan = RoutePlan()
    moe_numbers = local_moe_layer_numbers(layer_numbers, route_shape)
    slot_of = {number: slot for slot, number in enumerate(route_shape.moe_layer_numbers)}
    for offset, micro_batch in enumerate(micro_batches):
        index = router_token_index(micro_batch, parallel)
        local_routes, local_valid = route_grid(micro_batch, samples, route_shape, index)
        by_layer = _layer_major(local_routes)
        for number in moe_numbers:
            expert_ids = by_layer[slot_of[number]]  # contiguous [N, K], disjoint per layer
            plan.add(first_microbatch_id + offset, number, LayerRoutes(expert_ids, local_valid.clone()))
    return plan


_WORD_OF_BYTES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _layer_major(routes: torch.Tensor) -> torch.Tensor:
    """``[N, L, K]`` -> contiguous ``[L, N, K]``; a token's K ids move as one machine word when
    they fit one (top-8 uint8: one int64), ~5x faster than an element-wise permute."""
    rows, layers, top_k = routes.shape
    word = _WORD_OF_BYTES.get(top_k * routes.element_size())
    # one row: the transposed words keep a non-unit last stride (size-1 dims count as contiguous)
    if word is None or not routes.is_contiguous() or routes.numel() == 0 or rows == 1:
        return routes.permute(1, 0, 2).contiguous()
    words = routes.view(word).view(rows, layers).t().contiguous()
    return words.view(routes.dtype).view(layers, rows, top_k)


def route_bytes(plan: RoutePlan) -> int:
    """Memory held by a plan's expert ids and masks."""
    return sum(r.expert_ids.numel() * r.expert_ids.element_size() + r.valid.numel()
               for r in plan.routes.values())


__all__ = [
    "MicroBatch", "TokenParallel", "build_micro_batch", "build_micro_batches", "build_route_plan",
    "local_moe_layer_numbers", "model_layer_numbers", "route_bytes", "route_grid",
    "router_token_index", "shard_for_dp", "stage_route_shape", "stage_route_slots",
]
