"""SGLang adapter against fake SGLang servers (http.server threads on 127.0.0.1).

A well-behaved fake answers with values from closed-form formulas the test computes independently;
misbehaving fakes send each kind of malformed answer, fail transiently, or die mid-batch.
"""

import base64
import pickle
import threading

import numpy as np
import pytest
import torch

from megatron_pr2.rollout.engine import (
    EngineUnavailableError,
    PartialRolloutError,
    RolloutError,
)
from megatron_pr2.rollout.sample import (
    SEED_LIMIT,
    SampleStatus,
    SamplingParams,
    sample_seed,
)
from megatron_pr2.rollout.sglang_client import (
    SGLangClient,
    SGLangClientConfig,
    build_generate_payload,
    prompt_groups,
)
from tests.fake_sglang import (
    EXPERTS,
    LAYERS,
    ROUTE_SHAPE,
    VOCAB,
    closed_address,
    expected_logprob,
    expected_output,
    expected_route,
    fake_servers,
    good_answer,
)

FAST = SGLangClientConfig(connect_timeout=1.0, request_timeout=5.0, max_attempts=2, backoff=0.01,
                          max_concurrency=1)


def client(addresses, **config):
    cfg = SGLangClientConfig(**{**FAST.__dict__, **config})
    return SGLangClient(addresses, ROUTE_SHAPE, vocab_size=VOCAB, config=cfg)


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
GREEDY = SamplingParams(max_new_tokens=5, greedy=True)


def check_sample(sample, prompt, n=5):
    out = expected_output(prompt, n)
    assert sample.tokens.tolist() == prompt + out
    assert sample.rollout_log_probs.tolist() == pytest.approx([expected_logprob(i) for i in range(n)])
    rows = len(prompt) + n - 1
    expected = [[expected_route(t, l) for l in (0, 2, 3)] for t in range(rows)]
    assert sample.routed_experts.dtype == torch.uint8
    assert sample.routed_experts.tolist() == expected
    assert sample.status is SampleStatus.TRUNCATED


def test_good_answers_become_samples_and_requests_follow_the_wire_contract():
    with fake_servers(None) as (server,):
        samples = client([server.address]).generate(PROMPTS, GREEDY)
    for sample, prompt in zip(samples, PROMPTS):
        check_sample(sample, prompt)
        assert sample.metadata["engine"] == server.address
    path, body = server.requests[0]
    assert path == "/generate"
    assert body["return_routed_experts"] is True and body["routed_experts_start_len"] == 0
    assert body["return_logprob"] is True and body["sampling_params"]["temperature"] == 0.0


def test_payload_of_sampling_params():
    payload = build_generate_payload([1, 2], SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5,
                                                            top_p=0.9, stop_token_ids=(2,), seed=4),
                                     return_logprobs=False, return_routed_experts=False)
    assert payload == {"input_ids": [1, 2], "return_logprob": False, "sampling_params": {
        "max_new_tokens": 3, "temperature": 0.7, "top_p": 0.9, "ignore_eos": False, "top_k": 5,
        "stop_token_ids": [2], "sampling_seed": sample_seed(4, 0)}}


SAMPLED = SamplingParams(max_new_tokens=5, temperature=1.0, seed=9)


def _seeds(batch_seed, count):
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0, seed=batch_seed)
    return [build_generate_payload([1, 2], sampling, return_logprobs=False,
                                   return_routed_experts=False, request_index=i)
            ["sampling_params"]["sampling_seed"] for i in range(count)]


def test_each_request_of_a_batch_samples_with_its_own_seed_reproducibly():
    first = _seeds(9, 64)
    assert len(set(first)) == 64, "two requests of one batch share a sampling seed"
    assert all(isinstance(s, int) and 0 <= s < SEED_LIMIT for s in first)
    assert _seeds(9, 64) == first  # reproducible from the batch seed
    assert not set(_seeds(10, 64)) & set(first)  # the next iteration draws other seeds
    with pytest.raises(ValueError, match="request index -1 outside"):
        sample_seed(9, -1)


def test_the_samples_of_one_prompt_reach_the_server_with_distinct_seeds():
    with fake_servers(None) as (server,):
        client([server.address], max_concurrency=4).generate([PROMPTS[0]] * 4, SAMPLED)
    sent = sorted(body["sampling_params"]["sampling_seed"] for _, body in server.requests)
    assert sent == sorted(_seeds(9, 4))


def test_prompt_groups_are_runs_of_equal_prompts():
    assert prompt_groups([[1], [1], [2], [2], [1], [3, 4]]) == [0, 0, 1, 1, 2, 3]
    assert prompt_groups([]) == []


