"""Compare a Megatron model with its HF twin: logits and per-layer top-k routes.

HF routes come from forward hooks on ``model.model.layers[i].mlp.gate`` (its third output is
the top-k expert ids); Megatron routes from hooks on each ``mlp.router`` (its second output is
the ``[S*B, E]`` routing map, sequence-first).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch


@dataclasses.dataclass
class Comparison:
    """Result of running both models on the same tokens."""

    max_abs_logit_diff: float
    route_agreement: dict[int, float]   # global layer -> fraction of tokens with equal top-k set

    @property
    def min_route_agreement(self) -> float:
        return min(self.route_agreement.values(), default=1.0)


@contextlib.contextmanager
def _capture_routes(modules: dict[int, torch.nn.Module], routes_of):
    """Yield ``{layer: routes_of(output)}``, filled by forward hooks on ``modules`` during the
    block's forward passes and removed after it."""
    routes: dict[int, torch.Tensor] = {}

    def hook_for(index):
        def hook(module, args, output):
            routes[index] = routes_of(output)
        return hook

    handles = [module.register_forward_hook(hook_for(index)) for index, module in modules.items()]
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


def capture_hf_routes(hf_model):
    """Context manager yielding ``{layer: [B*S, K] sorted expert ids}`` filled by the next
    forward passes."""
    gates = {index: layer.mlp.gate for index, layer in enumerate(hf_model.model.layers)
             if hasattr(getattr(layer.mlp, "gate", None), "top_k")}
    return _capture_routes(gates, lambda output: output[2].sort(dim=-1).values)


def capture_megatron_routes(model, batch_size: int):
    """Context manager yielding ``{global layer: [B*S, K] sorted expert ids}`` (batch-first,
    like HF)."""
    routers = {layer.layer_number - 1: layer.mlp.router for layer in model.decoder.layers
               if getattr(layer.mlp, "router", None) is not None}
    return _capture_routes(routers, lambda output: _batch_first_ids(output[1], batch_size))


def _batch_first_ids(routing_map: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[S*B, E]`` sequence-first routing map -> ``[B*S, K]`` sorted expert ids."""
    num_experts = routing_map.shape[-1]
    top_k = int(routing_map[0].sum())
    by_seq = routing_map.reshape(-1, batch_size, num_experts).transpose(0, 1)
    ids = by_seq.reshape(-1, num_experts).nonzero()[:, 1].reshape(-1, top_k)
    return ids.sort(dim=-1).values


@torch.no_grad()
def hf_forward(hf_model, tokens: torch.Tensor):
    """``(logits [B, S, V] fp32, routes)`` of an HF causal LM."""
    with capture_hf_routes(hf_model) as routes:
        logits = hf_model(input_ids=tokens).logits.float()
    return logits, dict(routes)


@torch.no_grad()
def megatron_forward(model, tokens: torch.Tensor):
    """``(logits [B, S, V] fp32, routes)`` of a single-stage, non-TP Megatron ``GPTModel``."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with capture_megatron_routes(model, tokens.shape[0]) as routes:
        logits = model(tokens, positions, attention_mask=None).float()
    return logits, dict(routes)


def route_agreement(routes_a: dict, routes_b: dict) -> dict[int, float]:
    """Per layer, the fraction of tokens whose top-k expert sets are identical."""
    if routes_a.keys() != routes_b.keys():
        raise ValueError(f"MoE layers differ: {sorted(routes_a)} vs {sorted(routes_b)}")
    return {layer: (routes_a[layer] == routes_b[layer]).all(dim=-1).float().mean().item()
            for layer in sorted(routes_a)}


def compare_models(hf_model, megatron_model, tokens: torch.Tensor) -> Comparison:
    """Run both models on ``tokens`` and compare logits and routes."""
    hf_logits, hf_routes = hf_forward(hf_model, tokens)
    mg_logits, mg_routes = megatron_forward(megatron_model, tokens)
    diff = (hf_logits - mg_logits.to(hf_logits.device)).abs().max().item()
    mg_routes = {k: v.to(hf_logits.device) for k, v in mg_routes.items()}
    return Comparison(max_abs_logit_diff=diff, route_agreement=route_agreement(hf_routes, mg_routes))
