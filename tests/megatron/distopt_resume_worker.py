"""Workers for the distributed-optimizer resume test: train, checkpoint, resume, train on.

Every run starts from the same initial weights and trains a tiny Qwen3-MoE with clipped Adam and
a warm-up + cosine schedule (Megatron's distributed optimizer, so Adam's state is sharded over
the data-parallel ranks) on the same global batch each step. A run either trains ``TOTAL`` steps
straight, or loads the trainer checkpoint another run wrote after ``SAVED`` steps (through
``checkpointing.resume``, as the trainer does) and trains the remaining steps.
"""

from __future__ import annotations

import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.models import ModelOptions, build_model_chunks
from megatron_pr2.models.moe_options import precision_overrides
from megatron_pr2.platform import (
    ParallelConfig,
    destroy_model_parallel,
    initialize_model_parallel,
)
from megatron_pr2.training.checkpoint import checkpointing
from megatron_pr2.training.checkpoint.model_weights import save_model_checkpoint
from megatron_pr2.training.lr_schedule import ScheduledOptimizer, build_param_scheduler
from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp
from megatron_pr2.training.pipeline_schedule import run_schedule
from tests.megatron import layout_worker

SAVED, TOTAL = 2, 4
LR, CLIP = 1e-2, 0.05
ADAM_EPS = 1e-3  # keeps Adam's step linear in tiny gradients: DP=1 vs DP=2 noise stays noise
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def _run_config() -> dict:
    """The config saved with the checkpoint and resumed under (this model has no predictor)."""
    cfg = RunConfig()
    cfg.algo.routing_method = "none"
    return cfg.to_dict()


def _build(bf16: bool, layout: dict, init_dir: str):
    parallel = ParallelConfig(**layout)
    initialize_model_parallel(parallel, seed=4321)
    overrides = precision_overrides(bf16)
    spec, config, chunks = build_model_chunks(layout_worker.model_config("qwen3"), parallel,
                                              ModelOptions(config_overrides=overrides))
    load_megatron_checkpoint(chunks, init_dir)
    model = wrap_with_ddp(chunks, config, use_distributed_optimizer=True)
    optimizer = build_optimizer(model, lr=LR, adam_eps=ADAM_EPS, clip_grad=CLIP, bf16=bf16,
                                use_distributed_optimizer=True)
    scheduler = build_param_scheduler(optimizer, lr=LR, min_lr=LR / 10, decay_style="cosine",
                                      warmup_steps=1, decay_steps=TOTAL, weight_decay=0.01)
    return spec, model, ScheduledOptimizer(optimizer, scheduler)


def _train(model, optimizer, vocab: int, steps: int) -> None:
    batches = layout_worker._microbatches(layout_worker.global_batch(vocab))
    for _ in range(steps):
        optimizer.zero_grad()
        for chunk in model:
            chunk.zero_grad_buffer()
        run_schedule(model, batches, layout_worker._lm_forward_step,
                     seq_length=layout_worker.SEQ, micro_batch_size=layout_worker.MICRO_BATCH)
        success, _, _ = optimizer.step()
        assert success


def adam_summary(optimizer) -> dict:
    """Layout-free figures of the sharded Adam state: per parameter group, the sum over the ranks
    that shard it of each state tensor's squared norm (the shards are disjoint, so this is the
    full state's), the set of step counts, and the group's lr and weight decay."""
    summary = {}
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for index, opt in enumerate(chained):
        inner = opt.optimizer
        for group_index, group in enumerate(inner.param_groups):
            sums = torch.zeros(len(STATE_KEYS), dtype=torch.float64)
            steps = set()
            for param in group["params"]:
                state = {"param": param, **inner.state[param]}
                sums += torch.stack([state[k].double().square().sum() for k in STATE_KEYS])
                steps.add(float(state["step"]))
            torch.distributed.all_reduce(sums, group=opt.data_parallel_group)  # its shards
            summary[(index, group_index)] = {
                "sq_norms": sums.tolist(), "steps": sorted(steps),
                "lr": group["lr"], "weight_decay": group["weight_decay"]}
    return summary


def local_adam_state(optimizer) -> list[dict]:
    """This rank's Adam state tensors in the optimizer's own order (copies)."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    out = []
    for opt in chained:
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state[param]
                out.append({"param": param.detach().clone(), "step": state["step"].clone(),
                            **{k: state[k].clone() for k in STATE_KEYS[1:]}})
    return out


def _one_run(init_dir: str, run: dict) -> dict:
    spec, model, optimizer = _build(run.get("bf16", False), run.get("layout", {}), init_dir)
    result = {}
    if run.get("resume_from"):
        resumed = checkpointing.resume(run["resume_from"], model, optimizer, _run_config())
        assert resumed is not None and resumed.iteration == SAVED
        result.update(loaded=adam_summary(optimizer), loaded_local=local_adam_state(optimizer))
    else:
        _train(model, optimizer, spec.vocab_size, SAVED)
        result.update(saved=adam_summary(optimizer), saved_local=local_adam_state(optimizer))
        checkpointing.save_checkpoint(run["save_to"], SAVED, model, optimizer,
                                      {"iteration": SAVED, "config": _run_config()})
    _train(model, optimizer, spec.vocab_size, TOTAL - SAVED)
    result["scheduler_steps"] = optimizer.scheduler.num_steps
    save_model_checkpoint(model, run["weights_to"])
    return result


def train_runs(rank: int, init_dir: str, runs: list[dict]) -> dict:
    """Each of ``runs`` in turn: ``{"name", "bf16", "layout", "weights_to"}`` plus ``save_to`` (train
    ``SAVED`` steps, checkpoint, train on) or ``resume_from`` (resume, train the rest)."""
    del rank
    results = {run["name"]: _one_run(init_dir, run) for run in runs}
    destroy_model_parallel()  # once: a process group re-created on the same port can hang
    return results
