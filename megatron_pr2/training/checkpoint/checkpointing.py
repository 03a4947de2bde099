"""Trainer checkpoints: model + optimizer (distributed format), RNG and loop state; resume.

Layout: ``<save>/iter_0000012/`` holds the distributed checkpoint and one
``trainer_state_rank{r}.pt`` per rank; ``<save>/latest_checkpointed_iteration.txt`` names the
newest complete one. A checkpoint is written under a temporary name and renamed when complete,
and the ``latest`` file is replaced atomically afterwards, so a kill at any moment leaves the
previous checkpoint intact. A failed save removes its temporary folder and says why (a full
disk by name); non-finite weights are never saved; ``keep_last`` rotates old checkpoints.

Resume verifies the newest checkpoint (:mod:`checkpoint_verify`) and falls back to the newest
complete earlier one, naming the bad file; the config saved with it is compared with the new
one (:mod:`resume_config`) before any weight is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_pr2.models.builder import unwrap_ddp
from megatron_pr2.platform.distributed import any_rank
from megatron_pr2.training.checkpoint.checkpoint_verify import (
    CorruptCheckpointError,
    load_trainer_state,
    trainer_state_path,
    verify_checkpoint,
)
from megatron_pr2.training.checkpoint.optimizer_checkpoint import (
    finish_optimizer_load,
    prepare_optimizer_for_load,
)
from megatron_pr2.training.checkpoint.resume_config import (
    check_checkpoint_predictor,
    check_resume_config,
    check_world_size,
    configured_learning_rates,
    restore_learning_rates,
)
from megatron_pr2.training.nonfinite import assert_finite_weights

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
DISK_FULL_FREE_BYTES = 1 << 20  # a failed write with less free space than this is a full disk


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or no usable checkpoint could be loaded."""


@dataclasses.dataclass
class Resumed:
    """What a resume loaded: this rank's trainer state and where it came from."""

    state: dict
    directory: str
    iteration: int


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _sharded_state(model, optimizer, is_loading: bool = False) -> dict:
    state = {f"model{i}": unwrap_ddp(chunk).sharded_state_dict() for i, chunk in enumerate(model)}
    model_state = {}
    for chunk_state in state.values():
        model_state.update(chunk_state)
    if optimizer is not None:
        if is_loading:
            prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    return state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------- save
def _is_disk_full(err: BaseException, root: str) -> bool:
    """ENOSPC anywhere in the exception chain, or a write error with the disk (nearly) full
    (torch's zip writer reports a full disk as "unexpected pos ...")."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(root).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False


def _write_staging(root: str, staging: str, model, optimizer, trainer_state: dict) -> None:
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer), staging)
    torch.save({**trainer_state, "world_size": _world_size()},
               trainer_state_path(staging, _rank()))


def _publish(root: str, staging: str, final: str, iteration: int) -> None:
    """Rank 0: rename the complete staging folder and point ``latest`` at it (replacing, with a
    warning, a folder of the same iteration left by an earlier run: resume found it unusable)."""
    if os.path.exists(final):
        logger.warning("replacing the existing checkpoint %s (an earlier run's, which resume "
                       "did not use)", final)
        shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    tmp = os.path.join(root, LATEST + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(str(iteration))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
    except BaseException:  # a full disk or Ctrl-C: leave no half-written pointer behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_checkpoint(root: str, iteration: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 0) -> str:
    """Collectively save a complete checkpoint of ``iteration``; return its directory.

    Raises:
        NonFiniteError: the weights are not finite (nothing is written).
        CheckpointError: the save failed (its temporary folder is removed; a full disk is
            named as such); earlier checkpoints are untouched.
    """
    assert_finite_weights(model, f"iteration {iteration}")
    final = _iter_dir(root, iteration)
    staging = final + ".tmp"
    error = None
    try:
        _write_staging(root, staging, model, optimizer, trainer_state)
    except KeyboardInterrupt:
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)  # Ctrl-C: leave no half checkpoint
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 -- all ranks must agree below
        error = err
    if any_rank(error is not None):
        _fail_save(root, staging, iteration, error)
    if _rank() == 0:
        try:
            _publish(root, staging, final, iteration)
        except OSError as err:
            _fail_save(root, staging, iteration, err)
        logger.info("saved checkpoint %s", final)
        if keep_last:
            rotate_checkpoints(root, keep_last)
    _barrier()
    return final


def _fail_save(root: str, staging: str, iteration: int, error: BaseException | None):
    full = error is not None and _is_disk_full(error, root)
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if full:
        raise CheckpointError(f"no space left on device while saving iteration {iteration} to "
                              f"{root}; the previous checkpoints are intact") from error
    cause = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
    raise CheckpointError(f"saving iteration {iteration} to {root} failed ({cause}); the "
                          "previous checkpoints are intact") from error


def complete_iterations(root: str) -> list[int]:
    """Iterations with a renamed (complete) checkpoint folder under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = (_ITER_DIR.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m)


