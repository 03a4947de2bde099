"""Tensor rules: how one group of HF tensors becomes one group of Megatron tensors and back.

Pure tensor math and naming, no I/O and no distributed code. Every rule knows

* its names on both sides (``hf_names``, ``megatron_names``),
* the expected shapes (for refusing mismatched checkpoints before any data is read),
* the exact, lossless transforms in both directions,
* how the Megatron tensor is split by tensor parallelism (``tp_axis``, ``glu``), which the
  checkpoint writer uses to lay chunks out for a target layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_pr2.convert.errors import ConversionError

Shape = tuple[int, ...]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` (weights or biases) -> Megatron ``linear_qkv``.

    Megatron interleaves per query group: ``[q heads of group g; k_g; v_g]`` for g = 0..G-1,
    so that a tensor-parallel split along dim 0 keeps whole groups together.
    """
    rest = q.shape[1:]
    groups = [t.reshape(num_query_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, q_rows: int, kv_rows: int):
    """Inverse of :func:`fuse_qkv`; ``q_rows``/``kv_rows`` are the HF row counts of q and k/v."""
    rest = qkv.shape[1:]
    q_per_group, kv_per_group = q_rows // num_query_groups, kv_rows // num_query_groups
    grouped = qkv.reshape(num_query_groups, q_per_group + 2 * kv_per_group, *rest)
    q, k, v = torch.split(grouped, [q_per_group, kv_per_group, kv_per_group], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def fuse_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj`` and ``up_proj`` -> Megatron ``linear_fc1`` = ``[gate; up]``."""
    return torch.cat([gate, up], dim=0)


def split_glu(fc1: torch.Tensor):
    """Inverse of :func:`fuse_glu`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """A lossless 1:1 rename (the base case); subclasses fuse several HF tensors into one.

    Attributes:
        hf_names: HF tensor names, in the order the transform expects them.
        megatron_name: the Megatron (single-process ``state_dict``) name.
        hf_shapes: expected HF shapes, one per name.
        tp_axis: axis along which tensor parallelism splits the Megatron tensor (None = replicated).
        glu: the Megatron tensor is ``[gate; up]`` and each TP rank holds ``[gate_r; up_r]``.
        layer: global decoder layer index, None for embedding / final norm / output layer.
        expert: global routed-expert id for expert weights, else None.
    """

    hf_names: tuple[str, ...]
    megatron_name: str
    hf_shapes: tuple[Shape, ...]
    tp_axis: int | None = None
    glu: bool = False
    layer: int | None = None
    expert: int | None = None

    @property
    def megatron_shape(self) -> Shape:
        return self.hf_shapes[0]

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return hf_tensors[0]

    def to_hf(self, megatron_tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (megatron_tensor,)

    def to_megatron_blocks(self, hf_tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The Megatron tensor as row blocks whose dim-0 concatenation is :meth:`to_megatron`
        (lets writers cut chunks without building the fused tensor)."""
        return [self.to_megatron(hf_tensors)]

    def check_hf_shapes(self, shapes: Sequence[Shape]) -> None:
        """Raise :class:`ConversionError` naming the tensor whose shape differs."""
        for name, want, got in zip(self.hf_names, self.hf_shapes, shapes):
            if tuple(got) != tuple(want):
                raise ConversionError(
                    f"shape mismatch for {name}: checkpoint has {tuple(got)}, the config "
                    f"implies {tuple(want)}"
                )


@dataclasses.dataclass(frozen=True)
class GluRule(TensorRule):
    """``gate_proj`` + ``up_proj`` -> ``linear_fc1``."""

    @property
    def megatron_shape(self) -> Shape:
        rows, cols = self.hf_shapes[0]
        return (2 * rows, cols)

    def to_megatron(self, hf_tensors):
        return fuse_glu(*hf_tensors)

    def to_megatron_blocks(self, hf_tensors):
        return list(hf_tensors)

    def to_hf(self, megatron_tensor):
        return split_glu(megatron_tensor)


@dataclasses.dataclass(frozen=True)
class QkvRule(TensorRule):
    """``q_proj`` + ``k_proj`` + ``v_proj`` (weight or bias) -> ``linear_qkv``."""

    num_query_groups: int = 1

    @property
    def megatron_shape(self) -> Shape:
        rows = sum(shape[0] for shape in self.hf_shapes)
        return (rows, *self.hf_shapes[0][1:])

    def to_megatron(self, hf_tensors):
        return fuse_qkv(*hf_tensors, num_query_groups=self.num_query_groups)

    def to_hf(self, megatron_tensor):
        return split_qkv(megatron_tensor, self.num_query_groups, self.hf_shapes[0][0],
                         self.hf_shapes[1][0])


@dataclasses.dataclass(frozen=True)
class PredictiveGateRule:
    """Megatron ``router.weight`` (W_r) + PR2 predictor weight (W_p, stored [E, H]) -> HF gate.

    Because the predictor is linear, ``p + h W_p^T = h (W_r + W_p)^T`` with both stored as
    ``[E, H]``: an unmodified HF/SGLang router with this gate routes with ``TopK(p + h W_p^T)``.
    One-way (Megatron -> HF): the sum cannot be split back.
    """

    router_name: str
    predictor_name: str
    hf_name: str
    shape: Shape

    @property
    def megatron_names(self) -> tuple[str, str]:
        return (self.router_name, self.predictor_name)

    def to_hf(self, router_weight: torch.Tensor, predictor_weight: torch.Tensor) -> torch.Tensor:
        if tuple(predictor_weight.shape) != tuple(self.shape):
            raise ConversionError(
                f"{self.predictor_name} has shape {tuple(predictor_weight.shape)}; the "
                f"predictive gate needs [num_experts, hidden] = {tuple(self.shape)}"
            )
        summed = router_weight.float() + predictor_weight.float()
        return summed.to(router_weight.dtype)
