"""The set of rollout servers a run may use: servers that fail leave it, healthy ones rejoin.

Every per-server operation (a generation request, a weight update) runs through
:meth:`ServerPool.run_on`: an operation that raises :class:`ServerFailure` evicts its server
(logged and counted), so the run goes on with the others and stops with
:class:`NoServerLeftError` only when none is left. A server whose answers break the wire
contract (:meth:`ServerPool.bad_answer`) is evicted after ``BAD_ANSWERS_TO_EVICT`` of them. An evicted server rejoins only through
:meth:`ServerPool.rejoin`, which the caller invokes after a full weight sync to it succeeded (a
server that missed a sync holds stale weights); :meth:`ServerPool.probe_due` says which evicted
servers are worth a health probe now (:mod:`~megatron_pr2.rollout.rejoin_schedule`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from megatron_pr2.rollout.engine import EngineUnavailableError, RolloutError
from megatron_pr2.rollout.rejoin_schedule import RejoinSchedule

logger = logging.getLogger(__name__)

T = TypeVar("T")

BAD_ANSWERS_TO_EVICT = 3  # malformed answers (since it joined) that evict a server


class ServerFailure(RolloutError):
    """The server itself failed (unreachable, timed out, or refused a weight update)."""


class NoServerLeftError(EngineUnavailableError):
    """Every server of the pool was evicted."""


class ServerPool:
    """Live and evicted server addresses, with counters for the run's metrics (thread-safe).

    Args:
        addresses: base URLs, all live at the start.
        rejoin_interval_s: seconds between two health probes of one evicted server (0: an
            evicted server never rejoins).
    """

    def __init__(self, addresses: Sequence[str], rejoin_interval_s: float = 60.0):
        if not addresses:
            raise ValueError("a server pool needs at least one address")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"server addresses repeat: {list(addresses)}")
        self._order = list(addresses)
        self._evicted: dict[str, str] = {}
        self._lock = threading.Lock()
        self._schedule = RejoinSchedule(rejoin_interval_s)
        self._bad_answers: dict[str, int] = {}
        self.evictions = 0
        self.rejoins = 0
        self.retries = 0
        self.malformed_answers = 0

    @property
    def live(self) -> list[str]:
        """Live addresses in their original order."""
        with self._lock:
            return [a for a in self._order if a not in self._evicted]

    @property
    def evicted(self) -> dict[str, str]:
        """Evicted address -> the reason it left."""
        with self._lock:
            return dict(self._evicted)

    def pick(self, index: int) -> str:
        """The live server for request ``index`` (round-robin over the live ones).

        Raises:
            NoServerLeftError: every server was evicted.
        """
        live = self.live
        if not live:
            raise NoServerLeftError(self._none_left_message())
        return live[index % len(live)]

    def run_on(self, address: str, operation: Callable[[str], T]) -> T:
        """``operation(address)``; a :class:`ServerFailure` evicts the server and propagates."""
        try:
            return operation(address)
        except ServerFailure as exc:
            self.evict(address, str(exc))
            raise

    def evict(self, address: str, reason: str) -> None:
        """Take ``address`` out of the pool (idempotent)."""
        with self._lock:
            if address in self._evicted:
                return
            self._evicted[address] = reason
            self.evictions += 1
            left = len(self._order) - len(self._evicted)
        logger.error("SGLang server %s left the pool (%d left): %s", address, left, reason)

    def bad_answer(self, address: str, reason: str) -> None:
        """``address`` answered, but malformed: count it; the ``BAD_ANSWERS_TO_EVICT``-th evicts."""
        with self._lock:
            self.malformed_answers += 1
            count = self._bad_answers[address] = self._bad_answers.get(address, 0) + 1
        if count >= BAD_ANSWERS_TO_EVICT:
            self.evict(address, f"{count} malformed answers, the last: {reason}")

    def rejoin(self, address: str) -> None:
        """Put an evicted server back (call only after a full weight sync to it succeeded)."""
        with self._lock:
            if self._evicted.pop(address, None) is None:
                return
            self._schedule.rejoined(address)
            self._bad_answers.pop(address, None)
            self.rejoins += 1
        logger.warning("SGLang server %s rejoined the pool after a full weight sync", address)

    def probe_due(self, now: float | None = None) -> list[str]:
        """Evicted servers to health-probe now (each at most once per interval); marks them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            evicted = [a for a in self._order if a in self._evicted]
            return self._schedule.due(evicted, now)

    def rejoin_failed(self, addresses: Iterable[str], reason: str,
                      now: float | None = None) -> None:
        """A full sync with these probed servers failed: they stay evicted and are probed
        again after a longer interval."""
        now = time.monotonic() if now is None else now
        addresses = list(addresses)
        with self._lock:
            self._schedule.failed(addresses, now)
            waits = {a: self._schedule.next_probe(a) - now for a in addresses}
        for address in addresses:
            logger.warning("SGLang server %s answered /health but the full weight sync with it "
                           "failed; it stays out of the pool (next probe in %.0f s): %s",
                           address, waits[address], reason)

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def require_live(self) -> None:
        """Raise :class:`NoServerLeftError` when every server was evicted."""
        if not self.live:
            raise NoServerLeftError(self._none_left_message())

    def _none_left_message(self) -> str:
        reasons = "; ".join(f"{a}: {r}" for a, r in self.evicted.items())
        return f"no SGLang server left in the pool ({len(self._order)} evicted): {reasons}"

    def metrics(self) -> dict[str, float]:
        """Pool size and cumulative counters, named for the run's metrics log."""
        with self._lock:
            return {"rollout/servers_live": float(len(self._order) - len(self._evicted)),
                    "rollout/server_evictions": float(self.evictions),
                    "rollout/server_rejoins": float(self.rejoins),
                    "rollout/requests_retried": float(self.retries),
                    "rollout/malformed_answers": float(self.malformed_answers)}
