"""Worker of tests/megatron/test_overlap_grad_reduce.py: short RL runs, with and without
Megatron's ``overlap_grad_reduce``, one after another in one spawned process group."""

from __future__ import annotations

import contextlib
import glob
import os

OVERLAP_RUNS = {"plain": {}, "overlap": {"train.overlap_grad_reduce": True}}


@contextlib.contextmanager
def _ddp_flags(seen: list):
    """Record the ``overlap_grad_reduce`` of the DDP wrapper the trainer builds."""
    from megatron_pr2.training import components

    original = components.wrap_with_ddp

    def wrap(*args, **kwargs):
        model = original(*args, **kwargs)
        seen.append(model[0].ddp_config.overlap_grad_reduce)
        return model

    components.wrap_with_ddp = wrap
    try:
        yield
    finally:
        components.wrap_with_ddp = original


def _train(method: str, out_dir: str, overrides: dict) -> dict:
    """A short supervised warm-up, then 2 RL iterations x 2 mini-steps of the tiny model
    (DP = the world size); rank 0's metrics and the DDP flag the run used."""
    import torch

    from megatron_pr2.config import RunConfig
    from megatron_pr2.platform.process_tree import helpers_tied_to_this_process
    from megatron_pr2.train import run_training
    from megatron_pr2.training.metrics_log import read_jsonl

    cfg = RunConfig()
    cfg.algo.routing_method = method
    cfg.algo.off_policy_window = 2
    cfg.rollout.rollout_batch_prompts = 4
    cfg.rollout.n_samples_per_prompt = 2
    cfg.rollout.max_new_tokens = 6
    cfg.task.partial_credit = True  # with the warm-up: rewards that differ within a group
    cfg.train.warmup_sft_steps = 3  # through the same DDP buckets (its own optimizer)
    cfg.train.warmup_sft_lr = 3e-2
    cfg.train.train_iters = 2
    cfg.train.micro_batch_size = 1  # 2 micro-batches per rank and mini-step
    cfg.train.lr = 1e-3
    cfg.train.save = f"{out_dir}/ckpt"
    cfg.train.save_interval = 2
    cfg.train.log_jsonl = f"{out_dir}/metrics.jsonl"
    cfg.model.strict_device = not torch.cuda.is_available()
    for path, value in overrides.items():
        section, field = path.split(".")
        setattr(getattr(cfg, section), field, value)
    seen = []
    with helpers_tied_to_this_process(), _ddp_flags(seen):
        run_training(cfg.validate())
    records = read_jsonl(cfg.train.log_jsonl) if os.path.exists(cfg.train.log_jsonl) else None
    return {"records": records, "overlap_grad_reduce": seen}


def _stop_helper_processes() -> None:
    """Stop the processes the runs left (Megatron's checkpoint writer, kept for the next run of
    this process), which would otherwise outlive this rank (it leaves through ``os._exit``)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=30)


def train_with_and_without_overlap(rank: int, methods: list[str], out_dir: str,
                                   extra: dict | None = None) -> dict:
    """``{(method, run): result}`` for every method and each of :data:`OVERLAP_RUNS`.

    Each run makes a new process group on its own port (a second one on the first run's store
    would read that run's stale addresses).
    """
    del rank
    base_port, results = int(os.environ["MASTER_PORT"]), {}
    try:
        for method in methods:
            for name, overrides in OVERLAP_RUNS.items():
                os.environ["MASTER_PORT"] = str(base_port + len(results))
                results[method, name] = _train(method, os.path.join(out_dir, method, name),
                                               {**overrides, **(extra or {})})
    finally:
        _stop_helper_processes()
    return results


def checkpoint_dir(out_dir: str, method: str, name: str) -> str:
    """The last checkpoint of a run of :func:`train_with_and_without_overlap`."""
    return max(glob.glob(os.path.join(out_dir, method, name, "ckpt", "iter_*")))
