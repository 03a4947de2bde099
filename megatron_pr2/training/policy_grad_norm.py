"""The policy's own gradient norm, without PR2's evolution-predictor weights.

Megatron's ``optimizer.step()`` reports one norm over every parameter. For the learned-predictor
methods that norm includes ``W_p``'s gradient from the predictor loss, so a mini-step whose
policy gradient is exactly 0 (every GRPO group with equal rewards) still shows a non-zero norm.
This module recomputes the norm over the optimizer's main gradients with the predictor's
excluded, with Megatron's own filters (shared and tensor-parallel duplicate parameters) and
reduction group, so it is the same quantity as Megatron's norm under every optimizer layout
(fp32, bf16 main params, distributed optimizer shards, chained optimizers).
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_pr2.routing.predictor import PREDICTOR_PARAM_ATTR
from megatron_pr2.routing.strategies.optimizer_state import (
    inner_optimizers,
    whole_model_params,
)


class PolicyGradNorm:
    """Recomputes the gradient norm without the predictor weights after an optimizer step.

    Args:
        optimizer: the Megatron optimizer (its main parameters are mapped to model
            parameters once, here).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.predictor_main_ids = {
            id(main) for inner in inner_optimizers(optimizer)
            for model, main in whole_model_params(inner)
            if getattr(model, PREDICTOR_PARAM_ATTR, False)}

    @property
    def has_predictor(self) -> bool:
        return bool(self.predictor_main_ids)

    @torch.no_grad()
    def after_step(self, total_norm: float) -> float:
        """The pre-clip norm of every main gradient but the predictor's (collective).

        Call right after a successful ``optimizer.step()`` that returned ``total_norm``: the
        main gradients are still there, scaled in place by the clip coefficient, which is undone.
        """
        squared = 0.0
        for sub in inner_optimizers(self.optimizer):
            tp_group = getattr(sub, "tp_group", None)
            grads = [p.grad for p in sub.get_parameters()
                     if p.grad is not None and id(p) not in self.predictor_main_ids
                     and param_is_not_shared(p)
                     and param_is_not_tensor_parallel_duplicate(p, tp_group)]
            norm = get_grad_norm_fp32(grads,
                                      grad_stats_parallel_group=sub.get_grad_stats_parallel_group())
            squared += float(norm) ** 2
        return math.sqrt(squared) / clip_coefficient(total_norm,
                                                     self.optimizer.config.clip_grad)


def clip_coefficient(total_norm: float, clip_grad: float) -> float:
    """The factor Megatron's clip scaled the gradients by (1 when not clipped)."""
    if not clip_grad:
        return 1.0
    coefficient = clip_grad / (total_norm + 1.0e-6)
    return min(1.0, coefficient)
