"""Trainer checkpoints: model + optimizer (distributed format), RNG and loop state; resume.

Layout: ``<save>/iter_0000012/`` holds the distributed checkpoint and one
``trainer_state_rank{r}.pt`` per rank; ``<save>/latest_checkpointed_iteration.txt`` names the
newest complete one. A checkpoint is written under a temporary name and renamed when complete,
and the ``latest`` file is replaced atomically afterwards, so a kill at any moment leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from megatron.core import dist_checkpointing

from megatron_pr2.training.model_setup import unwrap_ddp

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _sharded_state(model, optimizer, is_loading: bool = False) -> dict:
    state = {f"model{i}": unwrap_ddp(chunk).sharded_state_dict() for i, chunk in enumerate(model)}
    model_state = {}
    for chunk_state in state.values():
        model_state.update(chunk_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    return state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(root: str, iteration: int, model, optimizer, trainer_state: dict) -> str:
    """Collectively save a complete checkpoint of ``iteration``; return its directory."""
    final = _iter_dir(root, iteration)
    staging = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer), staging)
    torch.save(trainer_state, os.path.join(staging, f"trainer_state_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(str(iteration))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def latest_iteration(root: str | None) -> int | None:
    """The newest complete checkpoint's iteration under ``root``, or None."""
    if not root:
        return None
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} is corrupt: expected an iteration number, found {text!r}")
    return int(text)


def load_checkpoint(root: str, iteration: int, model, optimizer) -> dict:
    """Collectively load model and optimizer state; return this rank's trainer state."""
    directory = _iter_dir(root, iteration)
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"checkpoint {directory} is missing or incomplete")
    state_path = os.path.join(directory, f"trainer_state_rank{_rank()}.pt")
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"{state_path} is missing: was the checkpoint written with the "
                                "same number of ranks?")
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), directory)
    for i, chunk in enumerate(model):
        unwrap_ddp(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    logger.info("resumed from %s", directory)
    return torch.load(state_path, weights_only=False)
