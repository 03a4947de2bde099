"""Helper processes die with the trainer, even when it is killed with SIGKILL.

Megatron-Core's checkpoint writer forks one writer process per bucket and spawns a
``multiprocessing`` manager (whose resource tracker lives as long as it does); a trainer killed
by SIGKILL never stops them, so they would be re-parented to init and live on. On Linux every
such child asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``):

* forked children, through an ``os.register_at_fork`` hook installed by
  :func:`helpers_tied_to_this_process` (they also leave Ctrl-C, which a terminal sends to the
  whole process group, to the trainer);
* spawned children, which re-import the trainer's main module before they run: that import
  calls :func:`die_with_parent_if_helper`, which recognises a descendant by the trainer pid
  left in the environment.

The resource tracker exits by itself once every process holding its pipe is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

TRAINER_PID_ENV = "MEGATRON_PR2_TRAINER_PID"
_PR_SET_PDEATHSIG = 1
_forking_parent = {"pid": None}


def _set_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with(parent_pid: int | None) -> None:
    """Die with ``parent_pid``; exit at once if it is already gone (we were re-parented)."""
    if _set_parent_death_signal() and parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _remember_forking_parent() -> None:
    _forking_parent["pid"] = os.getpid()


def _after_fork_in_child() -> None:
    parent = _forking_parent["pid"]
    if os.environ.get(TRAINER_PID_ENV) == str(parent):  # forked while the parent was tied
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
        _die_with(parent)


@contextlib.contextmanager
def helpers_tied_to_this_process() -> Iterator[None]:
    """While inside: every child this process forks or spawns dies when it dies."""
    previous = os.environ.get(TRAINER_PID_ENV)
    os.environ[TRAINER_PID_ENV] = str(os.getpid())
    if not _forking_parent.get("hooked"):
        os.register_at_fork(before=_remember_forking_parent, after_in_child=_after_fork_in_child)
        _forking_parent["hooked"] = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRAINER_PID_ENV, None)
        else:
            os.environ[TRAINER_PID_ENV] = previous


def die_with_parent_if_helper() -> None:
    """In a process spawned below a tied trainer (the environment names another pid): die with
    the parent, or at once when it is gone already (re-parented to init)."""
    owner = os.environ.get(TRAINER_PID_ENV)
    if (owner and owner.isdigit() and int(owner) != os.getpid()
            and _set_parent_death_signal() and os.getppid() == 1):
        os._exit(1)
