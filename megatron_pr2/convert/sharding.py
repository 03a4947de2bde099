"""Target parallel layout: validation, distributed-checkpoint keys and chunk layout.

A converted checkpoint is a Megatron-Core ``torch_dist`` distributed checkpoint: every tensor
is stored under the key Megatron's ``sharded_state_dict()`` gives it, with its *global* shape,
so a model with any TP/PP/EP layout loads it (Megatron reshards on load). The layout given at
conversion time is validated against the model, recorded in the checkpoint metadata and used
to cut each tensor into the chunks that layout's ranks read, so that loading with it reads
exactly what each rank needs.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.models.divisibility import division_problems
from megatron_pr2.models.hf_config import QwenMoeSizes

# tools/convert.py names the sizes --tp --pp --ep --etp.
_CONVERT_FLAGS = {"tp": "--tp", "pp": "--pp", "vpp": "--vpp", "ep": "--ep", "etp": "--etp"}
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class TargetParallelism:
    """Tensor / pipeline / expert (/ expert-tensor) parallel sizes, Megatron-LM names."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def as_dict(self) -> dict:
        return {"tensor_model_parallel_size": self.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
                "expert_model_parallel_size": self.expert_model_parallel_size,
                "expert_tensor_parallel_size": self.etp}

    def validate(self, spec: QwenMoeSizes) -> None:
        """Raise :class:`ConversionError` naming the first size that does not divide the model."""
        tp, pp, ep, etp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                           self.expert_model_parallel_size, self.etp)
        for name, size in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp)):
            if size < 1:
                raise ConversionError(f"{name} must be >= 1, got {size}")
        problems = division_problems(spec, tp=tp, pp=pp, ep=ep, etp=etp, flags=_CONVERT_FLAGS)
        if problems:
            raise ConversionError(f"the layout does not divide the model: {problems[0]}")


@dataclasses.dataclass(frozen=True)
class DistKey:
    """Where a single-process Megatron tensor lives in the distributed checkpoint.

    Routed experts of a layer share one key with a prepended expert axis (global shape
    ``[num_experts, *shape]``), exactly as Megatron's ``SequentialMLP.sharded_state_dict``
    stores them; every other tensor is stored under its own name.
    """

    key: str
    prepend: tuple[int, int] | None = None   # (index, count) along the prepended axis

    def global_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ((self.prepend[1],) if self.prepend else ()) + tuple(shape)


def dist_key(megatron_name: str, num_experts: int) -> DistKey:
    """The distributed-checkpoint key of a single-process Megatron tensor name."""
    match = _EXPERT.match(megatron_name)
    if match is None:
        return DistKey(megatron_name)
    prefix, expert, rest = match.groups()
    return DistKey(f"{prefix}experts.{rest}", (int(expert), num_experts))


def tp_chunks(shape: tuple[int, ...], tp_axis: int | None, glu: bool,
              tp: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offset, size)`` of the pieces a tensor-parallel group of ``tp`` ranks holds.

    A GLU ``linear_fc1`` (``[gate; up]``) is held as ``[gate_r; up_r]`` on rank r, so it is cut
    into ``2 * tp`` pieces along dim 0, even for ``tp = 1`` (Megatron's SwiGLU sharded factory
    does the same; each piece is then a slice of one HF tensor, written without a copy).
    """
    if tp_axis is None or (tp == 1 and not glu):
        return [(tuple(0 for _ in shape), tuple(shape))]
    pieces = 2 * tp if glu else tp
    step = shape[tp_axis] // pieces
    chunks = []
    for i in range(pieces):
        offset = [0] * len(shape)
        size = list(shape)
        offset[tp_axis], size[tp_axis] = i * step, step
        chunks.append((tuple(offset), tuple(size)))
    return chunks


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
# TransformerEngine's grouped experts name the i-th local expert's weight ``linear_fc1.weight{i}``.
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def global_megatron_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """A rank's parameter name -> the single-process name the adapter expects.

    Args:
        local_name: name in this rank's model chunk (``decoder.layers.{local}...``,
            ``local_experts.{local}``, or TransformerEngine's ``experts.linear_fc1.weight{local}``).
        layer_offset: global index of the chunk's first layer (pipeline / virtual stage offset,
            e.g. ``chunk.decoder.layers[0].layer_number - 1``).
        expert_offset: global id of this rank's first expert (EP rank * local experts).
    """
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name)
    name = _GROUPED_EXPERT.sub(
        lambda m: f".mlp.experts.local_experts.{m.group(3)}.{m.group(1)}.{m.group(2)}", name)
    return _LOCAL_EXPERT.sub(
        lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + expert_offset}.", name)


def merge_tp_shards(shards, tp_axis: int | None, glu: bool):
    """Inverse of tensor-parallel sharding: the full tensor from the ranks' pieces, in rank order.

    A GLU ``linear_fc1`` shard is ``[gate_r; up_r]``; the full tensor is ``[gate; up]``.
    """
    import torch

    if tp_axis is None or len(shards) == 1:
        return shards[0]
    if glu:
        gates, ups = zip(*(torch.chunk(shard, 2, dim=0) for shard in shards))
        return torch.cat([*gates, *ups], dim=0)
    return torch.cat(list(shards), dim=tp_axis)
