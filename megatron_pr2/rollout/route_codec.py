"""Routed-experts wire codec: decode, check and compact the routes an engine returns (pure).

Wire format (SGLang ``meta_info["routed_experts"]``): base64 of a C-order int32 array
``[seqlen - 1 - start_len, num_hidden_layers, top_k]``; row ``t`` is the route used when the
engine processed input position ``start_len + t``. SGLang sizes the layer axis by
``num_hidden_layers`` and writes only MoE layers: entries of dense layers (``mlp_only_layers``,
``decoder_sparse_step``) stay zero. :func:`select_moe_layers` keeps the MoE layers in order, so
a :class:`~megatron_pr2.rollout.sample.Sample` holds ``[T-1, L_moe, K]``. Decoding is strict: a
payload must have exactly the size its declared layer axis implies (``wire_layers``: ``all``,
as SGLang sends, or ``moe`` only when asked for).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging

import numpy as np
import torch

from megatron_pr2.rollout.engine import MalformedResponseError
from megatron_pr2.routing.route_plan import compact_route_dtype

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RouteShape:
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
    def from_hf_config(cls, hf_config) -> RouteShape:
        """Layout of a Qwen-MoE HF config (dict, path, or parsed ``QwenMoeSizes``)."""
        from megatron_pr2.models.hf_config import QwenMoeSizes, parse_hf_config

        if isinstance(hf_config, QwenMoeSizes):
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


WIRE_LAYERS = ("all", "moe")  # the layer axis of a payload: every decoder layer, or MoE only


def _base64_decoder():
    """SIMD ``pybase64`` when installed (~10x Python's ``base64``), else the standard library."""
    try:
        import pybase64

        return pybase64.b64decode
    except ImportError:
        logger.info("pybase64 is not installed: decoding routes with Python's base64 "
                    "(about 10x slower; pip install pybase64)")
        return base64.b64decode


_b64decode = _base64_decoder()


def wire_layer_count(route_shape: RouteShape, wire_layers: str = "all") -> int:
    """Layers on a payload's layer axis: ``all`` (what SGLang sends) or ``moe`` (explicit option)."""
    if wire_layers not in WIRE_LAYERS:
        raise ValueError(f"wire_layers must be one of {WIRE_LAYERS}, got {wire_layers!r}")
    return route_shape.num_hidden_layers if wire_layers == "all" else route_shape.num_moe_layers


def decode_wire_routes(payload, num_rows: int, num_layers: int, top_k: int) -> np.ndarray:
    """Decode a base64 int32 payload into a read-only ``[num_rows, num_layers, top_k]`` view.

    Raises:
        MalformedResponseError: not a string, not base64, or the wrong number of entries.
    """
    if not isinstance(payload, str):
        raise MalformedResponseError(
            f"routed_experts must be a base64 string, got {type(payload).__name__}"
        )
    try:
        raw = _b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponseError(f"routed_experts is not valid base64: {exc}") from None
    expected = num_rows * num_layers * top_k
    if len(raw) != expected * 4:
        actual = len(raw) / 4
        raise MalformedResponseError(
            f"routed_experts has {actual:g} int32 entries ({len(raw)} bytes), expected {expected} "
            f"= {num_rows} rows x {num_layers} layers x top-{top_k} (payload holds "
            f"{actual / (num_layers * top_k):g} rows: truncated, re-prefilled, or wrong dtype/layer "
            "count)"
        )
    return np.frombuffer(raw, dtype="<i4").reshape(num_rows, num_layers, top_k)


def select_moe_layers(routes: np.ndarray, route_shape: RouteShape, wire_layers: str = "all") -> np.ndarray:
    """Keep the MoE layers of ``[N, L_wire, K]`` routes whose layer axis is ``wire_layers``."""
    expected = wire_layer_count(route_shape, wire_layers)
    if routes.ndim != 3 or routes.shape[1] != expected:
        raise MalformedResponseError(
            f"routed_experts has {routes.shape[1] if routes.ndim == 3 else '?'} layers; expected "
            f"{expected} ({wire_layers} layers)"
        )
    if wire_layers == "moe" or route_shape.num_moe_layers == route_shape.num_hidden_layers:
        return routes
    return routes[:, list(route_shape.moe_layer_indices), :]


def _numpy_compact_dtype(route_shape: RouteShape) -> np.dtype:
    return torch.empty(0, dtype=route_shape.compact_dtype).numpy().dtype


def _check_range_array(array: np.ndarray, route_shape: RouteShape) -> None:
    """Ids in ``[0, E)``: one pass (negatives wrap to large unsigned values)."""
    if array.size == 0:
        return
    unsigned = array.view(np.dtype(f"<u{array.itemsize}")) if array.dtype.kind == "i" else array
    if int(unsigned.max()) < route_shape.num_experts:
        return  # fast path; locate the offender only on failure
    wide = array.astype(np.int64)
    bad = (wide < 0) | (wide >= route_shape.num_experts)
    token, layer, k = (int(v[0]) for v in np.nonzero(bad))
    raise MalformedResponseError(
        f"expert id {int(wide[token, layer, k])} out of range "
        f"[0, {route_shape.num_experts}) at token {token}, MoE layer {layer}"
    )


def _check_repeats_array(array: np.ndarray, route_shape: RouteShape) -> None:
    """Ids already known to be in range (any integer dtype)."""
    if array.size == 0:
        return
    if route_shape.top_k == 1:
        if array.shape[0] > 1:
            zero_layers = np.flatnonzero(~array.any(axis=(0, 2))).tolist()
            if zero_layers:
                raise MalformedResponseError(
                    f"MoE layers {zero_layers} route every token to expert 0 (all-zero layers)"
                )
        return
    repeated = _repeated_rows(array.reshape(-1, route_shape.top_k))
    if repeated is None:
        return
    token, layer = divmod(repeated, array.shape[1])
    all_zero = not array[:, layer].any()
    raise MalformedResponseError(
        f"MoE layer {layer} (global layer {route_shape.moe_layer_numbers[layer]}) repeats an "
        f"expert id within a top-{route_shape.top_k} at token {token}: "
        f"{array[token, layer].tolist()}"
        + (" (the layer is all zeros: lost pipeline stage or unwritten layer?)" if all_zero else "")
    )


def _repeated_rows(rows: np.ndarray) -> int | None:
    """Index of the first ``[M, K]`` row holding an id twice, or None."""
    top_k = rows.shape[1]
    columns = np.ascontiguousarray(rows.T)  # [K, M]: contiguous rows for the vector compares
    repeated = np.zeros(columns.shape[1], dtype=bool)
    for shift in range(1, top_k):  # column i against column i + shift, all i in one compare
        repeated |= np.equal(columns[:top_k - shift], columns[shift:]).any(axis=0)
    if not repeated.any():
        return None
    return int(np.flatnonzero(repeated)[0])


def decode_routed_experts(payload, *, num_rows: int, route_shape: RouteShape,
                          wire_layers: str = "all") -> torch.Tensor:
    """Wire payload -> checked, compact ``[num_rows, L_moe, K]`` routes.

    ``num_rows`` is ``seqlen - 1 - start_len`` for the request. The payload must hold exactly
    ``num_rows x L_wire x K`` int32 entries, with ``L_wire`` all decoder layers (what SGLang
    sends) or, only when asked with ``wire_layers="moe"``, the MoE layers; any other size is
    refused (sizes are never guessed: a cut-short payload can coincide with the other layer axis).
    """
    layers = wire_layer_count(route_shape, wire_layers)
    wire = decode_wire_routes(payload, num_rows, layers, route_shape.top_k)
    routes = select_moe_layers(wire, route_shape, wire_layers)
    _check_range_array(routes, route_shape)
    compact = np.ascontiguousarray(routes, dtype=_numpy_compact_dtype(route_shape))  # exact: ids < E
    _check_repeats_array(compact, route_shape)
    return torch.from_numpy(compact)
