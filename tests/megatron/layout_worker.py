"""Workers for the parallel-layout tests: one LM training step of a tiny Qwen-MoE under a layout.

Each run loads the same initial weights (a distributed checkpoint, so any layout can load it),
runs Megatron's schedule on the same global batch, reduces gradients through Megatron's DDP and
``finalize_model_grads``, saves the gradients and the post-step weights as distributed
checkpoints, and takes a Megatron optimizer step.
"""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state

from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.models import build_model_chunks
from megatron_pr2.models.presets import preset
from megatron_pr2.platform import (
    ParallelConfig,
    destroy_model_parallel,
    initialize_model_parallel,
)
from megatron_pr2.training.checkpoint.model_weights import save_model_checkpoint
from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp
from megatron_pr2.training.pipeline_schedule import (
    broadcast_from_last_stage,
    run_schedule,
)

SEQ, GLOBAL_BATCH, MICRO_BATCH = 8, 4, 1


def model_config(family: str) -> dict:
    name = "tiny-qwen3-moe" if family == "qwen3" else "tiny-qwen2-moe"
    return preset(name, mlp_only_layers=[1])  # a dense layer in the middle, as real configs have


def global_batch(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def _microbatches(tokens: torch.Tensor) -> list[dict]:
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    local = tokens.chunk(dp_size)[dp_rank]
    positions = torch.arange(SEQ).unsqueeze(0)
    return [
        {"tokens": row[:, :-1], "labels": row[:, 1:], "positions": positions}
        for row in local.split(MICRO_BATCH)
    ]


def _lm_forward_step(batch, model):
    output = model(batch["tokens"], batch["positions"], None, labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales loss in place

    return output, loss_func


def init_checkpoint(rank: int, family: str, directory: str) -> None:
    """Build the model on one process with a fixed seed and save it."""
    initialize_model_parallel(ParallelConfig(), seed=1234)
    _, _, chunks = build_model_chunks(model_config(family))
    save_model_checkpoint(chunks, directory)
    destroy_model_parallel()


def train_step(rank: int, family: str, layout: dict, init_dir: str, out_dir: str) -> float:
    """One training step under ``layout``; saves ``grads/`` and ``after_step/`` checkpoints."""
    parallel = ParallelConfig(**layout)
    initialize_model_parallel(parallel, seed=4321)
    spec, config, chunks = build_model_chunks(model_config(family), parallel)
    load_megatron_checkpoint(chunks, init_dir)
    model = wrap_with_ddp(chunks, config)
    # SGD: the post-step weights are then an exact function of the reduced gradients (Adam
    # would amplify fp32 noise on near-zero gradients into full-size steps).
    optimizer = build_optimizer(model, lr=0.5, optimizer="sgd")
    optimizer.zero_grad()
    for chunk in model:
        chunk.zero_grad_buffer()
    losses = run_schedule(model, _microbatches(global_batch(spec.vocab_size)), _lm_forward_step,
                          seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    local = torch.stack([item["loss"] for item in losses]).mean() if losses else torch.zeros(())
    loss = broadcast_from_last_stage(local)
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    loss /= parallel_state.get_data_parallel_world_size()
    _save_grads(model, os.path.join(out_dir, "grads"))
    optimizer.step()
    save_model_checkpoint(model, os.path.join(out_dir, "after_step"))
    destroy_model_parallel()
    return float(loss)


def _save_grads(model, directory: str) -> None:
    """Save each parameter's reduced gradient in place of its value, then restore the values."""
    saved = []
    for chunk in model:
        for param in chunk.parameters():
            saved.append((param, param.data.clone()))
            param.data.copy_(param.main_grad)
    save_model_checkpoint(model, directory)
    for param, value in saved:
        param.data.copy_(value)
