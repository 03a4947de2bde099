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
def capture_hf_routes(hf_model):
    """Yield ``{layer: [B*S, K] sorted expert ids}`` filled by the next forward passes."""
    routes: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(hf_model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue

        def hook(module, args, output, index=index):
            routes[index] = output[2].sort(dim=-1).values
        handles.append(gate.register_forward_hook(hook))
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_megatron_routes(model, batch_size: int):
    """Yield ``{global layer: [B*S, K] sorted expert ids}`` (batch-first, like HF)."""
    routes: dict[int, torch.Tensor] = {}
    handles = []
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is None:
            continue

        def hook(module, args, output, index=layer.layer_number - 1):
            routing_map = output[1]
            num_experts = routing_map.shape[-1]
            top_k = int(routing_map[0].sum())
            by_seq = routing_map.reshape(-1, batch_size, num_experts).transpose(0, 1)
            ids = by_seq.reshape(-1, num_experts).nonzero()[:, 1].reshape(-1, top_k)
            routes[index] = ids.sort(dim=-1).values
        handles.append(router.register_forward_hook(hook))
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


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
