"""pr2-lookahead end to end: with u = 0 it is R2 bit for bit; with u != 0 only later mini-steps
change. current-route replays a route that is never stale."""

import pytest

from tests.e2e.test_train_methods import _train_worker
from tests.multiproc import run_distributed

# the first test reading method_records trains all 7 methods (tests/e2e/conftest.py)
pytestmark = pytest.mark.timeout(1800)

IGNORED_PREFIXES = ("time/", "routing/old_pass/", "drift")


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(IGNORED_PREFIXES)}


@pytest.fixture
def r2_records(method_records):
    return method_records("r2")


def _without_entropy(record):
    return {k: v for k, v in _comparable(record).items() if k != "old/entropy"}


def test_lookahead_with_zero_step_is_r2_bit_for_bit(r2_records, tmp_path):
    records = run_distributed(_train_worker, 1, "pr2-lookahead", {}, str(tmp_path),
                              {"algo.lookahead_scale": 0.0})[0]
    # routes, log-probs, losses, grad norms, rewards: bit for bit
    assert [_without_entropy(r) for r in records] == [_without_entropy(r) for r in r2_records]
    # the old pass runs as two passes (mini-batch 1, then the rest) whose entropy diagnostic is
    # averaged back with weights: same value up to float summation order
    for mine, r2 in zip(records, r2_records):
        assert mine["old/entropy"] == pytest.approx(r2["old/entropy"], rel=1e-6)


def test_lookahead_is_r2_until_adam_has_state(r2_records, method_records):
    records = method_records("pr2-lookahead")  # --lookahead-scale 0.75
    # iteration 1: Adam has no state yet (u = 0): R2 exactly, the lookahead routes are
    # theta_0's own live routes
    assert _without_entropy(records[0]) == _without_entropy(r2_records[0])
    assert records[0]["old/entropy"] == pytest.approx(r2_records[0]["old/entropy"], rel=1e-6)
    assert records[0]["routing/old_pass/zero_deviation_ratio"] == 1.0
    # mini-step 1 replays R2's exact route in every iteration (the routes' move under a real
    # Adam step is checked in tests/megatron/test_lookahead_parallel.py)
    assert records[1]["routing/zero_deviation_ratio/ministep1"] == 1.0


def test_pr2_with_the_optimizer_predictor_trains_without_predictor_loss(tmp_path):
    records = run_distributed(_train_worker, 1, "pr2", {}, str(tmp_path),
                              {"predictor.predictor": "optimizer"})[0]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["routing/zero_deviation_ratio/ministep1"] == 1.0
    assert not any("predictor_loss" in key for record in records for key in record)


def test_lookahead_under_the_distributed_optimizer_matches_the_plain_optimizer(tmp_path):
    """DP=2 in the real loop (chained optimizers behind the LR-schedule wrapper): the collective
    shift / all-gather / restore runs and trains exactly like the plain optimizer.

    This tiny run's rewards are all zero, so Adam's moments stay zero and ``u`` is the weight
    decay alone (``-lr wd theta``): it checks the wiring and that the restore is exact, not
    that the shift moves routes (tests/megatron/test_lookahead_distopt.py checks that).
    """
    runs = {}
    for name, distributed in (("plain", False), ("sharded", True)):
        overrides = {"train.weight_decay": 0.1, "train.use_distributed_optimizer": distributed}
        records = run_distributed(_train_worker, 2, "pr2-lookahead", {}, str(tmp_path / name),
                                  overrides)[0]
        runs[name] = [_comparable(r) for r in records]
    plain, sharded = runs["plain"], runs["sharded"]
    assert [r["step"] for r in sharded] == [1, 2]
    for mine, reference in zip(sharded, plain):
        assert mine.keys() == reference.keys()
        # the global grad norm sums its squares in another order (per slice, then over DP)
        assert mine == pytest.approx(reference, rel=1e-5, abs=1e-7)