def test_a_prompts_samples_go_to_one_server_and_prompts_spread_over_servers():
    repeated = [prompt for prompt in PROMPTS for _ in range(3)]
    with fake_servers(None, None) as (a, b):
        samples = client([a.address, b.address], max_concurrency=4).generate(repeated, SAMPLED)
    servers_of = {}
    for sample, prompt in zip(samples, repeated):
        servers_of.setdefault(tuple(prompt), set()).add(sample.metadata["engine"])
    assert all(len(servers) == 1 for servers in servers_of.values()), servers_of
    assert len(a.requests) == len(b.requests) == 6


def corrupt(mutate):
    def behaviour(path, body, count):
        answer = good_answer(body)
        mutate(answer, body)
        return 200, answer
    return behaviour


def set_routes(num_rows_delta=0, dtype="<i4", dense=(1,), edit=None):
    def mutate(answer, body):
        rows = len(body["input_ids"]) + len(answer["output_ids"]) - 1 + num_rows_delta
        routes = np.array([[expected_route(t, l) for l in range(LAYERS)] for t in range(rows)])
        routes[:, list(dense)] = 0
        if edit:
            edit(routes)
        answer["meta_info"]["routed_experts"] = base64.b64encode(routes.astype(dtype).tobytes()).decode()
    return mutate


def _set(key, value):
    def edit(routes):
        routes[key] = value
    return edit


