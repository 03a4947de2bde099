"""Gather a pipeline stage's parameters onto its pushing rank: TP shards, then EP experts.

Collective code. Per parameter: dense weights are gathered over the tensor-parallel group of
data-parallel rank 0; routed-expert weights over the expert-tensor-parallel group, then over
the expert-parallel group, of expert-data-parallel rank 0. The pushing rank (TP, DP, expert TP,
EP and expert DP rank 0 of the stage) receives single-process Megatron tensors; every other
rank only takes part in the collectives it belongs to.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_pr2.convert.adapter import StateDictAdapter
from megatron_pr2.convert.sharding import merge_tp_shards
from megatron_pr2.models.builder import unwrap_ddp
from megatron_pr2.platform.distributed import process_groups
from megatron_pr2.weight_sync.plan import ParallelSizes, ParamSlot, stage_slots

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class StagePosition:
    """This rank's place in its pipeline stage, as the gather needs it."""

    stage: int
    sizes: ParallelSizes
    tp_rank: int
    etp_rank: int
    ep_rank: int
    dense_member: bool    # data-parallel rank 0: takes part in dense gathers
    expert_member: bool   # expert-data-parallel rank 0: takes part in expert gathers

    @property
    def is_pusher(self) -> bool:
        return (self.dense_member and self.expert_member and self.tp_rank == 0
                and self.etp_rank == 0 and self.ep_rank == 0)

    @classmethod
    def of(cls, groups) -> StagePosition:
        """This rank's place in a ``ProcessGroupCollection``."""
        return cls(
            stage=groups.pp.rank(),
            sizes=ParallelSizes(tp=groups.tp.size(), etp=groups.expt_tp.size(),
                                ep=groups.ep.size()),
            tp_rank=groups.tp.rank(),
            etp_rank=groups.expt_tp.rank(),
            ep_rank=groups.ep.rank(),
            dense_member=groups.dp_cp.rank() == 0,
            expert_member=groups.expt_dp.rank() == 0,
        )


class StageGatherer:
    """Streams this stage's parameters as single-process Megatron tensors (on the pusher).

    Args:
        model_chunks: this rank's model chunks (wrapped or not).
        adapter: the model family's key table.
        groups: the run's ``ProcessGroupCollection`` (default: Megatron's initialised groups).
    """

    def __init__(self, model_chunks, adapter: StateDictAdapter, groups=None):
        self.chunks = [unwrap_ddp(c) for c in model_chunks]
        self.adapter = adapter
        self.groups = process_groups(groups)
        self.position = StagePosition.of(self.groups)
        self.local_experts = adapter.spec.num_experts // self.position.sizes.ep

    def slots(self, predictive_gate: bool) -> list[ParamSlot]:
        """The parameters this stage sends (identical on every rank of the stage)."""
        described = []
        for chunk in self.chunks:
            numbers = [int(layer.layer_number) for layer in chunk.decoder.layers]
            params = [(n, tuple(p.shape)) for n, p in chunk.named_parameters()]
            described.append((numbers, params))
        offset = self.position.ep_rank * self.local_experts
        return stage_slots(described, self.adapter, self.position.sizes, offset, predictive_gate)

    def gathered(self, slots: Sequence[ParamSlot]) -> Iterator[tuple[str, torch.Tensor]]:
        """Run the collectives of ``slots``; on the pusher yield ``(global name, tensor)``.

        Every rank of the stage must exhaust this iterator (it drives the collectives).
        """
        params = [dict(chunk.named_parameters()) for chunk in self.chunks]
        for slot in slots:
            tensor = params[slot.chunk][slot.local_name].detach()
            produced = self._expert(slot, tensor) if slot.expert else self._dense(slot, tensor)
            if produced and self.position.is_pusher:
                yield from produced

    def _dense(self, slot: ParamSlot, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        pos = self.position
        if not pos.dense_member:
            return []
        if slot.tp_axis is not None and pos.sizes.tp > 1:
            tensor = _merged_shards(tensor, slot, self.groups.tp, pos.tp_rank, pos.sizes.tp)
        return [(slot.global_name, tensor)] if tensor is not None else []

    def _expert(self, slot: ParamSlot, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        pos = self.position
        if not pos.expert_member:
            return []
        if slot.tp_axis is not None and pos.sizes.etp > 1:
            tensor = _merged_shards(tensor, slot, self.groups.expt_tp, pos.etp_rank,
                                    pos.sizes.etp)
        elif pos.etp_rank != 0:
            return []
        if tensor is None:
            return []
        if pos.sizes.ep == 1:
            return [(slot.global_name, tensor)]
        per_rank = _gather_to_first(tensor, self.groups.ep, pos.ep_rank, pos.sizes.ep)
        if per_rank is None:
            return []
        return [(self._expert_name(slot.global_name, rank), t) for rank, t in enumerate(per_rank)]

    def _expert_name(self, name: str, ep_rank: int) -> str:
        """``name`` (this rank's global expert id) for the same local expert of ``ep_rank``."""
        mine = self.position.ep_rank * self.local_experts
        return _LOCAL_EXPERT.sub(
            lambda m: f".local_experts.{int(m.group(1)) - mine + ep_rank * self.local_experts}.",
            name)


def _merged_shards(tensor: torch.Tensor, slot: ParamSlot, group, rank: int,
                   size: int) -> torch.Tensor | None:
    """The whole parameter from its tensor-parallel shards, on group rank 0 (None elsewhere)."""
    shards = _gather_to_first(tensor, group, rank, size)
    return None if shards is None else merge_tp_shards(shards, slot.tp_axis, slot.glu)


def _gather_to_first(tensor: torch.Tensor, group, rank: int, size: int) -> list | None:
    """Every rank's ``tensor`` on group rank 0 (None elsewhere)."""
    tensor = tensor.contiguous()
    shards = [torch.empty_like(tensor) for _ in range(size)] if rank == 0 else None
    dist.gather(tensor, shards, group=group, group_dst=0)
    return shards
