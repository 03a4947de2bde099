"""The rollout engine protocol and its errors.

Every engine (in-process ``transformers``, SGLang over HTTP) generates :class:`Sample` objects
for prompts given as token ids, takes new weights as Hugging Face-named tensors, and reports its
health. The trainer depends only on this protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch

from megatron_pr2.rollout.sample import Sample, SamplingParams


class RolloutError(RuntimeError):
    """A rollout engine failed."""


class MalformedResponseError(RolloutError):
    """An engine answered, but the answer breaks the wire contract (named in the message)."""


class EngineUnavailableError(RolloutError):
    """No engine address answered within the retry budget."""


class PartialRolloutError(RolloutError):
    """Generation stopped part-way; the samples already collected are kept.

    Attributes:
        samples: one entry per prompt, in prompt order; None where no sample was collected.
        failed_indices: prompt indices without a sample.
    """

    def __init__(self, message: str, samples: list[Sample | None], failed_indices: list[int]):
        super().__init__(message)
        self.samples = samples
        self.failed_indices = failed_indices

    @property
    def collected(self) -> list[Sample]:
        return [s for s in self.samples if s is not None]


@dataclasses.dataclass
class EngineHealth:
    """Result of a health check: one entry per engine address."""

    healthy: dict[str, bool]
    detail: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.healthy) and all(self.healthy.values())


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an inference engine."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        return_logprobs: bool = True,
        return_routed_experts: bool = True,
        on_sample: Callable[[int, Sample], None] | None = None,
    ) -> list[Sample]:
        """Generate one continuation per prompt (prompt order kept).

        ``on_sample(index, sample)`` is called once per sample as soon as the engine has it
        (possibly from another thread, while other prompts still generate).

        Raises:
            PartialRolloutError: some prompts failed; the error carries the collected samples.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors (any subset of the model's weights)."""
        ...

    def health(self) -> EngineHealth:
        """Whether the engine can serve requests now."""
        ...
