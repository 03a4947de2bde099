"""Which parameters a pipeline stage sends, how each is gathered, and how they split into buckets.

Pure bookkeeping over parameter names and shapes (no communication): every rank of a stage
builds the same plan from its own model chunks, so collectives and bucket boundaries line up.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from megatron_pr2.convert.adapter import PREDICTOR_SUFFIX, StateDictAdapter
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.sharding import global_megatron_name

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = ".mlp.experts."


@dataclasses.dataclass(frozen=True)
class ParallelSizes:
    """The sizes that multiply a local shard into the full tensor(s)."""

    tp: int = 1
    etp: int = 1
    ep: int = 1


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    """One local parameter and how to turn it into single-process Megatron tensors.

    Attributes:
        chunk: index of the model chunk (virtual pipeline stage) holding it.
        local_name: its name in the chunk.
        global_name: single-process name, with this rank's expert offset.
        expert: a routed-expert weight (gathered over expert TP, then over EP).
        tp_axis, glu: the tensor-parallel split (None: replicated).
        full_numel: elements of the tensors it becomes on the pushing rank (all EP ranks').
    """

    chunk: int
    local_name: str
    global_name: str
    expert: bool
    tp_axis: int | None
    glu: bool
    full_numel: int


def _global_name(local_name: str, layer_numbers: Sequence[int], expert_offset: int) -> str:
    name = _LAYER.sub(lambda m: f"decoder.layers.{layer_numbers[int(m.group(1))] - 1}.",
                      local_name)
    return global_megatron_name(name, 0, expert_offset)


def stage_slots(chunks: Sequence[tuple[Sequence[int], Sequence[tuple[str, tuple[int, ...]]]]],
                adapter: StateDictAdapter, sizes: ParallelSizes, expert_offset: int,
                predictive_gate: bool) -> list[ParamSlot]:
    """The parameters this stage sends, in a fixed order.

    Args:
        chunks: per model chunk, (global layer number of each local layer, [(name, shape)]).
        adapter: the model family's key table.
        sizes: TP / expert-TP / EP sizes.
        expert_offset: global id of this rank's first local expert.
        predictive_gate: keep the PR2 predictor weights (folded into the gates).

    Raises:
        ConversionError: a parameter that is in neither the key table nor the PR2 predictor.
    """
    slots = []
    for index, (layer_numbers, params) in enumerate(chunks):
        for local_name, shape in params:
            name = _global_name(local_name, layer_numbers, expert_offset)
            if name.endswith(PREDICTOR_SUFFIX):
                if predictive_gate:
                    slots.append(ParamSlot(index, local_name, name, False, None, False,
                                           math.prod(shape)))
                continue
            rule = adapter.rule_for_megatron(name)
            if rule is None:
                if name == "output_layer.weight" and adapter.spec.tie_word_embeddings:
                    continue  # the last stage's copy of the tied embedding
                raise ConversionError(f"parameter {local_name} (single-process name {name}) is "
                                      f"not in the {adapter.architecture} key table")
            expert = _EXPERT in name
            split = (sizes.etp if expert else sizes.tp) if rule.tp_axis is not None else 1
            copies = sizes.ep if expert else 1
            slots.append(ParamSlot(index, local_name, name, expert, rule.tp_axis, rule.glu,
                                   math.prod(shape) * split * copies))
    return slots


def split_rounds(slots: Sequence[ParamSlot], itemsize: int, max_bytes: int) -> list[list[ParamSlot]]:
    """Consecutive slots grouped into buckets of at most ``max_bytes`` (a larger tensor goes
    alone); a PR2 predictor stays with the router weight before it (they form one gate)."""
    if max_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {max_bytes}")
    rounds: list[list[ParamSlot]] = []
    current: list[ParamSlot] = []
    used = 0
    for slot in slots:
        nbytes = slot.full_numel * itemsize
        keep_with_previous = slot.global_name.endswith(PREDICTOR_SUFFIX)
        if current and used + nbytes > max_bytes and not keep_with_previous:
            rounds.append(current)
            current, used = [], 0
        current.append(slot)
        used += nbytes
    if current:
        rounds.append(current)
    return rounds


def round_bytes(slots: Sequence[ParamSlot], itemsize: int) -> int:
    return sum(slot.full_numel for slot in slots) * itemsize
