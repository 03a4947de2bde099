"""Asynchronous rollout end to end (tiny model, in-process engine, R3 replaying the engine's
routes): the next batch generates while the current one trains, every batch records the weight
version that generated it, staleness 0 reproduces the synchronous loop, and a resumed run
generates the batch that was ahead again (nothing trained twice or skipped).

All runs share one spawned process (tests/e2e/test_train_methods.py's worker)."""

import itertools
import traceback

import pytest

from tests.e2e.test_train_methods import _train_worker
from tests.multiproc import run_distributed

pytestmark = pytest.mark.timeout(1200)

ITERATIONS = 3
# a short SFT warm-up makes rewards differ within groups: the policy moves every iteration
LEARNS = {"train.train_iters": ITERATIONS, "train.warmup_sft_steps": 40,
          "task.partial_credit": True, "rollout.n_samples_per_prompt": 4}
RUNS = {
    "sync": {},
    "async0": {"rollout.async_rollout": True, "rollout.max_weight_staleness": 0},
    "async1": {"rollout.async_rollout": True, "rollout.max_weight_staleness": 1},
}
RESUMED = {"rollout.async_rollout": True, "train.save_interval": 1}


def _all_runs(rank, out_dir):
    results = {}
    try:
        for name, overrides in RUNS.items():
            results[name] = _train_worker(rank, "r3", {}, f"{out_dir}/{name}",
                                          {**LEARNS, **overrides})
        _train_worker(rank, "r3", {}, f"{out_dir}/resumed",
                      {**LEARNS, **RESUMED, "train.train_iters": 2})
        # the same directory: resumes after iteration 2; the log holds both runs' iterations
        results["resumed"] = _train_worker(rank, "r3", {}, f"{out_dir}/resumed",
                                           {**LEARNS, **RESUMED, "train.train_iters": 4})
    except Exception:  # noqa: BLE001 - reported by the tests
        results["error"] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = run_distributed(_all_runs, 1, str(tmp_path_factory.mktemp("async")))[0]
    if "error" in results:
        pytest.fail(results["error"])
    return results


def _column(records, key):
    return [r.get(key) for r in records]


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_staleness_zero_is_the_synchronous_loop(runs):
    assert runs["sync"][0]["train/policy_grad_norm"] > 0  # the policy does move
    assert _without_times(runs["async0"]) == _without_times(runs["sync"])


def test_each_batch_records_the_weights_that_generated_it(runs):
    assert _column(runs["sync"], "rollout/weight_version") == [0.0, 1.0, 2.0]
    assert _column(runs["sync"], "rollout/weight_version_lag") == [0.0, 0.0, 0.0]
    # batch k+1 generates while batch k trains: with the weights before iteration k
    assert _column(runs["async1"], "rollout/weight_version") == [0.0, 0.0, 1.0]
    assert _column(runs["async1"], "rollout/weight_version_lag") == [0.0, 1.0, 1.0]
    assert _column(runs["async1"], "rollout/first_prompt") == [0.0, 4.0, 8.0]


def test_rollout_of_the_next_batch_overlaps_training_of_this_one(runs):
    records = runs["async1"]
    for this, following in itertools.pairwise(records):
        assert following["time/rollout_start_s"] < this["time/train_end_s"]
        assert following["time/rollout_end_s"] > this["time/train_start_s"]
    for this, following in itertools.pairwise(runs["sync"]):  # in step: one after the other
        assert following["time/rollout_start_s"] >= this["time/train_end_s"]


def test_a_resumed_run_regenerates_the_batch_that_was_ahead(runs):
    records = runs["resumed"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # every prompt position trained exactly once across the restart
    assert _column(records, "rollout/first_prompt") == [0.0, 4.0, 8.0, 12.0]
    # batch 3 was generated ahead (version 0) before the stop; after it, by the restored weights
    assert _column(records, "rollout/weight_version") == [0.0, 0.0, 2.0, 2.0]
    assert _column(records, "rollout/weight_version_lag") == [0.0, 1.0, 0.0, 1.0]


def test_two_ranks_receive_the_batch_generated_ahead(tmp_path):
    """Rank 0 generates in its background thread while both ranks train; the batch reaches
    rank 1 in the main thread's scatter (expert parallel over 2 processes)."""
    records = run_distributed(_train_worker, 2, "r3", {"expert_model_parallel_size": 2},
                              str(tmp_path), {"rollout.async_rollout": True})[0]
    assert [r["step"] for r in records] == [1, 2]
    assert _column(records, "rollout/weight_version_lag") == [0.0, 1.0]
