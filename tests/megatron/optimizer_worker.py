"""Workers for the precision / optimizer / dispatcher layout tests.

One spawn per layout runs several configurations in turn (each re-initialises Megatron's parallel
state): ``STEPS`` clipped Adam steps of a tiny Qwen3-MoE from the same initial checkpoint on the
same global batch, saving the post-step weights (distributed checkpoint) and returning the loss
and Megatron's global grad norm of every step, and the policy-only norm
(:class:`~megatron_pr2.training.policy_grad_norm.PolicyGradNorm`) with the router weights standing
in for PR2's predictor weights.
"""

from __future__ import annotations

import os

import torch

from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.models import ModelOptions, build_model_chunks
from megatron_pr2.models.moe_options import precision_overrides
from megatron_pr2.platform import (
    ParallelConfig,
    destroy_model_parallel,
    initialize_model_parallel,
)
from megatron_pr2.routing.predictor import PREDICTOR_PARAM_ATTR
from megatron_pr2.training.checkpoint.model_weights import save_model_checkpoint
from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp
from megatron_pr2.training.pipeline_schedule import run_schedule
from megatron_pr2.training.policy_grad_norm import PolicyGradNorm
from tests.megatron import layout_worker

STEPS = 2
LR = 1e-2
CLIP = 0.05  # below the grad norm of this model and batch, so clipping scales every step
# Megatron's distributed optimizer is Adam only. A large epsilon keeps Adam's step linear in
# gradients far below it, so fp32 reduction-order noise on near-zero gradients stays noise.
ADAM_EPS = 1e-3
EXCLUDED = "router.weight"  # parameters tagged like the predictor's: left out of the policy norm


def _tag_excluded(model) -> None:
    for chunk in model:
        for name, param in chunk.named_parameters():
            if name.endswith(EXCLUDED):
                setattr(param, PREDICTOR_PARAM_ATTR, True)


def _one_run(family: str, layout: dict, init_dir: str, out_dir: str, run: dict) -> dict:
    parallel = ParallelConfig(**layout)
    initialize_model_parallel(parallel, seed=4321)
    overrides = precision_overrides(run.get("bf16", False))
    overrides["moe_token_dispatcher_type"] = run.get("dispatcher", "allgather")
    spec, config, chunks = build_model_chunks(layout_worker.model_config(family), parallel,
                                              ModelOptions(config_overrides=overrides))
    load_megatron_checkpoint(chunks, init_dir)
    distributed = run.get("distributed_optimizer", False)
    model = wrap_with_ddp(chunks, config, use_distributed_optimizer=distributed)
    _tag_excluded(model)
    optimizer = build_optimizer(model, lr=LR, adam_eps=ADAM_EPS, clip_grad=CLIP,
                                bf16=run.get("bf16", False), use_distributed_optimizer=distributed)
    for group in optimizer.param_groups:  # no scheduler here: use the constant LR
        group["lr"] = LR
    policy_norm = PolicyGradNorm(optimizer)
    losses, norms, reference_norms, policy_norms, reference_policy = [], [], [], [], []
    batches = layout_worker._microbatches(layout_worker.global_batch(spec.vocab_size))
    for _ in range(STEPS):
        optimizer.zero_grad()
        for chunk in model:
            chunk.zero_grad_buffer()
        out = run_schedule(model, batches, layout_worker._lm_forward_step,
                           seq_length=layout_worker.SEQ, micro_batch_size=layout_worker.MICRO_BATCH)
        losses.append(_global_mean_loss(out))
        if run.get("reference_norm"):  # one process: the norm by PyTorch's own clip function
            reference_norms.append(_torch_norm(model, lambda name: True))
            reference_policy.append(_torch_norm(model, lambda name: not name.endswith(EXCLUDED)))
        _, grad_norm, _ = optimizer.step()
        norms.append(float(grad_norm))
        policy_norms.append(policy_norm.after_step(float(grad_norm)))
    save_model_checkpoint(model, os.path.join(out_dir, run["name"]))
    return {"loss": losses, "grad_norm": norms, "reference_norm": reference_norms,
            "policy_norm": policy_norms, "reference_policy_norm": reference_policy}


def _torch_norm(model, keep) -> float:
    """PyTorch's own clip function's norm over the (one-process) gradients ``keep`` names."""
    grads = [torch.nn.Parameter(p.main_grad.clone().float()) for c in model
             for name, p in c.named_parameters() if keep(name)]
    for g in grads:
        g.grad = g.data
    return float(torch.nn.utils.clip_grad_norm_(grads, float("inf")))


def _global_mean_loss(outputs) -> float:
    from megatron.core import parallel_state

    from megatron_pr2.training.pipeline_schedule import broadcast_from_last_stage

    local = torch.stack([o["loss"] for o in outputs]).mean() if outputs else torch.zeros(())
    loss = broadcast_from_last_stage(local)
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return float(loss) / parallel_state.get_data_parallel_world_size()


def train_runs(rank: int, family: str, layout: dict, init_dir: str, out_dir: str,
               runs: list[dict]) -> dict:
    """Each of ``runs`` in turn; returns ``{name: {"loss", "grad_norm", "reference_norm"}}``."""
    del rank
    results = {run["name"]: _one_run(family, layout, init_dir, out_dir, run) for run in runs}
    destroy_model_parallel()
    return results
