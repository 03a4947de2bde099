"""Routed-experts wire codec: decode, check and compact the routes an engine returns (pure).

Wire format (SGLang ``meta_info["routed_experts"]``): base64 of a C-order int32 array
``[seqlen - 1 - start_len, num_hidden_layers, top_k]``; row ``t`` is the route used when the
engine processed input position ``start_len + t``. SGLang sizes the layer axis by
``num_hidden_layers`` and writes only MoE layers: entries of dense layers (``mlp_only_layers``,
``decoder_sparse_step``) stay zero. :func:`select_moe_layers` keeps the MoE layers in order, so
a :class:`~megatron_pr2.rollout.sample.Sample` holds ``[T-1, L_moe, K]``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

import numpy as np
import torch

from megatron_pr2.rollout.engine import MalformedResponseError
from megatron_pr2.routing.route_plan import compact_route_dtype


@dataclasses.dataclass(frozen=True)
class RouteLayout:
    """Shape facts of a model's routes.

    Attributes:
        num_hidden_layers: decoder layers (the engine's layer axis).
        moe_layer_indices: 0-based indices of the MoE layers, ascending.
        top_k: experts per token.
        num_experts: routed experts per layer.
    """

    num_hidden_layers: int
    moe_layer_indices: tuple[int, ...]
    top_k: int
    num_experts: int

    def __post_init__(self):
        idx = self.moe_layer_indices
        if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= self.num_hidden_layers:
            raise ValueError(
                f"moe_layer_indices {idx} must be ascending, unique, within "
                f"[0, {self.num_hidden_layers})"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")

    @classmethod
    def from_hf_config(cls, hf_config) -> RouteLayout:
        """Layout of a Qwen-MoE HF config (dict, path, or parsed ``QwenMoeSpec``)."""
        from megatron_pr2.models.hf_config import QwenMoeSpec, parse_hf_config

        if isinstance(hf_config, QwenMoeSpec):
            spec = hf_config
        else:
            spec = parse_hf_config(hf_config)
        return cls(spec.num_layers, tuple(spec.moe_layer_indices), spec.top_k, spec.num_experts)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def moe_layer_numbers(self) -> tuple[int, ...]:
        """Megatron's 1-based global layer numbers of the MoE layers."""
        return tuple(i + 1 for i in self.moe_layer_indices)

    @property
    def compact_dtype(self) -> torch.dtype:
        return compact_route_dtype(self.num_experts)


def decode_wire_routes(payload, num_rows: int, num_layers: int, top_k: int) -> np.ndarray:
    """Decode a base64 int32 payload into ``[num_rows, num_layers, top_k]``.

    Raises:
        MalformedResponseError: not a string, not base64, or the wrong number of bytes.
    """
    if not isinstance(payload, str):
        raise MalformedResponseError(
            f"routed_experts must be a base64 string, got {type(payload).__name__}"
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponseError(f"routed_experts is not valid base64: {exc}") from None
    expected = num_rows * num_layers * top_k * 4
    if len(raw) != expected:
        got_rows = len(raw) / (num_layers * top_k * 4)
        raise MalformedResponseError(
            f"routed_experts has {len(raw)} bytes, expected {expected} = {num_rows} rows x "
            f"{num_layers} layers x top-{top_k} x int32 (payload holds {got_rows:g} rows: "
            "truncated, re-prefilled, or wrong dtype/layer count)"
        )
    return np.frombuffer(bytearray(raw), dtype="<i4").reshape(num_rows, num_layers, top_k)


def select_moe_layers(routes: np.ndarray, layout: RouteLayout) -> np.ndarray:
    """Keep the MoE layers of ``[N, L_wire, K]`` routes (``L_wire`` = all layers or MoE only)."""
    wire_layers = routes.shape[1]
    if wire_layers == layout.num_hidden_layers:
        if layout.num_moe_layers == wire_layers:
            return routes
        return routes[:, list(layout.moe_layer_indices), :]
    if wire_layers == layout.num_moe_layers:
        return routes
    raise MalformedResponseError(
        f"routed_experts has {wire_layers} layers; expected {layout.num_hidden_layers} "
        f"(all layers) or {layout.num_moe_layers} (MoE layers)"
    )


def check_routes(routes, layout: RouteLayout) -> None:
    """Check ``[N, L_moe, K]`` routes against the layout.

    Catches ids out of ``[0, E)``, repeated ids within a token's top-k (a real top-k never
    repeats; an all-zero layer from a lost pipeline stage shows up this way), and, for top-1
    models, MoE layers that are zero for every token of a multi-token sequence.

    Raises:
        MalformedResponseError: naming the first bad layer and token.
    """
    routes = torch.as_tensor(routes).cpu()
    _check_shape(routes, layout)
    _check_range(routes, layout)
    _check_repeats(routes, layout)


def _check_shape(routes: torch.Tensor, layout: RouteLayout) -> None:
    if routes.dim() != 3 or routes.shape[1:] != (layout.num_moe_layers, layout.top_k):
        raise MalformedResponseError(
            f"routes must be [N, {layout.num_moe_layers}, {layout.top_k}], got {tuple(routes.shape)}"
        )
    if routes.is_floating_point():
        raise MalformedResponseError(f"routes must be integers, got {routes.dtype}")


def _check_range(routes: torch.Tensor, layout: RouteLayout) -> None:
    if routes.numel() == 0:
        return
    array = routes.numpy()
    if int(array.min()) >= 0 and int(array.max()) < layout.num_experts:
        return  # fast path; locate the offender only on failure
    wide = array.astype(np.int64)
    bad = (wide < 0) | (wide >= layout.num_experts)
    token, layer, k = (int(v[0]) for v in np.nonzero(bad))
    raise MalformedResponseError(
        f"expert id {int(wide[token, layer, k])} out of range "
        f"[0, {layout.num_experts}) at token {token}, MoE layer {layer}"
    )


def _check_repeats(routes: torch.Tensor, layout: RouteLayout) -> None:
    """Ids already known to be in range (any integer dtype)."""
    if routes.numel() == 0:
        return
    array = routes.numpy()
    if layout.top_k == 1:
        if array.shape[0] > 1:
            zero_layers = np.flatnonzero(~array.any(axis=(0, 2))).tolist()
            if zero_layers:
                raise MalformedResponseError(
                    f"MoE layers {zero_layers} route every token to expert 0 (all-zero layers)"
                )
        return
    columns = np.ascontiguousarray(array.reshape(-1, layout.top_k).T)  # [K, N*L]
    repeated = np.zeros(columns.shape[1], dtype=bool)
    for i in range(layout.top_k):  # K(K-1)/2 contiguous vector compares: cheaper than sorting
        for j in range(i + 1, layout.top_k):
            repeated |= columns[i] == columns[j]
    if not repeated.any():
        return
    token, layer = divmod(int(np.flatnonzero(repeated)[0]), array.shape[1])
    all_zero = not array[:, layer].any()
    raise MalformedResponseError(
        f"MoE layer {layer} (global layer {layout.moe_layer_numbers[layer]}) repeats an "
        f"expert id within a top-{layout.top_k} at token {token}: "
        f"{array[token, layer].tolist()}"
        + (" (the layer is all zeros: lost pipeline stage or unwritten layer?)" if all_zero else "")
    )


def compact_routes(routes, num_experts: int) -> torch.Tensor:
    """Routes as a tensor of the narrowest dtype that holds ids ``< num_experts``."""
    return torch.as_tensor(np.ascontiguousarray(routes)).to(compact_route_dtype(num_experts))


def decode_routed_experts(payload, *, num_rows: int, layout: RouteLayout) -> torch.Tensor:
    """Wire payload -> checked, compact ``[num_rows, L_moe, K]`` routes.

    ``num_rows`` is ``seqlen - 1 - start_len`` for the request. The wire layer count is inferred
    from the payload size (all hidden layers, or MoE layers only).
    """
    per_row_all = layout.num_hidden_layers * layout.top_k * 4
    wire_layers = layout.num_hidden_layers
    if isinstance(payload, str) and num_rows > 0:
        size = len(payload) // 4 * 3 - payload[-2:].count("=")
        if size == num_rows * layout.num_moe_layers * layout.top_k * 4 and size != num_rows * per_row_all:
            wire_layers = layout.num_moe_layers
    wire = decode_wire_routes(payload, num_rows, wire_layers, layout.top_k)
    routes = torch.from_numpy(np.ascontiguousarray(select_moe_layers(wire, layout)))
    _check_range(routes, layout)
    compact = routes.to(layout.compact_dtype)  # exact: ids are known to be < E
    _check_repeats(compact, layout)
    return compact
