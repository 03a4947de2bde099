"""Ownership lock of a ``--save`` directory: one live trainer writes there at a time.

The lock is ``<save>/trainer.lock``, created atomically (``O_CREAT | O_EXCL``) by rank 0 and
holding the owner's pid, host, start time and the kernel's start tick of that pid. A second
trainer finding it is refused with the owner named. A lock whose owner is provably dead (same
host, and no process with that pid and start tick) is stale: it is replaced with a warning. A
lock from another host cannot be checked from here and is always refused, naming the file to
delete when that trainer is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Self

logger = logging.getLogger(__name__)

LOCK_NAME = "trainer.lock"


class SaveDirLockedError(RuntimeError):
    """The save directory cannot be taken: another live trainer owns it, or the lock cannot be
    written (a full disk)."""


def _process_start_tick(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks (Linux), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.time(),
            "start_tick": _process_start_tick(pid)}


def _is_alive(owner: dict) -> bool:
    """Whether the lock's owner may still run (True when it cannot be told from here)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    tick = owner.get("start_tick")
    return tick is None or _process_start_tick(pid) in (None, tick)


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}"


def _read_owner(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            owner = json.load(handle)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


class SaveDirLock:
    """Holds ``<directory>/trainer.lock`` from :meth:`acquire` until :meth:`release`.

    As a context manager: acquired on entry, released on exit.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def acquire(self) -> SaveDirLock:
        """Take the lock, replacing a stale one; raise :class:`SaveDirLockedError` if owned."""
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            owner = _read_owner(self.path)
            if owner is None:
                continue  # released between our attempt and the read
            if not owner and _age_s(self.path) < 5.0:
                time.sleep(1.0)  # being written by a trainer starting right now
                continue
            if owner and _is_alive(owner):
                raise SaveDirLockedError(
                    f"--save {self.directory} is in use by another trainer ({_describe(owner)}); "
                    f"use another directory, or delete {self.path} if that trainer is gone")
            logger.warning("breaking the stale lock %s of a trainer that is no longer running "
                           "(%s)", self.path, _describe(owner) if owner else "unreadable lock")
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise SaveDirLockedError(f"could not take {self.path}: other trainers keep creating it")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_owner_record(), handle)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            os.remove(self.path)  # no empty lock may outlive a failed write
            raise SaveDirLockedError(f"--save {self.directory}: cannot write {self.path} "
                                     f"({err.strerror or err}); free space or use another "
                                     "directory") from err
        return True

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        owner = _read_owner(self.path)
        if owner and owner.get("pid") == os.getpid() \
                and owner.get("host") == socket.gethostname():
            os.remove(self.path)
        self.held = False
