"""The prompt/answer record shared by the synthetic tasks and the dataset loaders."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
        prompt: prompt text (for chat datasets, a list of ``{"role", "content"}`` messages).
        answer: reference answer text.
        kind: which task / reward family it belongs to (e.g. ``reverse``, ``math``).
    """

    prompt: str | list
    answer: str
    kind: str
