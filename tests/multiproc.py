"""Run a function on N gloo processes (torch.multiprocessing, loopback) and collect results."""

from __future__ import annotations

import os
import socket
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
    try:
        result = fn(rank, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise


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
