"""A real SGLang server on the GPU serves a 2-iteration R3 training run: the engine's routes are
replayed and every weight sync tags the server's weights with their version.

The server is this interpreter's ``sglang`` (``WITH_SGLANG=1 bash tools/gpu_smoke.sh`` installs
the pinned version) on 127.0.0.1 with an API key, serving a tiny random Qwen3-MoE; its start is
bounded (``STARTUP_S``), it kills itself after ``LIFETIME_S`` and the fixture always stops its
whole process group. Skipped when ``sglang`` is not installed here; ``REQUIRE_SGLANG=1`` makes
that a failure. One GPU: server and trainer share it and the weights go through CUDA IPC
(``--weight-sync tensor``: NCCL refuses two ranks on one device). Two or more: the server runs on
the last GPU and the weights go over NCCL (the default for SGLang).
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import requests
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.inprocess import build_hf_model
from megatron_pr2.rollout.sglang_server import (
    API_KEY_ENV,
    SGLangServer,
    sglang_importable,
)
from megatron_pr2.rollout.sglang_weight_api import SGLANG_VERSION
from tests.gpu.test_train_gpu import REPO

KEY = "gpu-smoke-key-0123456789"
STARTUP_S, LIFETIME_S, TRAIN_S = 420, 900, 420  # within pytest's 900 s per test (pytest.ini)
ZERO_DEV = "routing/zero_deviation_ratio"
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _require_sglang() -> None:
    """Skip (fail under REQUIRE_SGLANG=1) without sglang; fail on another version than the pin."""
    if not sglang_importable():
        reason = (f"sglang is not installed in {sys.executable}: pip install "
                  f"sglang=={SGLANG_VERSION} (WITH_SGLANG=1 bash tools/gpu_smoke.sh)")
        if os.environ.get("REQUIRE_SGLANG") == "1":
            pytest.fail(f"REQUIRE_SGLANG=1: {reason}")
        pytest.skip(reason)
    have = importlib.metadata.version("sglang")
    if have != SGLANG_VERSION:
        pytest.fail(f"sglang {have} is installed; the weight sync needs sglang=={SGLANG_VERSION}")


def _server_flags(gpu: int) -> list[str]:
    """A small bf16 server on ``gpu``: a fifth of its memory, no CUDA graphs (a quick start),
    kernels that take the tiny model's head dim (16)."""
    return ["--dtype", "bfloat16", "--mem-fraction-static", "0.2", "--base-gpu-id", str(gpu),
            "--attention-backend", "triton", "--sampling-backend", "pytorch",
            "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_sglang()
    checkpoint = tmp_path_factory.mktemp("tiny-qwen3-moe")
    torch.manual_seed(0)
    build_hf_model(preset("tiny-qwen3-moe")).save_pretrained(checkpoint)
    srv = SGLangServer(str(checkpoint), gpu=True, startup_timeout=STARTUP_S,
                       max_lifetime=LIFETIME_S, api_key=KEY,
                       extra_args=tuple(_server_flags(torch.cuda.device_count() - 1)),
                       log_path=str(tmp_path_factory.mktemp("sglang-log") / "sglang.log"))
    try:
        srv.start()  # raises with the log tail when it exits or does not answer in time
        yield srv
    finally:
        srv.stop()


def _train_command(address: str, jsonl: str) -> list[str]:
    sync = ["--weight-sync", "tensor"] if torch.cuda.device_count() == 1 else []
    return [sys.executable, "-m", "megatron_pr2.train", "--device", "cuda", "--bf16",
            "--routing-method", "r3", "--rollout-engine", "sglang", "--sglang-urls", address,
            "--train-iters", "2", "--rollout-batch-prompts", "2", "--n-samples-per-prompt", "2",
            "--off-policy-window", "2", "--micro-batch-size", "2", "--max-new-tokens", "6",
            "--rollout-timeout", "300", "--log-jsonl", jsonl, *sync]


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_r3_run_replays_the_servers_routes_and_tags_its_weights(server, tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV},
           API_KEY_ENV: KEY, "PYTHONPATH": os.pathsep.join(
               p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(_train_command(server.address, str(jsonl)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TRAIN_S, check=False)
    assert done.returncode == 0, (f"{done.stderr[-4000:]}\n--- SGLang log ---\n"
                                  f"{server.log_tail()}")
    rows = _rows(jsonl)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert f"{ZERO_DEV}/ministep1" in row and f"{ZERO_DEV}/ministep2" in row, sorted(row)
        ratios = {k: v for k, v in row.items() if k.startswith(ZERO_DEV)}
        assert all(0.0 < v <= 1.0 for v in ratios.values()), ratios
        assert row["rollout/servers_live"] == 1.0
    # each sample's version is the one its server reported (the client checks it)
    assert [r["rollout/weight_version"] for r in rows] == [0.0, 1.0]
    answer = requests.post(server.address + "/generate", timeout=60,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}})
    assert answer.json()["meta_info"]["weight_version"] == "2"  # the sync after iteration 2
