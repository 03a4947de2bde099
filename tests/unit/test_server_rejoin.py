"""When evicted SGLang servers are probed for a rejoin, and which become candidates.

References: probe times computed by hand from the documented rule (first probe at once, then
every interval, the interval doubled per failed rejoin up to 2**16); fake servers on 127.0.0.1 for
the ``/health`` probes (their request logs say what was asked).
"""

import pytest
import torch

from megatron_pr2.rollout.rejoin_schedule import MAX_DOUBLINGS, RejoinSchedule
from megatron_pr2.rollout.server_pool import ServerPool
from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
from tests.fake_sglang import ROUTE_SHAPE, VOCAB, closed_address, fake_servers


def test_first_probe_is_at_once_then_one_per_interval():
    schedule = RejoinSchedule(10.0)
    assert schedule.due(["a", "b"], now=100.0) == ["a", "b"]
    assert schedule.due(["a", "b"], now=109.9) == []
    assert schedule.due(["a", "b", "c"], now=105.0) == ["c"]  # newly evicted: at once
    assert schedule.due(["a", "b", "c"], now=110.0) == ["a", "b"]
    assert schedule.next_probe("c") == 115.0


def test_each_failed_rejoin_doubles_the_interval_up_to_the_cap():
    schedule = RejoinSchedule(10.0)
    now, waits = 0.0, []
    schedule.due(["a"], now)
    for _ in range(MAX_DOUBLINGS + 2):
        schedule.failed(["a"], now)
        waits.append(schedule.next_probe("a") - now)
        now = schedule.next_probe("a")
        assert schedule.due(["a"], now - 1e-6) == [] and schedule.due(["a"], now) == ["a"]
    assert waits[:4] == [20.0, 40.0, 80.0, 160.0]
    assert MAX_DOUBLINGS == 16 and waits[-3:] == [655360.0] * 3  # 10 s * 2**16, about a week


def test_a_server_no_longer_evicted_is_forgotten_and_a_later_eviction_starts_afresh():
    schedule = RejoinSchedule(10.0)
    schedule.due(["a"], 0.0)
    schedule.failed(["a"], 0.0)
    assert schedule.due([], 1.0) == [] and schedule.next_probe("a") is None
    assert schedule.due(["a"], 2.0) == ["a"] and schedule.next_probe("a") == 12.0


def test_interval_zero_turns_probing_off_and_a_negative_one_is_refused():
    assert RejoinSchedule(0).due(["a"], 0.0) == []
    with pytest.raises(ValueError, match="rejoin interval must be >= 0"):
        RejoinSchedule(-1)
    with pytest.raises(ValueError, match="rejoin_interval must be >= 0"):
        SGLangClientConfig(rejoin_interval=-5)


def test_pool_probes_only_evicted_servers_and_counts_rejoins(caplog):
    pool = ServerPool(["a", "b", "c"], rejoin_interval_s=30.0)
    assert pool.probe_due(now=0.0) == []
    pool.evict("c", "refused")
    pool.evict("a", "timed out")
    assert pool.probe_due(now=1.0) == ["a", "c"]  # pool order
    pool.rejoin_failed(["c"], "broadcast failed", now=2.0)
    assert "SGLang server c answered /health but the full weight sync with it failed" in caplog.text
    assert "next probe in 60 s" in caplog.text
    pool.rejoin("a")
    assert pool.live == ["a", "b"] and pool.metrics()["rollout/server_rejoins"] == 1.0
    assert pool.probe_due(now=31.0) == []  # c waits 60 s after its failed rejoin
    assert pool.probe_due(now=62.0) == ["c"]
    pool.evict("a", "refused again")
    assert pool.probe_due(now=63.0) == []  # rejoined once, then evicted: waits 30 s * 2
    assert pool.probe_due(now=123.0) == ["a", "c"]  # c: 62 s + 60 s


def test_a_server_failing_again_after_each_rejoin_waits_twice_as_long_each_time():
    schedule = RejoinSchedule(10.0)
    assert schedule.due(["a"], 0.0) == ["a"]  # first eviction: at once
    waits, now = [], 0.0
    for _ in range(3):
        schedule.rejoined("a")
        assert schedule.due([], now) == []  # back in the pool
        now += 1.0  # evicted again (it hangs once more)
        assert schedule.due(["a"], now) == []
        waits.append(schedule.next_probe("a") - now)
        now = schedule.next_probe("a")
        assert schedule.due(["a"], now) == ["a"]
    assert waits == [20.0, 40.0, 80.0]  # 10 s * 2**rejoins


def probe_client(addresses, interval):
    config = SGLangClientConfig(connect_timeout=1.0, request_timeout=5.0, max_attempts=1,
                                rejoin_interval=interval)
    return SGLangClient(addresses, ROUTE_SHAPE, vocab_size=VOCAB, config=config)


def health_requests(server):
    return sum(1 for path, _ in server.requests if path == "/health")


def test_candidates_are_evicted_servers_that_answer_health_probed_once_per_interval():
    with fake_servers(lambda p, b, c: (200, {}), lambda p, b, c: (200, {})) as (live, back):
        dead = closed_address()
        client = probe_client([live.address, back.address, dead], interval=3600.0)
        client.pool.evict(back.address, "timed out")
        client.pool.evict(dead, "refused")
        assert client.rejoin_candidates() == [back.address]
        assert client.pool.live == [live.address]  # a candidate is not live before its sync
        assert client.rejoin_candidates() == []  # within the interval: no second probe
    assert health_requests(back) == 1 and health_requests(live) == 0


def test_a_candidate_failing_the_client_weight_update_stays_out_and_waits_longer():
    def refuses_weights(path, body, count):
        if path == "/update_weights_from_tensor":
            return 500, {"success": False, "message": "out of memory"}
        return 200, {"success": True}

    with fake_servers(lambda p, b, c: (200, {"success": True}), refuses_weights) as (good, bad):
        client = probe_client([good.address, bad.address], interval=3600.0)
        client.pool.evict(bad.address, "timed out")
        client.update_weights([("x", torch.zeros(2))])
        assert client.pool.live == [good.address]
        assert client.pool.metrics()["rollout/server_rejoins"] == 0.0
        probes = health_requests(bad)
        client.update_weights([("x", torch.ones(2))])
    assert probes == 1 and health_requests(bad) == 1  # backed off: not probed again
