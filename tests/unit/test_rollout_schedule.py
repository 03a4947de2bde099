"""The rollout schedule: which weights generate each batch, and that the next batch generates
while the current one trains (a fake source and engine; no process group)."""

import threading

import pytest

from megatron_pr2.training import rollout_schedule
from megatron_pr2.training.rollout_schedule import RolloutSchedule

PROMPTS = 4


class _Cfg:
    class rollout:
        rollout_batch_prompts = PROMPTS


class FakeSource:
    """Records the engine's weight version and the prompt position of each generation; a
    generation may be held until the test releases it."""

    def __init__(self):
        self.cfg = _Cfg
        self.data_position = 0
        self.engine_version = 0
        self.generated = []  # (iteration, start, engine version at generation)
        self.hold = {}  # iteration -> Event the generation waits for
        self.fail = set()

    def reserve_prompts(self):
        start = self.data_position
        self.data_position += PROMPTS
        return start

    def generate(self, iteration, start):
        self.generated.append((iteration, start, self.engine_version))
        if iteration in self.hold and not self.hold[iteration].wait(timeout=30):
            raise TimeoutError("the test never released this generation")
        if iteration in self.fail:
            raise RuntimeError(f"engine failed on batch {iteration}")
        return [f"sample-{iteration}"], {"rollout/reward_mean": float(iteration)}

    def distribute(self, batch):
        return batch


@pytest.fixture(autouse=True)
def _driver(monkeypatch):
    monkeypatch.setattr(rollout_schedule, "_is_driver", lambda: True)


def _run(schedule, source, iterations):
    """The loop's use of a schedule: take, train (the policy moves), settle, sync."""
    taken = []
    for k in range(1, iterations + 1):
        samples, metrics = schedule.take(k)
        taken.append((samples, metrics["rollout/first_prompt"]))
        schedule.settle()
        source.engine_version = k  # the sync after iteration k
    return taken


@pytest.mark.parametrize("asynchronous", [False, True])
def test_in_step_every_batch_is_generated_by_the_previous_iterations_weights(asynchronous):
    source = FakeSource()
    schedule = RolloutSchedule(source, asynchronous=asynchronous, staleness=0, last_iteration=4)
    taken = _run(schedule, source, 4)
    assert source.generated == [(k, (k - 1) * PROMPTS, k - 1) for k in range(1, 5)]
    assert taken == [([f"sample-{k}"], float((k - 1) * PROMPTS)) for k in range(1, 5)]
    assert schedule.max_lag == 0 and schedule.data_position == 4 * PROMPTS


def test_one_ahead_every_batch_after_the_first_lags_one_version():
    source = FakeSource()
    schedule = RolloutSchedule(source, asynchronous=True, staleness=1, last_iteration=4)
    taken = _run(schedule, source, 4)
    # batch k+1 starts generating when batch k is taken: before the sync of iteration k
    assert source.generated == [(1, 0, 0), (2, 4, 0), (3, 8, 1), (4, 12, 2)]
    assert [first for _, first in taken] == [0.0, 4.0, 8.0, 12.0]
    assert schedule.max_lag == 1
    assert schedule.data_position == 16 and source.data_position == 16  # nothing past the last


def test_take_returns_while_the_next_batch_still_generates():
    source = FakeSource()
    source.hold[2] = threading.Event()
    schedule = RolloutSchedule(source, asynchronous=True, staleness=1, last_iteration=3)
    samples, _ = schedule.take(1)  # would wait forever (30 s) if it waited for batch 2
    assert samples == ["sample-1"] and (2, 4, 0) in source.generated
    assert schedule.data_position == PROMPTS  # batch 2 is reserved, not yet trained
    source.hold[2].set()
    schedule.settle()
    assert schedule.take(2)[0] == ["sample-2"]


def test_a_failed_generation_ahead_is_raised_when_its_batch_is_taken():
    source = FakeSource()
    source.fail.add(2)
    schedule = RolloutSchedule(source, asynchronous=True, staleness=1, last_iteration=3)
    schedule.take(1)
    schedule.settle()
    with pytest.raises(RuntimeError, match="engine failed on batch 2"):
        schedule.take(2)


def test_resume_regenerates_the_batch_that_was_ahead():
    source = FakeSource()
    schedule = RolloutSchedule(source, asynchronous=True, staleness=1, last_iteration=4)
    source.engine_version = 2  # restored weights of iteration 2
    schedule.resume_at(2 * PROMPTS)  # the checkpoint's data position
    samples, metrics = schedule.take(3)
    assert samples == ["sample-3"] and metrics["rollout/first_prompt"] == 8.0
    assert source.generated[0] == (3, 8, 2)  # generated again, by the restored weights


def test_staleness_beyond_one_is_refused():
    with pytest.raises(ValueError, match="0 or 1"):
        RolloutSchedule(FakeSource(), asynchronous=True, staleness=2, last_iteration=2)
