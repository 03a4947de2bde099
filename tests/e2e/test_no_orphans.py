"""No process outlives a trainer killed with SIGKILL: the checkpoint writer Megatron-Core spawns
(and its resource tracker) and the writers it forks during a save all exit with it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.procfs import alive

ARGS = ["--routing-method", "r2", "--rollout-batch-prompts", "2", "--n-samples-per-prompt", "2",
        "--off-policy-window", "1", "--micro-batch-size", "4", "--max-new-tokens", "4",
        "--save-interval", "1", "--train-iters", "1000"]


def _children() -> dict[int, int]:
    """pid -> parent pid of every process on this machine."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                    parents[int(name)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _descendants(root: int) -> set[int]:
    parents, found, frontier = _children(), set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _saving_again(save) -> bool:
    """A save is under way after the first one (which started the writer process)."""
    return ((save / "iter_0000001").exists()
            and any(name.endswith(".tmp") for name in os.listdir(save)))


def _saved_twice(save) -> bool:
    return (save / "iter_0000002").exists()


@pytest.mark.slow
@pytest.mark.parametrize("moment", [_saved_twice, _saving_again], ids=["mid-run", "mid-save"])
def test_sigkill_of_the_trainer_leaves_no_helper_process(tmp_path, moment):
    save = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    trainer = subprocess.Popen([sys.executable, "-m", "megatron_pr2.train", *ARGS, "--save",
                                str(save)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not moment(save):
            assert trainer.poll() is None, "the trainer ended before the moment to kill it"
            assert time.monotonic() < deadline, "the moment to kill the trainer never came"
            seen |= _descendants(trainer.pid)
            time.sleep(0.005)
        seen |= _descendants(trainer.pid)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    assert seen, "no helper process was ever started: the test would prove nothing"
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in seen if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


@pytest.mark.slow
def test_ctrl_c_prints_one_line_releases_the_lock_and_cleans_staging(tmp_path):
    save = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MEGATRON_PR2_DEBUG", None)
    # as a terminal starts it: Ctrl-C not ignored, even when this test runs in a background job
    # (a non-interactive shell starts those with SIGINT ignored, which children inherit; a
    # handled signal is reset to its default in the child instead)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "megatron_pr2.train", *ARGS, "--save",
                                    str(save)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 300
        while not _saving_again(save):
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(trainer.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, stderr = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
        trainer.wait()
    assert trainer.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        "error: interrupted (Ctrl-C)"]
    left = os.listdir(save)
    assert "trainer.lock" not in left and not [n for n in left if n.endswith(".tmp")], left
