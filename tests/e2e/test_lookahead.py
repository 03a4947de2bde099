"""pr2-lookahead end to end: with u = 0 it is R2 bit for bit; with u != 0 only later mini-steps
change. current-route replays a route that is never stale."""

import pytest

from tests.e2e.test_train_methods import _run, _train_worker
from tests.multiproc import run_distributed

IGNORED_PREFIXES = ("time/", "routing/old_pass/", "drift")


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(IGNORED_PREFIXES)}


@pytest.fixture(scope="module")
def r2_records(tmp_path_factory):
    return _run("r2", tmp_path_factory.mktemp("r2"))


def test_lookahead_with_zero_step_is_r2_bit_for_bit(r2_records, tmp_path):
    records = run_distributed(_train_worker, 1, "pr2-lookahead", {}, str(tmp_path),
                              {"algo.lookahead_scale": 0.0})[0]
    assert [_comparable(r) for r in records] == [_comparable(r) for r in r2_records]


def test_lookahead_changes_only_routes_after_the_first_adam_step(r2_records, tmp_path):
    # a long lookahead (20 steps) so that the tiny model's routes surely move
    records = run_distributed(_train_worker, 1, "pr2-lookahead", {}, str(tmp_path),
                              {"algo.lookahead_scale": 20.0})[0]
    # iteration 1: Adam has no state yet (u = 0): R2 exactly
    assert _comparable(records[0]) == _comparable(r2_records[0])
    # the old pass replays the lookahead routes at theta_0: they equal theta_0's own live
    # routes only while u = 0
    old_zero_dev = "routing/old_pass/zero_deviation_ratio"
    assert records[0][old_zero_dev] == 1.0
    assert records[1][old_zero_dev] < 1.0
    # mini-step 1 is R2's exact route in every iteration
    assert records[1]["routing/zero_deviation_ratio/ministep1"] == 1.0
