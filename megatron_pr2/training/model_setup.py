"""Megatron-Core training wiring: DDP wrapping, the Megatron optimizer, gradient finalisation."""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer


def wrap_with_ddp(chunks, config, overlap_grad_reduce: bool = False):
    """Wrap each model chunk in Megatron's DDP (contiguous grad buffers, bucketed reductions)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=False,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(index > 0))
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    return wrapped


def unwrap_ddp(chunk):
    """The model inside a DDP wrapper (whose state-dict keys gain a ``module.`` prefix)."""
    return getattr(chunk, "module", chunk)


def build_optimizer(wrapped_chunks, lr: float, *, optimizer: str = "adam",
                    weight_decay: float = 0.0, clip_grad: float | None = None,
                    config_overrides: dict | None = None, **optimizer_fields):
    """Megatron's optimizer over the DDP-wrapped chunks.

    ``clip_grad`` defaults to 0 (off) on CPU, where Megatron's clip kernel is CUDA-only, and to
    1.0 on GPU. ``config_overrides`` is Megatron's per-parameter-group override mapping (used to
    give the PR2 predictor its own learning rate).
    """
    if clip_grad is None:
        clip_grad = 1.0 if torch.cuda.is_available() else 0.0
    if clip_grad and not torch.cuda.is_available():
        raise ValueError("gradient clipping uses a CUDA kernel in Megatron-Core; set clip_grad=0 "
                         "on CPU")
    opt_config = OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                                 clip_grad=clip_grad, bf16=False, fp16=False,
                                 params_dtype=torch.float32, **optimizer_fields)
    kwargs = {"config_overrides": config_overrides} if config_overrides else {}
    return get_megatron_optimizer(opt_config, wrapped_chunks, **kwargs)
