"""A bare ``--help`` and a tiny training run print no Python warning; Megatron-Core's TE/Apex
fallback is told in one INFO line instead."""

import os
import re
import subprocess
import sys

import torch

# Python's warning format: "<file>:<line>: <Category>: <message>"
PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ", re.MULTILINE)
TINY_RUN = ["--train-iters", "1", "--rollout-batch-prompts", "2", "--n-samples-per-prompt", "2",
            "--off-policy-window", "1", "--micro-batch-size", "2", "--max-new-tokens", "4",
            "--eval-prompts", "2", *([] if torch.cuda.is_available() else ["--strict-device"])]


def _train(*args):
    return subprocess.run([sys.executable, "-m", "megatron_pr2.train", *args], check=False,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_prints_no_warning():
    result = _train("--help")
    assert result.returncode == 0
    assert "--routing-method" in result.stdout
    assert result.stderr == ""


def test_tiny_run_prints_no_python_warning_and_one_fallback_line():
    result = _train(*TINY_RUN)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PYTHON_WARNING.findall(result.stderr) == [], result.stderr
    assert len(re.findall(r" INFO \S+: Megatron-Core kernels: ", result.stderr)) == 1
