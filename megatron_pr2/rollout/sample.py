"""The contract from rollout to trainer: one :class:`Sample` per generated sequence."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch


class SampleStatus(str, enum.Enum):
    """How generation of a sample ended."""

    PENDING = "pending"
    COMPLETED = "completed"  # stopped at an EOS / stop token
    TRUNCATED = "truncated"  # reached max_new_tokens
    ABORTED = "aborted"  # the engine gave up on it


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample continuations.

    Attributes:
        max_new_tokens: generated tokens per prompt, at most.
        temperature: softmax temperature; ignored when ``greedy``.
        greedy: argmax decoding (the reference for engine agreement tests).
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass (1.0 = all).
        stop_token_ids: tokens that end a sequence (kept as its last token).
        ignore_eos: generate exactly ``max_new_tokens`` tokens.
        seed: the batch's sampling seed, where the engine supports one (an HTTP engine
            samples request ``i`` with :func:`sample_seed` ``(seed, i)``).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 unless greedy, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


SEED_LIMIT = 2**31 - 1  # sampling seeds stay below: engines hold them in int32 tensors
_SEED_STRIDE = 1_000_003  # > any batch: consecutive batch seeds give disjoint seed ranges


def sample_seed(batch_seed: int, index: int) -> int:
    """The sampling seed of request ``index`` of a batch seeded ``batch_seed``.

    Reproducible from the two, and distinct for the requests of one batch, so the samples of a
    prompt differ even where the engine's sampling is deterministic per seed.
    """
    if not 0 <= index < _SEED_STRIDE:
        raise ValueError(f"request index {index} outside [0, {_SEED_STRIDE}) of one batch")
    return (batch_seed * _SEED_STRIDE + index) % SEED_LIMIT


@dataclasses.dataclass(frozen=True)
class RouteRows:
    """The token positions of a sample whose routes it carries, when it carries only some (the
    rows one rank's routers read, :mod:`megatron_pr2.rollout.grid_layout`): its
    ``routed_experts`` are the routes of the half-open ``spans`` of ``[0, T - 1)``, in order."""

    spans: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return sum(stop - start for start, stop in self.spans)

    def check(self, route_count: int) -> None:
        """Spans ascending, disjoint, non-empty and inside ``[0, route_count)``."""
        end = 0
        for start, stop in self.spans:
            if not end <= start < stop <= route_count:
                raise ValueError(f"route spans {self.spans} are not ascending, disjoint spans "
                                 f"inside [0, {route_count})")
            end = stop

    def row_of_token(self, route_count: int) -> torch.Tensor:
        """``[route_count]`` int64: each token's row in the carried routes, -1 where none."""
        rows = torch.full((route_count,), -1, dtype=torch.long)
        first = 0
        for start, stop in self.spans:
            rows[start:stop] = torch.arange(first, first + stop - start)
            first += stop - start
        return rows


@dataclasses.dataclass
class Sample:
    """One prompt and its generated continuation.

    Attributes:
        tokens: ``[T]`` int64, prompt followed by the response.
        prompt_length: number of prompt tokens ``P`` (``1 <= P <= T``).
        rollout_log_probs: ``[T - P]`` float32, the engine's log-prob of each response token.
        routed_experts: ``[T - 1, L, K]`` expert ids the engine used when processing input position
            ``t`` (``t = 0 .. T-2``; the last token is never processed), for the model's ``L`` MoE
            layers in order, in the narrowest integer dtype (uint8 for E <= 256); or None.
        reward: scalar reward, once scored.
        status: how generation ended.
        metadata: free-form (prompt id, group id, answer, engine address, ...).
        route_rows: None when ``routed_experts`` holds every token's route; else the token
            positions its rows hold (a rank's token slice).
    """

    tokens: torch.Tensor
    prompt_length: int
    rollout_log_probs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    reward: float | None = None
    status: SampleStatus = SampleStatus.PENDING
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    route_rows: RouteRows | None = None

    def __post_init__(self):
        if self.tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(self.tokens.shape)}")
        total = self.tokens.numel()
        if not 1 <= self.prompt_length <= total:
            raise ValueError(f"prompt_length {self.prompt_length} outside [1, {total}]")
        if self.rollout_log_probs is not None and self.rollout_log_probs.shape != (self.response_length,):
            raise ValueError(
                f"rollout_log_probs must have shape [{self.response_length}] (one per response "
                f"token), got {tuple(self.rollout_log_probs.shape)}"
            )
        if self.routed_experts is not None:
            shape = tuple(self.routed_experts.shape)
            rows, expected = total - 1, f"T-1={total - 1}"
            if self.route_rows is not None:
                self.route_rows.check(total - 1)
                rows = self.route_rows.count
                expected = f"{rows} (the rows of {self.route_rows.spans})"
            if len(shape) != 3 or shape[0] != rows:
                raise ValueError(f"routed_experts must be [{expected}, L, K], got {shape}")
            if self.routed_experts.is_floating_point():
                raise ValueError(f"routed_experts must be integer, got {self.routed_experts.dtype}")

    @property
    def total_length(self) -> int:
        return self.tokens.numel()

    @property
    def response_length(self) -> int:
        return self.tokens.numel() - self.prompt_length

    @property
    def response_tokens(self) -> torch.Tensor:
        return self.tokens[self.prompt_length:]
