"""The evolution predictor ``W_p`` of one MoE router and its optimizer parameter group.

``W_p`` is a bias-free linear map hidden -> experts, initialised to zero, so PR2 starts out
identical to R2/R3. It is a parameter of the router module: it is saved and loaded with the
model's ``state_dict`` and ``sharded_state_dict`` (replicated over tensor parallelism, owned by
the pipeline stage of its layer, not an expert parameter). Like the router weight it is marked
``sequence_parallel`` under sequence parallelism, so Megatron's ``finalize_model_grads``
all-reduces its gradient over the tensor-parallel group (each TP rank sees its own slice of
tokens). It is trained only by the predictor loss (:mod:`megatron_pr2.routing.predictor_loss`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megatron_pr2.routing.predictor_loss import PREDICTOR_LOSSES

PREDICTOR_PARAM_ATTR = "is_evolution_predictor"
"""Attribute set on every predictor weight; selects its optimizer parameter group."""


@dataclasses.dataclass
class PredictorConfig:
    """How the evolution predictor is trained.

    Attributes:
        loss: ``kl-post`` (default), ``kl`` or ``l2``.
        sample_ratio: fraction of each micro-batch's tokens whose ``h_old, p_old`` are kept
            for the predictor loss (a uniform sample without replacement: an unbiased estimate
            of the all-token mean).
        lr_mult: learning-rate multiplier of the predictor's parameter group relative to the
            policy LR (the paper uses 1e4; on a toy, multipliers >= 10 with Adam diverged).
        seed: seed of the token subsampling.
    """

    loss: str = "kl-post"
    sample_ratio: float = 1.0
    lr_mult: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.loss not in PREDICTOR_LOSSES:
            raise ValueError(
                f"unknown predictor loss {self.loss!r}; choose one of {', '.join(PREDICTOR_LOSSES)}"
            )
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"predictor sample_ratio must be in (0, 1], got {self.sample_ratio}")
        if self.lr_mult <= 0.0:
            raise ValueError(f"predictor lr_mult must be > 0, got {self.lr_mult}")


class EvolutionPredictor(torch.nn.Module):
    """``delta = h W_p^T``: a zero-initialised, bias-free linear map hidden -> experts."""

    def __init__(self, hidden_size: int, num_experts: int, sequence_parallel: bool,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype))
        self.weight.sequence_parallel = bool(sequence_parallel)
        setattr(self.weight, PREDICTOR_PARAM_ATTR, True)

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """``[n, H] -> [n, E]`` in fp32 (like the router's logits)."""
        return F.linear(hidden_TH.to(self.weight.dtype), self.weight).float()


def predictor_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """All evolution-predictor weights in ``module`` (e.g. a model chunk)."""
    return [p for p in module.parameters() if getattr(p, PREDICTOR_PARAM_ATTR, False)]


def predictor_optimizer_overrides(optimizer_config, lr_mult: float, base_overrides=None) -> dict:
    """Megatron ``config_overrides`` giving the predictor weights their own parameter group.

    The group's ``max_lr``/``min_lr`` are the policy's times ``lr_mult`` (what Megatron's
    ``OptimizerParamScheduler`` reads) and it has no weight decay. Pass the result as
    ``get_megatron_optimizer(config, chunks, config_overrides=...)``; without a scheduler, call
    :func:`set_group_lrs_to_max` once after building the optimizer.

    Args:
        optimizer_config: ``megatron.core.optimizer.OptimizerConfig`` (its ``lr``/``min_lr``).
        lr_mult: the predictor's learning-rate multiplier.
        base_overrides: other overrides to keep; default Megatron's standard ones (no weight
            decay on biases and 1-D parameters).
    """
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    if optimizer_config.lr is None:
        raise ValueError("the optimizer config has no lr; the predictor lr is lr * lr_mult")
    if lr_mult <= 0:
        raise ValueError(f"predictor lr_mult must be > 0, got {lr_mult}")
    overrides = dict(get_standard_config_overrides(optimizer_config)
                     if base_overrides is None else base_overrides)
    if lr_mult == 1.0:
        # Megatron identifies parameter groups in optimizer checkpoints by (wd_mult, lr_mult, ...):
        # a separate group equal to the no-weight-decay group in those terms would be mixed up
        # with it on reload, so at multiplier 1 the predictor joins that group.
        overrides[ParamKey(attr=PREDICTOR_PARAM_ATTR)] = {"wd_mult": 0.0}
        return overrides
    overrides[ParamKey(attr=PREDICTOR_PARAM_ATTR)] = {
        "max_lr": optimizer_config.lr * lr_mult,
        "min_lr": (optimizer_config.min_lr or 0.0) * lr_mult,
        "lr_mult": lr_mult,
        "wd_mult": 0.0,
    }
    return overrides


def set_group_lrs_to_max(optimizer) -> None:
    """Set every parameter group's ``lr`` to its ``max_lr`` (use when no LR scheduler runs)."""
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["lr"] = group["max_lr"]
