"""Adam's predicted next step of every trainable parameter, read from the optimizer's own state.

:func:`adam_param_states` is the one place that finds, for each parameter this rank updates, the
tensor the forward uses (the *model* parameter) and the Adam state that moves it (held on the
*main* parameter: the same tensor in fp32 training, the fp32 master copy under mixed precision).
:func:`adam_next_step` is the pure math:

    u = -lr * m_hat / (sqrt(v_hat) + eps) - lr * wd * theta,
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)

i.e. the step AdamW (decoupled weight decay, Megatron's default) would take if the next gradient
kept the current moments, as torch's ``AdamW`` computes it.

Under Megatron's distributed optimizer (``--use-distributed-optimizer``) each data-parallel rank
holds Adam's state for one contiguous slice of DDP's parameter buffer: the states found are those
slices (1-D views of the model parameters), and :func:`sharded_model_chunks` names the DDP chunks
whose parameter buffers must be all-gathered after a rank writes its slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch


@dataclasses.dataclass
class ParamAdamState:
    """One parameter (or parameter shard) with the Adam state that updates it.

    Attributes:
        model_param: the tensor the model's forward reads (under the distributed optimizer:
            this rank's 1-D slice of it, a view into DDP's parameter buffer).
        main_param: the tensor the optimizer updates (``model_param`` itself in fp32 training).
        exp_avg, exp_avg_sq: Adam's first and second moments (shaped like ``main_param``).
        step: optimizer steps taken (``t``).
        lr, beta1, beta2, eps, weight_decay: the parameter group's hyperparameters.
    """

    model_param: torch.Tensor
    main_param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adam_next_step(state: ParamAdamState) -> torch.Tensor:
    """``u`` for one parameter (fp32, shaped like ``main_param``); see the module docstring."""
    if state.step < 1:
        return torch.zeros_like(state.main_param, dtype=torch.float32)
    bias1 = 1.0 - state.beta1 ** state.step
    bias2 = 1.0 - state.beta2 ** state.step
    denom = (state.exp_avg_sq.float() / bias2).sqrt_().add_(state.eps)
    step = (state.exp_avg.float() / bias1).div_(denom).mul_(-state.lr)
    if state.weight_decay:
        step.add_(state.main_param.detach().float(), alpha=-state.lr * state.weight_decay)
    return step


def inner_optimizers(optimizer) -> list:
    """The optimizers a Megatron optimizer (chained, e.g. dense + expert, or not) is made of."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _model_param_of(inner) -> dict[int, torch.Tensor]:
    """``id(main param) -> model param`` where they differ (mixed-precision master copies).

    Under the distributed optimizer the model "param" is this rank's slice of the model
    parameter (a view into DDP's parameter buffer); an fp32 shard is that slice itself.
    """
    if _is_distributed(inner):
        return _distributed_model_slices(inner)
    pairs = {}
    for model_group, main_group in zip(getattr(inner, "float16_groups", []),
                                       getattr(inner, "fp32_from_float16_groups", [])):
        for model_param, main_param in zip(model_group, main_group):
            pairs[id(main_param)] = model_param
    return pairs


def whole_model_params(inner):
    """``(model parameter, main parameter)`` pairs of one (not chained) Megatron optimizer, the
    model parameter being the whole ``nn.Parameter`` (with its attributes) even where the main
    parameter is a distributed-optimizer shard of it."""
    if _is_distributed(inner):
        groups = ((inner.model_float16_groups, inner.shard_fp32_from_float16_groups),
                  (inner.model_fp32_groups, inner.shard_fp32_groups))
    elif hasattr(inner, "fp32_from_float16_groups"):
        groups = ((inner.float16_groups, inner.fp32_from_float16_groups),
                  (inner.fp32_from_fp32_groups, inner.fp32_from_fp32_groups))
    else:  # fp32 training: the model parameters are the optimizer's
        params = inner.get_parameters()
        groups = (([params], [params]),)
    for model_groups, main_groups in groups:
        for model_group, main_group in zip(model_groups, main_groups):
            yield from zip(model_group, main_group)


def _is_distributed(inner) -> bool:
    return type(inner).__name__ == "DistributedOptimizer"


def _distributed_model_slices(inner) -> dict[int, torch.Tensor]:
    """``id(fp32 main shard) -> bf16 model slice`` of a Megatron ``DistributedOptimizer``."""
    if getattr(inner.ddp_config, "use_megatron_fsdp", False):
        raise ValueError("Adam's next step cannot be read from Megatron FSDP's optimizer state: "
                         "use --use-distributed-optimizer without Megatron FSDP")
    if getattr(inner.config, "use_precision_aware_optimizer", False):
        raise ValueError("Adam's next step cannot be read with Megatron's precision-aware "
                         "optimizer (its fp32 main weights live inside the fused Adam): train "
                         "without use_precision_aware_optimizer")
    pairs = {}
    for model_group, main_group in zip(inner.shard_float16_groups,
                                       inner.shard_fp32_from_float16_groups):
        for model_slice, main_shard in zip(model_group, main_group):
            if model_slice is None:
                raise ValueError("Adam's next step cannot be written into FP8 (MXFP8/blockwise) "
                                 "parameters under the distributed optimizer: train without "
                                 "FP8 parameters")
            pairs[id(main_shard)] = model_slice
    return pairs


def sharded_model_chunks(optimizer) -> list:
    """DDP chunks whose parameters Megatron's distributed optimizer shards over data-parallel
    ranks (each rank updates its slice, then DDP all-gathers the parameter buffer); ``[]`` with
    the plain optimizer."""
    chunks = {}
    for inner in inner_optimizers(optimizer):
        if _is_distributed(inner):
            chunks.update((id(chunk), chunk) for chunk in inner.model_chunks)
    return list(chunks.values())


def _scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def adam_param_states(optimizer) -> Iterator[ParamAdamState]:
    """Every parameter (or distributed-optimizer slice) this rank's Adam updates, with its state.

    Parameters that have no state yet (no step taken) are yielded with ``step = 0`` (``u = 0``).

    Raises:
        ValueError: the optimizer is not Adam, or keeps its state where this cannot read it.
    """
    for inner in inner_optimizers(optimizer):
        if getattr(inner, "is_stub_optimizer", False):  # no parameters on this rank
            continue
        torch_optimizer = getattr(inner, "optimizer", inner)
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            raise TypeError(f"cannot read optimizer state from {type(inner).__name__}")
        model_of = _model_param_of(inner)
        for group in torch_optimizer.param_groups:
            if "betas" not in group:
                raise ValueError(f"lookahead needs Adam; got {type(torch_optimizer).__name__}")
            beta1, beta2 = group["betas"]
            for main_param in group["params"]:
                state = torch_optimizer.state.get(main_param, {})
                empty = "exp_avg" not in state
                yield ParamAdamState(
                    model_param=model_of.get(id(main_param), main_param),
                    main_param=main_param,
                    exp_avg=main_param if empty else state["exp_avg"],
                    exp_avg_sq=main_param if empty else state["exp_avg_sq"],
                    step=0 if empty else int(_scalar(state["step"])),
                    lr=_scalar(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                    eps=float(group["eps"]),
                    weight_decay=float(group.get("weight_decay", 0.0)),
                )
