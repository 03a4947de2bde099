"""Checkpoint verification (each kind of damage named by file), rotation, failed-save clean-up."""

import errno
import json
import logging
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from megatron_pr2.training.checkpoint import checkpointing
from megatron_pr2.training.checkpoint.checkpoint_verify import (
    CorruptCheckpointError,
    load_trainer_state,
    verify_checkpoint,
)
from megatron_pr2.training.checkpoint.checkpointing import CheckpointError


def _write_checkpoint(directory, iteration: int = 1, world_size: int | None = None):
    """A checkpoint with the trainer's file layout: torch_dist shards + common + trainer state
    (``world_size`` recorded as the trainer's save records it; None: an older checkpoint)."""
    os.makedirs(directory)
    dcp.save({"w": torch.arange(4096.0), "v": torch.ones(3, 5)}, checkpoint_id=str(directory),
             no_dist=True)
    with open(os.path.join(directory, "metadata.json"), "w", encoding="utf-8") as handle:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, handle)
    torch.save({"optimizer": {"param_groups": [{"lr": 1e-3}]}},
               os.path.join(directory, "common.pt"))
    state = {"iteration": iteration, "torch_rng": torch.get_rng_state(),
             "python_rng": (3, (1, 2, 3), None), "config": {"train": {"lr": 1e-3}}}
    if world_size is not None:
        state["world_size"] = world_size
    torch.save(state, os.path.join(directory, "trainer_state_rank0.pt"))
    return directory


def _truncate(path, keep: int):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:keep])


def test_a_complete_checkpoint_verifies_and_its_state_loads_weights_only(tmp_path):
    directory = _write_checkpoint(tmp_path / "iter_0000001")
    verify_checkpoint(str(directory), 0)
    state = load_trainer_state(str(directory), 0)
    assert state["iteration"] == 1 and state["python_rng"] == (3, (1, 2, 3), None)


@pytest.mark.parametrize("damage, named, why", [
    (lambda d: _truncate(min(d.glob("*.distcp")), 100), "__0_0.distcp", "is truncated"),
    (lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata", "is garbled"),
    (lambda d: (d / "metadata.json").write_text("{not json"), "metadata.json", "is garbled"),
    (lambda d: os.remove(d / "common.pt"), "common.pt", "is missing"),
    (lambda d: _truncate(d / "common.pt", 20), "common.pt", "is unreadable"),
    (lambda d: _truncate(d / "trainer_state_rank0.pt", 200), "trainer_state_rank0.pt",
     "is unreadable"),
    (lambda d: os.remove(d / "trainer_state_rank0.pt"), "trainer_state_rank0.pt", "is missing"),
])
def test_each_damage_is_named_with_its_file(tmp_path, damage, named, why):
    directory = _write_checkpoint(tmp_path / "iter_0000001")
    damage(directory)
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint(str(directory), 0)
    assert str(err.value).startswith(f"{directory / named} {why}")


def test_candidates_are_newest_first_up_to_latest_and_survive_a_garbled_latest(tmp_path):
    for i in (1, 2, 3):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "iter_0000004.tmp").mkdir()  # a save that never completed
    (tmp_path / checkpointing.LATEST).write_text("2")
    assert checkpointing._candidates(str(tmp_path)) == [2, 1]
    (tmp_path / checkpointing.LATEST).write_text("2\x00garbage")
    assert checkpointing._candidates(str(tmp_path)) == [3, 2, 1]


def test_more_ranks_than_wrote_the_checkpoint_are_refused_at_once(tmp_path, monkeypatch, caplog):
    from megatron_pr2.training.checkpoint.resume_config import ResumeConfigError

    for i in (1, 2):
        _write_checkpoint(tmp_path / f"iter_{i:07d}", iteration=i, world_size=1)
    (tmp_path / checkpointing.LATEST).write_text("2")
    monkeypatch.setattr(checkpointing, "_world_size", lambda: 2)
    tried = []
    monkeypatch.setattr(checkpointing, "_verified_state", lambda d: tried.append(d))
    with pytest.raises(ResumeConfigError) as err:
        checkpointing.resume(str(tmp_path), model=[], optimizer=None, config={})
    assert str(err.value).startswith(
        f"cannot resume {tmp_path / 'iter_0000002'} on 2 ranks: it was written by 1 ranks")
    assert tried == [] and "unusable" not in caplog.text  # no older checkpoint was tried


