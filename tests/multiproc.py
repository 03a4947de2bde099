"""Run a function on N gloo processes (torch.multiprocessing, loopback) and collect results."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    code = 0
    try:
        result = fn(rank, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - saved for the parent, then this rank exits 1
        code = 1
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        traceback.print_exc()
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Tear the process groups down and leave without interpreter teardown.

    A gloo process group still alive at interpreter exit can abort the process from a C++
    destructor ("terminate called without an active exception", SIGABRT) after the result was
    saved, which would fail a run whose every rank succeeded. The children this rank started
    (e.g. the manager of Megatron's checkpoint writer), which interpreter exit would have shut
    down, are ended first: os._exit would leave them running.
    """
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)
    try:
        from megatron_pr2.platform import destroy_model_parallel

        destroy_model_parallel()
    except Exception:  # noqa: BLE001, S110 - the result is saved; teardown is best effort
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Call ``fn(rank, *args)`` on ``world_size`` spawned processes; return each rank's result.

    ``fn`` must be a module-level function. Each process has torchrun-style environment
    variables on 127.0.0.1. A failure on any rank raises with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as err:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"{rank}.pt")
                if os.path.exists(path):
                    errors.append(torch.load(path, weights_only=False).get("error") or "")
            raise RuntimeError(f"distributed run failed: {err}\n" + "\n".join(errors)) from err
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)["ok"]
                for r in range(world_size)]
