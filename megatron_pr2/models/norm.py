"""RMSNorm that works with sequence parallelism (Megatron's torch-norm wrapper refuses it)."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm computed in fp32, HF-Qwen style, with SP-aware weights.

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the
    sequence with a replicated weight, so the weight's gradient must be all-reduced over the
    tensor-parallel group. Marking the weight ``sequence_parallel`` makes Megatron's
    ``finalize_model_grads`` do exactly that.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused_kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden = hidden_states.float()
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return self.weight * hidden.to(input_dtype)
