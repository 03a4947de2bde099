"""When an evicted rollout server is probed again for a rejoin (pure: the caller passes the time).

An evicted server is probed at the first weight-sync boundary after its eviction, then at most
once per ``interval_s`` seconds. Each failed rejoin (the server answered ``/health`` but the full
weight sync with it failed, which can cost up to the weight-sync timeout) doubles its interval
(up to ``2**MAX_DOUBLINGS``, i.e. without a practical cap): a server that answers health checks
but never takes weights is tried about ``log2(run length / interval_s)`` times in a run (about 12
in three days at 60 s), not once per iteration. A server evicted again after it rejoined is not
probed at once: it waits ``interval_s * 2**rejoins`` first (its rejoins are counted for the whole
run), so a server that hangs every time it is back costs a timeout ever more rarely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

MAX_DOUBLINGS = 16


@dataclasses.dataclass
class _ProbeState:
    next_probe: float
    failures: int = 0


class RejoinSchedule:
    """Which evicted servers to probe now.

    Args:
        interval_s: seconds between two probes of one server (0: never probe, no rejoin).
    """

    def __init__(self, interval_s: float):
        if interval_s < 0:
            raise ValueError(f"the rejoin interval must be >= 0 s (0: off), got {interval_s}")
        self.interval_s = float(interval_s)
        self._state: dict[str, _ProbeState] = {}
        self._rejoins: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def due(self, evicted: Iterable[str], now: float) -> list[str]:
        """The evicted servers to probe at ``now`` (in the given order); each is marked probed.

        A newly evicted server is due at once, or after ``interval_s * 2**rejoins`` when it had
        rejoined before; servers no longer evicted are forgotten (their rejoin count stays).
        """
        evicted = list(evicted)
        self._state = {a: s for a, s in self._state.items() if a in evicted}
        if not self.enabled:
            return []
        for address in evicted:
            rejoins = self._rejoins.get(address, 0)
            if address not in self._state and rejoins:
                self._state[address] = _ProbeState(now + self._interval(rejoins), rejoins)
        due = [a for a in evicted if a not in self._state or now >= self._state[a].next_probe]
        for address in due:
            state = self._state.setdefault(address, _ProbeState(now))
            state.next_probe = now + self._interval(state.failures)
        return due

    def failed(self, addresses: Iterable[str], now: float) -> None:
        """A full sync with these probed servers failed: back off before their next probe."""
        for address in addresses:
            state = self._state.setdefault(address, _ProbeState(now))
            state.failures += 1
            state.next_probe = now + self._interval(state.failures)

    def rejoined(self, address: str) -> None:
        """The server rejoined: a later eviction waits longer than this one (see :meth:`due`)."""
        self._state.pop(address, None)
        self._rejoins[address] = self._rejoins.get(address, 0) + 1

    def next_probe(self, address: str) -> float | None:
        """When ``address`` is due next (None: at once, it was never probed)."""
        state = self._state.get(address)
        return None if state is None else state.next_probe

    def _interval(self, failures: int) -> float:
        return self.interval_s * 2 ** min(failures, MAX_DOUBLINGS)
