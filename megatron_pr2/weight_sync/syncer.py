"""Trainer -> rollout engine weight sync, in memory, for every TP/SP/EP/ETP/PP/VPP/DP layout.

Each pipeline stage's pushing rank receives its stage's parameters (TP shards, then EP experts
gathered in memory), converts them through the model family's key table (the same adapter as
``tools/convert.py``; PR2-in-engine mode writes ``W_r + W_p^T`` as each gate) and sends them in
the engine's dtype, one bounded bucket at a time, through a transport
(:mod:`megatron_pr2.weight_sync.transports`). Peak extra memory is about one bucket.

While a pushing rank sends a bucket, the other ranks of its stage wait on a gloo barrier, never
inside an NCCL collective. Where the stages share the receiving servers (SGLang), the stages
push one after another in stage order, the others waiting on a host-group barrier: a server
takes requests in arrival order, so two stages broadcasting at once could be served in
different orders by different servers and their NCCL groups would deadlock. Errors are gathered on the host group at the end, so every rank
raises the same error and no collective is left half-done.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.platform.distributed import host_group
from megatron_pr2.rollout.engine import RolloutError
from megatron_pr2.weight_sync.bucket import FlatBucket
from megatron_pr2.weight_sync.gather import StageGatherer
from megatron_pr2.weight_sync.plan import round_bytes, split_rounds
from megatron_pr2.weight_sync.transports import Transport

logger = logging.getLogger(__name__)


class WeightSyncError(RolloutError):
    """A weight sync failed on some rank (the message names the ranks and the causes)."""


@dataclasses.dataclass
class SyncReport:
    """What one sync moved (summed over the pushing ranks)."""

    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0


class WeightSyncer:
    """Pushes the trainer's weights to the engine; construct and call on every rank.

    Args:
        model_chunks: this rank's model chunks.
        hf_config: the model's HF config (selects the key table).
        transport: this rank's transport (the pushing ranks and rank 0 use it).
        dtype: dtype the weights are sent in (the engine's).
        bucket_bytes: maximum bucket size.
        groups: the run's ``ProcessGroupCollection`` (default: Megatron's initialised groups).
    """

    def __init__(self, model_chunks, hf_config: dict, transport: Transport, dtype: torch.dtype,
                 bucket_bytes: int = 512 << 20, groups=None):
        self.adapter = adapter_for(hf_config)
        self.gatherer = StageGatherer(model_chunks, self.adapter, groups)
        self.transport = transport
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.host = host_group()
        self.stage_group, self.pushers = _stage_groups(self.host, self.gatherer.position)
        self.push_turns = push_turns(len(self.pushers), self.gatherer.position.stage,
                                     transport.stages_in_turn)
        self.expected_names = [n for rule in self.adapter.rules for n in rule.hf_names]

    @property
    def is_pusher(self) -> bool:
        return self.gatherer.position.is_pusher

    def sync(self, predictive_gate: bool = False) -> SyncReport:
        """Push every weight once; all ranks return the same report or raise the same error."""
        start = time.perf_counter()
        error = self._attempt(self.transport.open) if dist.get_rank() == 0 else None
        agree_on_error(self.host, error, "opening the update")
        local = {"error": None, "names": [], "bytes": 0, "buckets": 0}
        slots = self.gatherer.slots(predictive_gate)
        for mine in self.push_turns:
            if mine:
                for round_slots in split_rounds(slots, self.dtype.itemsize, self.bucket_bytes):
                    self._round(round_slots, predictive_gate, local)
                    dist.barrier(group=self.stage_group)  # others wait here (gloo) meanwhile
            if len(self.push_turns) > 1:
                dist.barrier(group=self.host)  # the next stage's turn
        if self.is_pusher:  # always: rank 0 may be waiting for this stage's end
            ended = self._attempt(self.transport.end_stage)
            local["error"] = local["error"] or ended
        if dist.get_rank() == 0:  # always: other stages' buckets must be drained
            received = self._attempt(lambda: self.transport.receive(self.pushers))
            local["error"] = local["error"] or received
        if self.is_pusher and local["error"]:
            self.transport.reset()
        local["manifest"] = self.transport.manifest() if self.is_pusher else None
        reports = [None] * dist.get_world_size(self.host)
        dist.all_gather_object(reports, local, group=self.host)
        failure = _failures(reports) or self._name_problem(reports)
        if dist.get_rank() == 0:
            closing = self._attempt(lambda: self.transport.close(
                [r["manifest"] for r in reports], ok=failure is None))
            failure = failure or (f"rank 0: closing the update: {closing}" if closing else None)
        agree_on_error(self.host, failure if dist.get_rank() == 0 else None, "the weight sync")
        report = SyncReport(sum(len(r["names"]) for r in reports),
                            sum(r["bytes"] for r in reports), sum(r["buckets"] for r in reports),
                            time.perf_counter() - start)
        if dist.get_rank() == 0:
            logger.info("weight sync (%s, %s): %d tensors, %.1f MB in %d buckets, %.2f s",
                        self.transport.name, str(self.dtype).removeprefix("torch."),
                        report.num_tensors, report.num_bytes / 2**20, report.num_buckets,
                        report.seconds)
        return report

    def close(self) -> None:
        """Release the transport's resources (SGLang update groups on both sides, threads);
        call before building the next syncer. Local: no collective."""
        self.transport.release()

    def _round(self, round_slots, predictive_gate: bool, local: dict) -> None:
        stream = self.gatherer.gathered(round_slots)
        if self.is_pusher and local["error"] is None:
            bucket = FlatBucket(round_bytes(round_slots, self.dtype.itemsize), self.dtype,
                                self.transport.device)
            try:
                for name, tensor in self.adapter.to_hf(stream, predictive_gate=predictive_gate,
                                                       complete=False):
                    bucket.add(name, tensor)
                if len(bucket):
                    self.transport.push(bucket)
                local["names"] += bucket.names
                local["bytes"] += bucket.used
                local["buckets"] += 1
            except Exception as exc:  # reported on every rank after the rounds
                logger.warning("weight sync push failed on rank %d: %s", dist.get_rank(), exc,
                               exc_info=logger.isEnabledFor(logging.DEBUG))
                local["error"] = f"{type(exc).__name__}: {exc}"
        for _ in stream:  # keep the collectives going (other ranks, or after a failure)
            pass

    def _name_problem(self, reports) -> str | None:
        """Every HF tensor of the model exactly once (SGLang ignores unknown names silently)."""
        counts = collections.Counter(n for r in reports for n in r["names"])
        expected = set(self.expected_names)
        missing = [n for n in self.expected_names if n not in counts]
        extra = sorted(n for n in counts if n not in expected)
        twice = sorted(n for n, c in counts.items() if c > 1)
        problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                    f"({len(names)})" for label, names in
                    (("missing", missing), ("not in the model", extra), ("sent twice", twice))
                    if names]
        return "weight sync names do not match the model: " + "; ".join(problems) \
            if problems else None

    @staticmethod
    def _attempt(action) -> str | None:
        try:
            action()
            return None
        except Exception as exc:  # turned into one agreed error
            logger.warning("weight sync step failed on rank %d: %s", dist.get_rank(), exc,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            return f"{type(exc).__name__}: {exc}"


def _failures(reports) -> str | None:
    failed = [f"rank {rank}: {r['error']}" for rank, r in enumerate(reports) if r["error"]]
    return "; ".join(failed) if failed else None


def agree_on_error(group, error: str | None, what: str,
                   error_type: type[Exception] = WeightSyncError) -> None:
    """Collective: raise the same ``error_type`` on every rank of ``group`` when any rank
    failed (``error``: this rank's failure or None), naming each failed rank."""
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    failed = [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e]
    if failed:
        raise error_type(f"{what} failed: " + "; ".join(failed))


def push_turns(num_stages: int, stage: int, in_turn: bool) -> list[bool]:
    """The turns of a sync, in stage order, and whether each is this stage's: one turn per stage
    when the stages take turns (``in_turn``), else a single turn shared by all stages."""
    if not in_turn:
        return [True]
    return [turn == stage for turn in range(num_stages)]


def _stage_groups(host, position):
    """A gloo group per pipeline stage (this rank's) and the pushing rank of every stage."""
    world = dist.get_world_size(host)
    info = [None] * world
    dist.all_gather_object(info, (position.stage, position.is_pusher), group=host)
    stages = sorted({stage for stage, _ in info})
    pushers = [next(r for r, (s, p) in enumerate(info) if s == stage and p) for stage in stages]
    if len(stages) == 1:
        return host, pushers
    mine = None
    for stage in stages:  # every rank creates every group, in the same order
        group = dist.new_group([r for r, (s, _) in enumerate(info) if s == stage],
                               backend="gloo")
        if stage == position.stage:
            mine = group
    return mine, pushers
