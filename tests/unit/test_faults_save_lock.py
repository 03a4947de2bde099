"""The save-directory lock refuses a live owner and breaks the lock of a dead one."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from megatron_pr2.training.checkpoint.save_lock import (
    LOCK_NAME,
    SaveDirLock,
    SaveDirLockedError,
    _process_start_tick,
)


def _write_lock(directory, **owner):
    directory.mkdir(exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": 0.0,
              "start_tick": _process_start_tick(os.getpid()), **owner}
    (directory / LOCK_NAME).write_text(json.dumps(record))


def test_acquire_records_the_owner_and_release_removes_it(tmp_path):
    with SaveDirLock(str(tmp_path / "ckpt")) as lock:
        owner = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert lock.held
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_a_live_owner_is_refused_by_name(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid, start_tick=_process_start_tick(sleeper.pid))
        with pytest.raises(SaveDirLockedError) as err:
            SaveDirLock(str(tmp_path)).acquire()
        assert f"is in use by another trainer (pid {sleeper.pid} on {socket.gethostname()}" \
            in str(err.value)
        assert f"delete {tmp_path / LOCK_NAME}" in str(err.value)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_owner_or_a_reused_pid_is_stale(tmp_path, caplog):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _write_lock(tmp_path, pid=int(done.stdout))
    with caplog.at_level(logging.WARNING), SaveDirLock(str(tmp_path)):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    assert f"breaking the stale lock {tmp_path / LOCK_NAME}" in caplog.text
    assert f"pid {int(done.stdout)} on {socket.gethostname()}" in caplog.text
    # a live pid that started at another time is another process: the lock is stale
    _write_lock(tmp_path, pid=os.getppid(), start_tick=-1)
    SaveDirLock(str(tmp_path)).acquire().release()


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    _write_lock(tmp_path, pid=1, host="elsewhere-node-7")
    with pytest.raises(SaveDirLockedError, match="pid 1 on elsewhere-node-7"):
        SaveDirLock(str(tmp_path)).acquire()


def test_a_full_disk_when_taking_the_lock_leaves_no_empty_lock(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SaveDirLockedError, match="cannot write .*trainer.lock .No space left on "
                       "device.; free space or use another directory"):
        SaveDirLock(str(tmp_path / "ckpt")).acquire()
    assert os.listdir(tmp_path / "ckpt") == []