def test_fewer_ranks_and_unrecorded_world_sizes_pass_the_rank_check(tmp_path):
    from megatron_pr2.training.checkpoint.resume_config import check_world_size

    check_world_size(saved=4, current=2, checkpoint="c")  # data parallel shrinks
    check_world_size(saved=None, current=8, checkpoint="c")  # older checkpoint: files decide
    older = _write_checkpoint(tmp_path / "iter_0000001")
    assert checkpointing._saved_world_size(str(older)) is None
    os.remove(older / "trainer_state_rank0.pt")  # verification names the missing file later
    assert checkpointing._saved_world_size(str(older)) is None


def test_rotation_keeps_the_newest_complete_checkpoints_only(tmp_path):
    for i in (1, 2, 3, 4):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "iter_0000005.tmp").mkdir()
    (tmp_path / "weight_sync_hf").mkdir()
    checkpointing.rotate_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", "iter_0000005.tmp",
                                            "weight_sync_hf"]


def _fail_writing(error):
    def write(root, staging, model, optimizer, trainer_state):
        os.makedirs(staging)
        with open(os.path.join(staging, "__0_0.distcp"), "wb") as handle:
            handle.write(b"partial")
        raise error
    return write


def test_disk_full_at_the_write_seam_is_named_and_cleaned_up(tmp_path, monkeypatch):
    _write_checkpoint(tmp_path / "iter_0000001")
    (tmp_path / checkpointing.LATEST).write_text("1")
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    wrapped = RuntimeError("unexpected pos 704 vs 598")  # torch's zip writer, caused by ENOSPC
    wrapped.__cause__ = enospc
    monkeypatch.setattr(checkpointing, "_write_staging", _fail_writing(wrapped))
    with pytest.raises(CheckpointError) as err:
        checkpointing.save_checkpoint(str(tmp_path), 2, [torch.nn.Linear(2, 2)], None, {})
    assert str(err.value) == (f"no space left on device while saving iteration 2 to {tmp_path}; "
                              "the previous checkpoints are intact")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", checkpointing.LATEST]
    verify_checkpoint(str(tmp_path / "iter_0000001"), 0)


def test_a_torch_checkpoint_exception_from_a_full_disk_is_recognised(tmp_path, monkeypatch):
    # torch's CheckpointException derives from BaseException and carries the worker's error text
    failure = CheckpointException("write", {0: _wrap_exception(OSError(errno.ENOSPC, os.strerror(
        errno.ENOSPC)))})
    monkeypatch.setattr(checkpointing, "_write_staging", _fail_writing(failure))
    with pytest.raises(CheckpointError, match="^no space left on device while saving iteration 2"):
        checkpointing.save_checkpoint(str(tmp_path), 2, [torch.nn.Linear(2, 2)], None, {})
    assert os.listdir(tmp_path) == []


def test_other_save_failures_are_cleaned_up_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "_write_staging",
                        _fail_writing(PermissionError(errno.EACCES, "Permission denied")))
    monkeypatch.setattr(checkpointing, "_is_disk_full", lambda err, root: False)
    with pytest.raises(CheckpointError, match=r"saving iteration 3 to .* failed \(PermissionError"):
        checkpointing.save_checkpoint(str(tmp_path), 3, [torch.nn.Linear(2, 2)], None, {})
    assert os.listdir(tmp_path) == []


def test_non_finite_weights_are_never_written(tmp_path, monkeypatch):
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.bias[0] = float("nan")
    monkeypatch.setattr(checkpointing, "_write_staging", _fail_writing(AssertionError("wrote")))
    with pytest.raises(Exception, match="refusing to save iteration 2"):
        checkpointing.save_checkpoint(str(tmp_path), 2, [layer], None, {})
    assert os.listdir(tmp_path) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_ctrl_c_during_a_save_leaves_no_staging_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "_write_staging", _fail_writing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(str(tmp_path), 2, [torch.nn.Linear(2, 2)], None, {})
    assert os.listdir(tmp_path) == []


def test_replacing_an_unused_folder_of_the_same_iteration_is_logged(tmp_path, caplog):
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "iter_0000002" / "junk").write_text("x")
    (tmp_path / "iter_0000002.tmp").mkdir()
    (tmp_path / "iter_0000002.tmp" / "new").write_text("y")
    with caplog.at_level(logging.WARNING):
        checkpointing._publish(str(tmp_path), str(tmp_path / "iter_0000002.tmp"),
                               str(tmp_path / "iter_0000002"), 2)
    assert os.listdir(tmp_path / "iter_0000002") == ["new"]
    assert f"replacing the existing checkpoint {tmp_path}/iter_0000002" in caplog.text
