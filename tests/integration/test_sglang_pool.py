"""Real SGLang CPU servers (API key required, 127.0.0.1): the whole batch in flight, rewards
scored while generation goes on, a server killed mid-batch loses nothing and leaves the pool, a
training run whose second server is killed mid-run finishes on the first, and a killed server
relaunched at its address rejoins after a full weight sync; an asynchronous training run trains
each batch one weight version behind, as the servers report it.

Skipped when SGLang's venv (``tools/sglang_env.sh``) is absent. Three module-scoped servers (A, B,
C, started at once) serve a tiny random Qwen3-MoE whose LM head is zero: every token is equally
likely, so sampled responses stop at ``<eos>`` after varying lengths. The batch tests use A and
B; the kill test ends B, the training run uses A and C and ends C, the rejoin test relaunches B.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.inprocess import build_hf_model
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
from megatron_pr2.rollout.sglang_server import SGLangServer
from megatron_pr2.training.rollout_source import DigitPrompts, RolloutSource
from tests.integration.sglang_venv import VENV, requires_sglang_venv

pytestmark = requires_sglang_venv

CFG = preset("tiny-qwen3-moe")
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe-uniform")
    torch.manual_seed(0)
    model = build_hf_model(CFG)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution: eos at varying steps
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def servers(checkpoint):
    trio = [SGLangServer(checkpoint, venv=VENV, startup_timeout=900, max_lifetime=1800,
                         api_key=KEY) for _ in range(3)]
    try:
        for server in trio:
            server.launch()  # all start at once: one start's wait, not three
        for server in trio:
            server.wait_ready()
        yield trio
    finally:
        for server in trio:
            server.stop()


def make_client(servers, **config):
    """A client of servers A and B."""
    transport = SGLangClientConfig(request_timeout=300, api_key=KEY, max_concurrency=0, **config)
    return SGLangClient.for_hf_config([s.address for s in servers[:2]], CFG, config=transport)


def hold_until_all_in_flight(client, parties, timeout=300.0):
    """Wrap the client's transport so every /generate call waits at a barrier of ``parties``
    before it is sent; return the list that records a broken barrier.

    The barrier opens only when ``parties`` calls are inside the transport at the same time, so
    a client that capped its requests in flight below ``parties`` breaks it (after ``timeout``).
    This does not depend on how fast the server answers: a sample that stops at its first token
    cannot finish before the last request has started.
    """
    barrier, broken, original = threading.Barrier(parties, timeout=timeout), [], client._request_once

    def held(address, method, path, body=None, read_timeout=None):
        if path == "/generate":
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                broken.append(address)
        return original(address, method, path, body, read_timeout)

    client._request_once = held
    return broken


def signal_when_sent(client, count):
    """An event set once ``count`` /generate calls have entered the client's transport."""
    sent, lock, original = threading.Event(), threading.Lock(), client._request_once
    entered = []

    def counted(address, method, path, body=None, read_timeout=None):
        if path == "/generate":
            with lock:
                entered.append(address)
                if len(entered) >= count:
                    sent.set()
        return original(address, method, path, body, read_timeout)

    client._request_once = counted
    return sent


def test_update_endpoints_refuse_a_request_without_the_key(servers, checkpoint):
    address = servers[0].address
    for path in ("/begin_weight_update", "/update_weights_from_disk", "/generate"):
        answer = requests.post(address + path, json={"model_path": checkpoint}, timeout=30)
        assert answer.status_code == 401, (path, answer.status_code, answer.text)
    client = make_client(servers)
    from safetensors.torch import load_file

    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    client.update_weights(weights.items())  # the same weights back, through the key
    assert client.pool.live == [s.address for s in servers[:2]]
    sample = client.generate([[5, 7, 9]], SamplingParams(max_new_tokens=4, greedy=True))[0]
    assert sample.response_length >= 1
    keyless = SGLangClient.for_hf_config([address], CFG, config=SGLangClientConfig(max_attempts=1))
    from megatron_pr2.rollout.server_pool import NoServerLeftError

    with pytest.raises(NoServerLeftError, match="HTTP 401 .wrong or missing API key"):
        keyless.update_weights([("lm_head.weight", weights["lm_head.weight"])])


def test_whole_batch_in_flight_and_rewards_scored_while_generation_continues(
        servers, megatron_single_process):
    cfg = RunConfig()
    cfg.rollout.rollout_batch_prompts, cfg.rollout.n_samples_per_prompt = 4, 4
    cfg.rollout.max_new_tokens = 48
    client = make_client(servers)
    broken = hold_until_all_in_flight(client, parties=16)
    samples, metrics = RolloutSource(cfg, client, DigitPrompts(cfg)).collect(1)
    assert len(samples) == 16
    assert not broken, "the 16 requests were never in flight at once: the client capped them"
    assert {s.metadata["engine"] for s in samples} == {s.address for s in servers[:2]}
    finished = sorted(s.metadata["finished_at"] for s in samples)
    scored = sorted(s.metadata["scored_at"] for s in samples)
    assert scored[0] < finished[-1], "no reward was scored before the last sample arrived"
    assert all(s.reward is not None for s in samples)
    assert metrics["rollout/servers_live"] == 2.0 and metrics["rollout/server_evictions"] == 0.0


