"""Precision, MoE dispatch and FP8 options -> ``TransformerConfig`` fields, and the refusals that
keep a replayed routing map unchanged on its way to the experts.

R2/R3/PR2 replay a routing map recorded elsewhere; anything in Megatron-Core that rewrites the map
after the router (padding routes for quantisation, capacity limits, token dropping) would train
on routes other than the replayed ones, so such settings are refused by name. FP8 GEMMs instead
get their alignment by padding whole tokens: each rank's token count (:func:`fp8_token_multiple`)
and, inside TransformerEngine's grouped experts, each expert's slice (``Fp8Padding``, which pads
rows after dispatch and leaves the routing map alone).
"""

from __future__ import annotations

import torch

FP8_ALIGNMENT = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}
"""Token-count multiple TransformerEngine's FP8 GEMMs need, per FP8 recipe (Megatron-Core's
``get_fp8_align_size``)."""

ROUTE_REWRITING_FIELDS = {
    "moe_router_padding_for_quantization": "pads the routing map with extra experts per token",
    "moe_router_padding_for_fp8": "pads the routing map with extra experts per token",
    "moe_expert_capacity_factor": "drops tokens beyond each expert's capacity",
    "moe_pad_expert_input_to_capacity": "pads every expert's input to its capacity",
}


class RouteRewriteError(ValueError):
    """A Megatron-Core MoE setting would change replayed routes before they reach the experts."""


def precision_overrides(bf16: bool) -> dict:
    """``TransformerConfig`` fields for ``--bf16`` (parameters are built in fp32 and cast by
    ``Float16Module``; pipeline stages exchange bf16 activations)."""
    if not bf16:
        return {}
    return {"bf16": True, "pipeline_dtype": torch.bfloat16}


def token_dispatcher_type(requested: str | None, expert_parallel_size: int) -> str:
    """``--moe-token-dispatcher-type``, defaulting to alltoall when experts are split (EP > 1)."""
    if requested is not None:
        return requested
    return "alltoall" if expert_parallel_size > 1 else "allgather"


def fp8_token_multiple(fp8_format: str | None, fp8_recipe: str) -> int:
    """The multiple each rank's per-sequence token count is padded to (1 without FP8)."""
    if not fp8_format:
        return 1
    if fp8_recipe not in FP8_ALIGNMENT:
        raise ValueError(f"unknown --fp8-recipe {fp8_recipe!r}; choose one of "
                         f"{', '.join(FP8_ALIGNMENT)}")
    return FP8_ALIGNMENT[fp8_recipe]


def moe_overrides(model_args, parallel) -> dict:
    """``TransformerConfig`` fields for dispatch, grouped GEMM and FP8 from the run config."""
    fields = {
        "moe_token_dispatcher_type": token_dispatcher_type(
            model_args.moe_token_dispatcher_type, parallel.expert_model_parallel_size),
        "moe_grouped_gemm": bool(model_args.moe_grouped_gemm),
    }
    if model_args.fp8_format:
        fields.update(fp8=model_args.fp8_format, fp8_recipe=model_args.fp8_recipe)
    return fields


def fusion_overrides(model_args) -> dict:
    """``TransformerConfig`` fields of the fusion flags (Megatron-LM names; ``--bias-swiglu-fusion``
    is Megatron's ``bias_activation_fusion``). All of them keep replayed routes exact: they fuse
    work after the router (permute) or outside the MoE block."""
    return {"moe_permute_fusion": bool(model_args.moe_permute_fusion),
            "apply_rope_fusion": bool(model_args.apply_rope_fusion),
            "bias_activation_fusion": bool(model_args.bias_swiglu_fusion),
            "gradient_accumulation_fusion": bool(model_args.gradient_accumulation_fusion)}


def check_routes_reach_experts(config) -> None:
    """Refuse every ``TransformerConfig`` setting that rewrites the routing map after the router.

    Raises:
        RouteRewriteError: naming each such field and what it does to the routes.
    """
    problems = [f"{name}={getattr(config, name)!r} ({effect})"
                for name, effect in ROUTE_REWRITING_FIELDS.items()
                if getattr(config, name, None) not in (None, False)]
    if problems:
        raise RouteRewriteError(
            "these Megatron-Core MoE settings change the routes between the router and the "
            "experts, so replayed (R2/R3/PR2) routes would not be the ones trained on: "
            + "; ".join(problems))
