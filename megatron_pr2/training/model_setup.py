"""Megatron-Core training wiring: precision wrapper, DDP, the Megatron optimizer and its LR schedule."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module


def wrap_with_ddp(chunks, config, overlap_grad_reduce: bool = False,
                  use_distributed_optimizer: bool = False, groups=None):
    """Wrap each model chunk in Megatron's DDP (contiguous fp32 grad buffers, bucketed reductions).

    With ``config.bf16`` each chunk is first wrapped in Megatron's ``Float16Module`` (bf16
    weights and compute; the optimizer keeps fp32 main params). ``use_distributed_optimizer``
    lays the grad buffer out for the sharded optimizer (reduce-scatter instead of all-reduce).
    ``overlap_grad_reduce`` reduces each bucket while the last micro-batch's backward runs; the
    schedule's ``no_sync_func``/``grad_sync_func`` and ``finalize_model_grads`` (which finishes
    the reductions before the optimizer step) are set on ``config`` as Megatron-LM does.
    ``groups``: the run's ``ProcessGroupCollection`` (default: Megatron's initialised groups).
    """
    if config.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(index > 0), pg_collection=groups)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk([chunk.no_sync for chunk in wrapped])
    # as Megatron-LM's --overlap-grad-reduce (with its default --align-grad-reduce): the
    # interleaved schedule starts each chunk's reduction when its last backward is done
    config.grad_sync_func = (_per_chunk([chunk.start_grad_sync for chunk in wrapped])
                             if overlap_grad_reduce else None)
    return wrapped


def _per_chunk(funcs: list):
    """Megatron's schedule config form: one function per chunk, or the function itself."""
    return funcs[0] if len(funcs) == 1 else funcs


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """Megatron-LM's optimizer flags (``--bf16``, ``--use-distributed-optimizer`` ...)."""

    lr: float
    optimizer: str = "adam"
    min_lr: float = 0.0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    bf16: bool = False
    use_distributed_optimizer: bool = False
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def megatron_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            optimizer=self.optimizer, lr=self.lr, min_lr=self.min_lr,
            weight_decay=self.weight_decay, clip_grad=self.clip_grad, bf16=self.bf16,
            fp16=False, params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            use_distributed_optimizer=self.use_distributed_optimizer, adam_beta2=self.adam_beta2,
            adam_eps=self.adam_eps,
        )


def build_optimizer(wrapped_chunks, lr: float | None = None, *, options: OptimizerOptions | None = None,
                    config_overrides: dict | None = None, **option_fields):
    """Megatron's optimizer over the DDP-wrapped chunks.

    Give either ``options`` or ``lr`` plus :class:`OptimizerOptions` fields; ``bf16`` and
    ``use_distributed_optimizer`` default to the model's (:func:`model_fixed_fields`) and must
    match it (a bf16 model under an fp32 optimizer fails at its first step). ``config_overrides``
    is Megatron's per-parameter-group override mapping (the PR2 predictor's group, no weight
    decay on norms and biases). Per-group LR and weight decay only take effect once an
    ``OptimizerParamScheduler`` runs (see :func:`build_param_scheduler`).
    """
    fixed = model_fixed_fields(wrapped_chunks)
    options = options or OptimizerOptions(lr=lr, **{**fixed, **option_fields})
    _check_matches_model(options, fixed)
    kwargs = {"config_overrides": config_overrides} if config_overrides else {}
    return get_megatron_optimizer(options.megatron_config(), wrapped_chunks, **kwargs)


def model_fixed_fields(wrapped_chunks) -> dict:
    """The optimizer fields the DDP-wrapped model already fixes: precision and grad-buffer layout."""
    first = wrapped_chunks[0]
    return {"bf16": bool(first.config.bf16),
            "use_distributed_optimizer": bool(first.ddp_config.use_distributed_optimizer)}


def _check_matches_model(options: OptimizerOptions, fixed: dict) -> None:
    for name, model_value in fixed.items():
        if getattr(options, name) != model_value:
            raise ValueError(
                f"optimizer {name}={getattr(options, name)} but the model was wrapped with "
                f"{name}={model_value}: build the optimizer with the model's precision and "
                f"grad-buffer layout")
