"""Children forked while a process is tied die with it when it is killed with SIGKILL; a child
forked before (the control) outlives it, as every helper did before."""

import os
import signal
import subprocess
import sys
import time

from tests.procfs import alive

PARENT = """
import multiprocessing, sys, time
from megatron_pr2.platform.process_tree import helpers_tied_to_this_process

fork = multiprocessing.get_context("fork")
untied = fork.Process(target=time.sleep, args=(120,))
untied.start()
with helpers_tied_to_this_process():
    tied = fork.Process(target=time.sleep, args=(120,))
    tied.start()
    print(untied.pid, tied.pid, flush=True)
    time.sleep(120)
"""


def test_a_tied_child_dies_with_its_killed_parent_and_an_untied_one_does_not():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        untied, tied = map(int, parent.stdout.readline().split())
        assert alive(untied) and alive(tied)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    deadline = time.monotonic() + 10
    while alive(tied) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(tied)
        assert alive(untied)  # the control: nothing else would have stopped it
    finally:
        for pid in (untied, tied):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