def test_async_run_trains_each_batch_one_version_behind_as_the_servers_report(
        servers, tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "megatron_pr2.train", "--device", "cpu",
               "--routing-method", "r3", "--rollout-engine", "sglang", "--async-rollout",
               "--sglang-urls", f"{servers[0].address},{servers[1].address}",
               "--train-iters", "3", "--rollout-batch-prompts", "2", "--n-samples-per-prompt", "2",
               "--off-policy-window", "1", "--micro-batch-size", "2", "--max-new-tokens", "6",
               "--rollout-timeout", "300", "--log-jsonl", str(jsonl)]
    launcher_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_env},
           "SGLANG_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(jsonl)
    # every sample's version is the one its server reported (checked by the client)
    assert [r["rollout/weight_version"] for r in rows] == [0.0, 0.0, 1.0]
    assert [r["rollout/weight_version_lag"] for r in rows] == [0.0, 1.0, 1.0]
    answer = requests.post(servers[0].address + "/generate", timeout=120,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}})
    assert answer.json()["meta_info"]["weight_version"] == "3"  # the sync after iteration 3


def test_server_killed_mid_batch_loses_nothing_and_leaves_the_pool(servers):
    client = make_client(servers)
    prompts = [[3 + i, 4 + i, 5 + i] for i in range(8)]
    sampling = SamplingParams(max_new_tokens=160, ignore_eos=True, seed=1)
    all_sent = signal_when_sent(client, count=8)
    result = {}
    worker = threading.Thread(target=lambda: result.update(samples=client.generate(prompts, sampling)))
    worker.start()
    assert all_sent.wait(timeout=120), "the 8 requests were not all sent"
    time.sleep(0.5)  # they reach the servers; 160 tokens take far longer on CPU
    assert worker.is_alive(), "the batch finished before the kill: raise max_new_tokens"
    servers[1].kill()
    worker.join(timeout=600)
    samples = result["samples"]
    assert len(samples) == 8 and all(s.response_length == 160 for s in samples)
    assert all(s.routed_experts.shape[0] == s.total_length - 1 for s in samples)
    assert {s.metadata["engine"] for s in samples} == {servers[0].address}
    metrics = client.metrics()
    assert metrics["rollout/servers_live"] == 1.0 and metrics["rollout/server_evictions"] == 1.0
    assert metrics["rollout/requests_retried"] >= 1.0
    # the next weight sync skips the dead server and the run goes on with the live one
    client.update_weights([("lm_head.weight", torch.zeros(CFG["vocab_size"], CFG["hidden_size"]))])
    assert client.pool.live == [servers[0].address]
    assert client.generate([[5, 6]], SamplingParams(max_new_tokens=2, greedy=True))[0].total_length == 4


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_run_whose_server_is_killed_mid_run_finishes_on_the_other(servers, tmp_path):
    survivor, victim = servers[0], servers[2]
    jsonl = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "megatron_pr2.train", "--device", "cpu",
               "--routing-method", "r3", "--rollout-engine", "sglang",
               "--sglang-urls", f"{survivor.address},{victim.address}", "--train-iters", "3",
               "--rollout-batch-prompts", "2", "--n-samples-per-prompt", "2",
               "--off-policy-window", "1", "--micro-batch-size", "2", "--max-new-tokens", "6",
               "--rollout-timeout", "300", "--log-jsonl", str(jsonl)]
    launcher_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_env},
           "SGLANG_API_KEY": KEY, "OMP_NUM_THREADS": "1"}  # a fresh one-process run
    log = tmp_path / "train.log"
    with open(log, "w", encoding="utf-8") as out:
        run = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while not read_rows(jsonl) and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert read_rows(jsonl), f"no iteration finished:\n{log.read_text()[-3000:]}"
            assert read_rows(jsonl)[0]["rollout/servers_live"] == 2.0
            victim.kill()  # after iteration 1: iteration 2 finds it dead
            code = run.wait(timeout=900)
        finally:
            if run.poll() is None:
                run.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    rows = read_rows(jsonl)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/servers_live"] == 1.0
    assert rows[-1]["rollout/server_evictions"] == 1.0
    assert f"SGLang server {victim.address} left the pool" in text


def test_restarted_server_rejoins_after_a_full_sync_and_generates_again(
        servers, megatron_single_process):
    """Server B, killed by an earlier test, is relaunched at its address while a trainer syncs
    to A: the next sync probes it, sends it the full weights (a new broadcast group with A and
    B), and only then does it rejoin and generate. Reference: A's served weights (checksums)."""
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import seed_model_parallel
    from megatron_pr2.training.engine_weight_sync import EngineWeightSync
    from megatron_pr2.weight_sync import (
        SGLangWeightAPI,
        WeightSyncOptions,
        build_weight_syncer,
    )

    a, b = servers[0], servers[1]
    b.kill()  # already dead after the kill test; this test alone (-k) needs it dead too
    client = make_client(servers, rejoin_interval=1.0)
    client.health()
    assert client.pool.live == [a.address]  # b is dead (killed mid-batch above)
    seed_model_parallel(3)
    _, _, model = build_model(CFG)
    sync = EngineWeightSync(lambda rejoining: build_weight_syncer(
        [model], client, CFG, WeightSyncOptions(), rejoining=rejoining), client, server_pool=True)
    sync.sync(1)
    b.launch()  # same port: same address (takes far longer than the 1 s probe interval)
    b.wait_ready()
    served = {s.address: SGLangWeightAPI(s.address, KEY).weight_checksums() for s in (a, b)}
    assert served[b.address] != served[a.address]  # b restarted with the checkpoint's weights
    sync.sync(2)
    assert client.pool.live == [a.address, b.address]
    assert client.metrics()["rollout/server_rejoins"] == 1.0
    assert SGLangWeightAPI(b.address, KEY).weight_checksums() == served[a.address]
    # distinct prompts: a prompt's samples share one server, prompts spread over the servers
    samples = client.generate([[5, 6, 7], [8, 9, 10], [5, 6, 7], [8, 9, 10]],
                              SamplingParams(max_new_tokens=2, greedy=True))
    assert {s.metadata["engine"] for s in samples} == {a.address, b.address}
    sync.close()
