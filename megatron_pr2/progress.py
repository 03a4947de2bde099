"""Estimated time left of long work (compare runs, checkpoint conversion), from the pace so far."""

from __future__ import annotations


def seconds_left(done: float, total: float, elapsed: float) -> float:
    """Seconds until ``total`` units are done if the rest go at the pace of the first ``done``
    (``elapsed`` seconds); infinite before the first unit."""
    if done <= 0:
        return float("inf")
    return elapsed / done * max(total - done, 0)


def describe_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 5 s"``, ``"1 h 2 min"`` or ``"unknown"``."""
    if seconds == float("inf"):
        return "unknown"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