MALFORMED = {
    "missing output_ids": (corrupt(lambda a, b: a.pop("output_ids")), "no 'output_ids' field"),
    "missing meta_info": (corrupt(lambda a, b: a.pop("meta_info")), "no 'meta_info' field"),
    "missing routes": (corrupt(lambda a, b: a["meta_info"].pop("routed_experts")), "enable-return-routed-experts"),
    "truncated routes": (corrupt(set_routes(-1)), "truncated, re-prefilled"),
    "int64 routes": (corrupt(set_routes(dtype="<i8")), "wrong dtype"),
    "expert id >= E": (corrupt(set_routes(edit=_set((2, 3, 1), EXPERTS))), r"expert id 8 out of range"),
    "all-zero MoE layer": (corrupt(set_routes(dense=(1, 2))), "all zeros"),
    "too few logprobs": (corrupt(lambda a, b: a["meta_info"]["output_token_logprobs"].pop()),
                         "has 4 entries for 5 output tokens"),
    "logprob of another token": (corrupt(lambda a, b: a["meta_info"]["output_token_logprobs"][1].__setitem__(1, 63)),
                                 r"output_token_logprobs\[1\] is for token 63"),
    "token outside vocab": (corrupt(lambda a, b: a["output_ids"].__setitem__(0, VOCAB)), "outside \\[0, 64\\)"),
    "float tokens": (corrupt(lambda a, b: a["output_ids"].__setitem__(0, 1.5)), "list of integers"),
    "prompt re-counted": (corrupt(lambda a, b: a["meta_info"].__setitem__("prompt_tokens", 99)),
                          "server counted 99 prompt tokens"),
    "unknown finish": (corrupt(lambda a, b: a["meta_info"].__setitem__("finish_reason", {"type": "?"})),
                       "finish_reason"),
    "not json": (lambda path, body, count: (200, "<html>oops"), "answer is not JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_answers_give_clear_errors_without_retry(case):
    behaviour, message = MALFORMED[case]
    with fake_servers(behaviour) as (server,):
        with pytest.raises(PartialRolloutError, match=message) as info:
            client([server.address]).generate(PROMPTS[:1], GREEDY)
    assert info.value.failed_indices == [0] and info.value.collected == []
    assert len(server.requests) == 1  # a malformed answer is not retried


def test_transient_server_errors_are_retried():
    def flaky(path, body, count):
        return (503, {"error": "busy"}) if count == 1 else (200, good_answer(body))
    with fake_servers(flaky) as (server,):
        sample = client([server.address]).generate(PROMPTS[:1], GREEDY)[0]
    check_sample(sample, PROMPTS[0])
    assert len(server.requests) == 2


def test_client_errors_are_not_retried():
    with fake_servers(lambda p, b, c: (400, {"error": "bad input_ids"})) as (server,):
        with pytest.raises(PartialRolloutError, match="HTTP 400.*bad input_ids"):
            client([server.address]).generate(PROMPTS[:1], GREEDY)
    assert len(server.requests) == 1


def test_server_dying_mid_batch_keeps_collected_samples_and_the_rest_can_resume():
    dead = {}

    def dies_after_two(path, body, count):
        if count > 2:
            dead["yes"] = True
            return None, None
        return 200, good_answer(body)

    with fake_servers(dies_after_two) as (server,):
        with pytest.raises(PartialRolloutError) as info:
            client([server.address]).generate(PROMPTS, GREEDY)
    err = info.value
    assert err.failed_indices == [2, 3]
    check_sample(err.samples[0], PROMPTS[0])
    check_sample(err.samples[1], PROMPTS[1])
    assert "NoServerLeftError" in str(err) and "Connection aborted" in str(err)
    with fake_servers(None) as (replacement,):
        resumed = client([replacement.address]).generate([PROMPTS[i] for i in err.failed_indices], GREEDY)
    for sample, i in zip(resumed, err.failed_indices):
        check_sample(sample, PROMPTS[i])


def test_requests_spread_over_servers_and_avoid_a_dead_one():
    with fake_servers(None, None) as (a, b):
        samples = client([a.address, b.address], max_concurrency=4).generate(PROMPTS, GREEDY)
        assert len(a.requests) == 2 and len(b.requests) == 2
        for sample, prompt in zip(samples, PROMPTS):
            check_sample(sample, prompt)
        samples = client([closed_address(), a.address]).generate(PROMPTS, GREEDY)
    assert all(s.metadata["engine"] == a.address for s in samples)


def test_all_servers_down_raises_unavailable():
    with pytest.raises(PartialRolloutError, match="NoServerLeftError.*Connection refused") as info:
        client([closed_address()]).generate(PROMPTS[:2], GREEDY)
    assert info.value.failed_indices == [0, 1]


def weight_server():
    state = {"updates": []}

    def behaviour(path, body, count):
        if path == "/update_weights_from_tensor":
            blobs = body["serialized_named_tensors"]
            state["updates"].append((pickle.loads(base64.b64decode(blobs[0])), body["flush_cache"], len(blobs)))
        return 200, {"success": True, "message": "ok"}
    return behaviour, state


def test_update_weights_sends_chunks_inside_a_session():
    behaviour, state = weight_server()
    tensors = [(f"model.layers.{i}.mlp.gate.weight", torch.randn(8, 16)) for i in range(3)]
    big = torch.randn(64, 64)
    with fake_servers(behaviour, behaviour) as servers:
        client([s.address for s in servers], weight_chunk_bytes=1024, tp_size=2).update_weights(
            tensors + [("lm_head.weight", big[:8])])  # a view: only its own bytes travel
        for server in servers:
            assert [p for p, _ in server.requests] == ["/begin_weight_update"] + [
                "/update_weights_from_tensor"] * 3 + ["/end_weight_update"]
    # 512-byte gates: [g0, g1] fill a 1024-byte chunk, g2 alone, the 2048-byte view alone
    assert [len(chunk) for chunk, _, _ in state["updates"][:3]] == [2, 1, 1]
    sent = [item for chunk, _, _ in state["updates"][:3] for item in chunk]
    assert [n for n, _ in sent] == [n for n, _ in tensors] + ["lm_head.weight"]
    for (_, got), (_, want) in zip(sent, tensors + [("lm_head.weight", big[:8])]):
        assert torch.equal(got, want)
    assert sent[-1][1].untyped_storage().nbytes() == 8 * 64 * 4
    assert [flush for _, flush, _ in state["updates"][:3]] == [False, False, True]
    assert all(n == 2 for _, _, n in state["updates"])  # one payload per TP rank


def test_failed_weight_update_is_an_error_and_closes_the_session():
    def refuses(path, body, count):
        ok = path != "/update_weights_from_tensor"
        return (200 if ok else 400), {"success": ok, "message": "bad name"}
    with fake_servers(refuses) as (server,):
        with pytest.raises(RolloutError, match="HTTP 400.*bad name"):
            client([server.address]).update_weights([("x", torch.zeros(2))])
    assert [p for p, _ in server.requests][-1] == "/end_weight_update"


def test_update_weights_from_disk_reports_failure():
    with fake_servers(lambda p, b, c: (200, {"success": False, "message": "no such dir"})) as (server,):
        with pytest.raises(RolloutError, match="no such dir"):
            client([server.address]).update_weights_from_disk("/nowhere")
    assert server.requests == [("/update_weights_from_disk", {"model_path": "/nowhere"})]


def test_health_reports_each_address():
    with fake_servers(lambda p, b, c: (200, {})) as (server,):
        dead = closed_address()
        health = client([server.address, dead]).health()
    assert health.healthy == {server.address: True, dead: False} and not health.ok
    assert server.requests[0][0] == "/health"


def test_whole_batch_is_in_flight_at_once_by_default():
    arrived = threading.Barrier(len(PROMPTS), timeout=5)

    def waits_for_all(path, body, count):
        arrived.wait()  # breaks (BrokenBarrierError -> no answer) unless all requests are open
        return 200, good_answer(body)

    with fake_servers(waits_for_all, waits_for_all) as servers:
        samples = client([s.address for s in servers], max_concurrency=0).generate(PROMPTS, GREEDY)
    for sample, prompt in zip(samples, PROMPTS):
        check_sample(sample, prompt)


def test_samples_are_handed_over_while_other_requests_still_generate():
    release = threading.Event()
    seen = []

    def last_prompt_waits(path, body, count):
        if body["input_ids"] == PROMPTS[-1]:
            assert release.wait(5), "the held request was never released"
        return 200, good_answer(body)

    def on_sample(index, sample):
        seen.append(index)
        if len(seen) == len(PROMPTS) - 1:
            release.set()  # only possible if the first samples arrived before the last one

    with fake_servers(last_prompt_waits) as (server,):
        samples = client([server.address], max_concurrency=0).generate(PROMPTS, GREEDY,
                                                                        on_sample=on_sample)
    assert sorted(seen[:-1]) == [0, 1, 2] and seen[-1] == 3
    assert all(s.metadata["finished_at"] > 0 for s in samples)


def test_a_server_failing_a_weight_update_leaves_the_pool_and_rejoins_after_a_full_sync():
    behaviour, _ = weight_server()
    broken = {"on": True}

    def sometimes_refuses(path, body, count):
        if broken["on"] and path == "/update_weights_from_tensor":
            return 500, {"success": False, "message": "out of memory"}
        return behaviour(path, body, count) if path != "/generate" else (200, good_answer(body))

    def always_works(path, body, count):
        return behaviour(path, body, count) if path != "/generate" else (200, good_answer(body))

    with fake_servers(sometimes_refuses, always_works) as (flaky, good):
        c = client([flaky.address, good.address], max_concurrency=0)
        c.update_weights([("x", torch.zeros(2))])
        assert c.pool.live == [good.address] and "out of memory" in c.pool.evicted[flaky.address]
        assert c.metrics()["rollout/server_evictions"] == 1.0
        flaky.requests.clear()
        samples = c.generate(PROMPTS, GREEDY)
        assert {s.metadata["engine"] for s in samples} == {good.address} and not flaky.requests
        broken["on"] = False
        c.update_weights([("x", torch.ones(2))])
        assert c.pool.live == [flaky.address, good.address]
        assert c.metrics()["rollout/server_rejoins"] == 1.0


def test_the_run_stops_with_a_clear_error_only_when_no_server_is_left():
    from megatron_pr2.rollout.server_pool import NoServerLeftError

    c = client([closed_address(), closed_address()])
    with pytest.raises(NoServerLeftError, match="no SGLang server left in the pool \\(2 evicted\\)"):
        c.update_weights([("x", torch.zeros(2))])
    assert c.metrics()["rollout/servers_live"] == 0.0


def test_health_check_failure_evicts():
    with fake_servers(lambda p, b, c: (200, {})) as (server,):
        dead = closed_address()
        c = client([server.address, dead])
        c.health()
    assert c.pool.live == [server.address] and dead in c.pool.evicted


def test_unavailable_error_type_is_exported():
    assert issubclass(EngineUnavailableError, RolloutError)


def test_a_server_answering_malformed_routes_is_retried_elsewhere_and_evicted():
    """The issue's pool: one good server, one sending routed_experts one row short. Every
    prompt still gets its sample (retried on the good server), the bad server leaves the pool
    after BAD_ANSWERS_TO_EVICT answers, and the next batch runs on the good one alone."""
    from megatron_pr2.rollout.server_pool import BAD_ANSWERS_TO_EVICT

    prompts = [[i + 1, i + 2] for i in range(8)]
    with fake_servers(None, corrupt(set_routes(-1))) as (good, bad):
        engine = client([good.address, bad.address])
        for batch in range(2):
            samples = engine.generate(prompts, GREEDY)
            for sample, prompt in zip(samples, prompts):
                check_sample(sample, prompt)
                assert sample.metadata["engine"] == good.address
        assert len(bad.requests) == BAD_ANSWERS_TO_EVICT == 3  # none after its eviction
        assert len(good.requests) == 2 * len(prompts)
    assert list(engine.pool.evicted) == [bad.address]
    assert "3 malformed answers, the last:" in engine.pool.evicted[bad.address]
    assert "truncated, re-prefilled" in engine.pool.evicted[bad.address]
    metrics = engine.metrics()
    assert metrics["rollout/malformed_answers"] == 3.0
    assert metrics["rollout/servers_live"] == 1.0 and metrics["rollout/requests_retried"] == 3.0