def rotate_checkpoints(root: str, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (rank 0)."""
    iterations = complete_iterations(root)
    for iteration in iterations[:-keep_last]:
        shutil.rmtree(_iter_dir(root, iteration), ignore_errors=True)
        logger.info("removed old checkpoint %s (--keep-last %d)", _iter_dir(root, iteration),
                    keep_last)


# ----------------------------------------------------------------------------------- load
def latest_iteration(root: str | None) -> int | None:
    """The iteration named by ``root``'s ``latest`` file, or None when there is none.

    Raises:
        ValueError: the file does not hold an iteration number.
    """
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


def _candidates(root: str) -> list[int]:
    """Iterations to try, newest first: those up to ``latest`` (all, if it is unreadable)."""
    on_disk = complete_iterations(root)
    try:
        latest = latest_iteration(root)
    except ValueError as err:
        logger.warning("%s; looking for checkpoint folders instead", err)
        return on_disk[::-1]
    if latest is None:
        return []
    if latest not in on_disk:
        logger.warning("%s names iteration %d but %s is missing", os.path.join(root, LATEST),
                       latest, _iter_dir(root, latest))
    return [i for i in on_disk if i <= latest][::-1] or [latest]


def _saved_world_size(directory: str) -> int | None:
    """The number of ranks that wrote ``directory`` (rank 0's record; None when unreadable or
    not recorded: the usual verification then names the problem)."""
    try:
        return load_trainer_state(directory, 0).get("world_size")
    except CorruptCheckpointError:
        return None


def _verified_state(directory: str) -> tuple[dict | None, str | None]:
    """This rank's trainer state if every rank finds ``directory`` complete, else a reason."""
    try:
        verify_checkpoint(directory, _rank())
        state, reason = load_trainer_state(directory, _rank()), None
    except CorruptCheckpointError as err:
        state, reason = None, str(err)
    if any_rank(reason is not None) and reason is None:
        reason = "a file of another rank is missing or damaged (see that rank's log)"
    return (None, reason) if reason else (state, None)


@torch.no_grad()  # the distributed optimizer copies into views of the fp32 parameters
def _load_states(directory: str, model, optimizer) -> None:
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), directory)
    for i, chunk in enumerate(model):
        unwrap_ddp(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        finish_optimizer_load(optimizer)


def _load_weights(directory: str, model, optimizer) -> str | None:
    """Load model and optimizer state (collective); a reason string when it failed."""
    configured = configured_learning_rates(optimizer) if optimizer is not None else None
    reason = None
    try:
        _load_states(directory, model, optimizer)
    except (Exception, CheckpointException) as err:  # raised deep inside torch
        reason = f"loading it failed ({type(err).__name__}: {str(err)[:300]})"
        logger.debug("loading %s failed", directory, exc_info=True)
    if any_rank(reason is not None):
        return reason or "loading it failed on another rank"
    if optimizer is not None:
        restore_learning_rates(optimizer, configured)
    return None


def resume(root: str | None, model, optimizer, config: dict,
           allow_resharding: bool = False) -> Resumed | None:
    """Load the newest usable checkpoint under ``root`` (collective); None when there is none.

    A damaged checkpoint is skipped, with a warning naming the file, for the newest complete
    earlier one. The saved config is compared with ``config`` before any weight is loaded.

    Raises:
        ResumeConfigError: ``config`` changes what the checkpoint's run is, or more ranks
            resume it than wrote it (refused at once: an older checkpoint would not help).
        CheckpointError: checkpoints exist but none of them is usable.
    """
    candidates = _candidates(root) if root else []
    skipped = []
    for iteration in candidates:
        directory = _iter_dir(root, iteration)
        check_world_size(_saved_world_size(directory), _world_size(), directory)  # every rank
        state, reason = _verified_state(directory)
        if reason is None:
            check_resume_config(state.get("config", {}), config, directory, allow_resharding)
            check_checkpoint_predictor(directory, config)
            reason = _load_weights(directory, model, optimizer)
        if reason is None:
            if skipped:
                logger.warning("resumed from %s, an earlier checkpoint, because %s",
                               directory, "; ".join(skipped))
            logger.info("resumed from %s (iteration %d)", directory, iteration)
            return Resumed(state, directory, iteration)
        logger.warning("checkpoint %s is unusable: %s", directory, reason)
        skipped.append(f"{directory} is unusable: {reason}")
    if skipped:
        raise CheckpointError(f"no usable checkpoint under {root}: " + "; ".join(skipped)
                              + ". Move the directory away to start a new run")
    return None

