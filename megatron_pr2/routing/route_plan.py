"""Route plans: the routes a router must replay, keyed by micro-batch id and global layer number.

Token order is the router's own: Megatron flattens hidden states sequence-first, so row
``s * B + b`` of a ``[S*B, K]`` route tensor is sequence position ``s`` of sample ``b`` (after any
sequence-parallel slicing, each rank holds only its own rows). ``valid`` marks rows that carry a
route; invalid rows (padding, prompt positions without a route) are routed live by the router.
Routes stay compact (uint8 for E <= 256, int16 above) until a router widens them for use.
"""

from __future__ import annotations

import dataclasses

import torch


def compact_route_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds expert ids ``0..num_experts-1``."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


@dataclasses.dataclass
class LayerRoutes:
    """Routes of one MoE layer for one micro-batch, in the router's token order.

    Attributes:
        expert_ids: ``[N, K]`` integer expert ids (compact dtype).
        valid: ``[N]`` bool; False rows are routed live.
    """

    expert_ids: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self):
        if self.expert_ids.dim() != 2:
            raise ValueError(f"expert_ids must be [N, K], got shape {tuple(self.expert_ids.shape)}")
        if self.valid.shape != self.expert_ids.shape[:1] or self.valid.dtype != torch.bool:
            raise ValueError(
                f"valid must be a bool tensor of shape [{self.expert_ids.shape[0]}], got "
                f"{self.valid.dtype} {tuple(self.valid.shape)}"
            )

    @classmethod
    def from_expert_ids(cls, expert_ids: torch.Tensor, num_experts: int,
                        valid: torch.Tensor | None = None) -> LayerRoutes:
        """Routes from ``[N, K]`` ids of any integer dtype, stored compactly (all valid by default)."""
        if valid is None:
            valid = torch.ones(expert_ids.shape[0], dtype=torch.bool, device=expert_ids.device)
        return cls(expert_ids.to(compact_route_dtype(num_experts)), valid)

    def widened(self, device=None) -> torch.Tensor:
        """The expert ids as ``int64`` (what ``torch.gather``/``scatter`` need), on ``device``."""
        return self.expert_ids.to(device=device or self.expert_ids.device, dtype=torch.long)


@dataclasses.dataclass
class RoutePlan:
    """Routes for every (micro-batch id, global layer number) a rank will run.

    Global layer numbers are Megatron's 1-based ``layer_number`` (pipeline offset and virtual
    pipeline chunks included); dense layers simply have no entry.
    """

    routes: dict[tuple[int, int], LayerRoutes] = dataclasses.field(default_factory=dict)

    def add(self, microbatch_id: int, layer_number: int, layer_routes: LayerRoutes) -> None:
        key = (microbatch_id, layer_number)
        if key in self.routes:
            raise ValueError(f"route plan already has micro-batch {microbatch_id}, layer {layer_number}")
        self.routes[key] = layer_routes

    def get(self, microbatch_id: int, layer_number: int) -> LayerRoutes:
        try:
            return self.routes[(microbatch_id, layer_number)]
        except KeyError:
            have = sorted({layer for _, layer in self.routes})
            raise KeyError(
                f"route plan has no routes for micro-batch {microbatch_id}, layer {layer_number} "
                f"(layers present: {have})"
            ) from None

    def layer_numbers(self) -> list[int]:
        return sorted({layer for _, layer in self.routes})

    def microbatch_ids(self) -> list[int]:
        return sorted({mb for mb, _ in self.routes})

    def select(self, microbatch_ids) -> RoutePlan:
        """A plan with only the given micro-batch ids (e.g. one mini-step's share). An empty plan
        (a pipeline stage without MoE layers) selects to an empty plan."""
        wanted = set(microbatch_ids)
        missing = wanted - set(self.microbatch_ids())
        if missing and self.routes:
            raise KeyError(f"route plan has no micro-batches {sorted(missing)}")
        return RoutePlan({key: r for key, r in self.routes.items() if key[0] in wanted})

    def keys_for_layer(self, layer_number: int) -> list[tuple[int, int]]:
        """The ``(micro-batch id, layer)`` keys of one layer, sorted."""
        return sorted(key for key in self.routes if key[1] == layer_number)
