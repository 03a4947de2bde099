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


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _model_main_pairs(optimizer):
    """``(model param, main param)`` pairs of one (not chained) Megatron optimizer."""
    if hasattr(optimizer, "shard_fp32_from_float16_groups"):  # distributed optimizer
        pairs = ((optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
                 (optimizer.model_fp32_groups, optimizer.shard_fp32_groups))
    elif hasattr(optimizer, "fp32_from_float16_groups"):  # bf16 params, fp32 main params
        pairs = ((optimizer.float16_groups, optimizer.fp32_from_float16_groups),
                 (optimizer.fp32_from_fp32_groups, optimizer.fp32_from_fp32_groups))
    else:  # fp32: the model parameters are the optimizer's
        params = optimizer.get_parameters()
        pairs = (([params], [params]),)
    for model_groups, main_groups in pairs:
        for model_group, main_group in zip(model_groups, main_groups):
            yield from zip(model_group, main_group)


class PolicyGradNorm:
    """Recomputes the gradient norm without the predictor weights after an optimizer step.

    Args:
        optimizer: the Megatron optimizer (its main parameters are mapped to model
            parameters once, here).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.predictor_main_ids = {
            id(main) for sub in _sub_optimizers(optimizer)
            for model, main in _model_main_pairs(sub)
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
        for sub in _sub_optimizers(self.optimizer):
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
    return coefficient if coefficient < 1.0 else 1.0
