"""Progress of long work: runs / tensors done and the time left at the pace so far."""

import logging
import math

from megatron_pr2 import compare
from megatron_pr2.convert import pipeline
from megatron_pr2.progress import describe_seconds, seconds_left


def test_time_left_at_the_pace_so_far():
    assert seconds_left(2, 8, 10.0) == 30.0  # 5 s per unit, 6 units to go
    assert seconds_left(8, 8, 40.0) == 0.0
    assert math.isinf(seconds_left(0, 8, 3.0))
    assert [describe_seconds(s) for s in (41.6, 185, 3720, math.inf)] == \
        ["42 s", "3 min 5 s", "1 h 2 min", "unknown"]


def test_compare_logs_runs_done_and_time_left(monkeypatch, caplog):
    monkeypatch.setattr(compare.time, "perf_counter", lambda: 110.0)
    with caplog.at_level(logging.INFO, logger="megatron_pr2.compare"):
        compare._log_progress(("pr2", 1235), done=3, total=12, started=20.0)
    # 90 s for 3 runs: 30 s each, 9 to go
    assert caplog.messages == [("run 3/12 done (pr2, seed 1235); 1 min 30 s elapsed, "
                                "about 4 min 30 s left")]


def test_conversion_logs_tensors_done_and_time_left(monkeypatch, caplog):
    clock = iter([0.0, 4.0])
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    progress = pipeline._Progress("hf-to-megatron", total_tensors=10, total_bytes=4_000_000_000,
                                  interval=1.0)
    with caplog.at_level(logging.INFO, logger=pipeline.logger.name):
        progress.update(3, 1_000_000_000, 1_000_000_000)
    # 1 of 4 GB in 4 s: 12 s to go
    assert caplog.messages == [("hf-to-megatron: 3/10 tensors, 1.00/4.00 GB, 0.25 GB/s, "
                                "about 12 s left")]
