"""Synthetic verifiable digit tasks: copy, reverse, sort a digit string, add two numbers.

Prompts look like ``rv:40721=`` (answer ``12704``) or ``ad:35+908=`` (answer ``943``); the model
answers after ``=`` and stops with ``<eos>``. Difficulty is set by the digit-string length range
(for ``add``, the length of each operand) and the mix of operations. Problem ``i`` of a split is a
pure function of ``(seed, split, i)``, so a data position is just an index (resume-friendly).

Measured difficulty (HF tiny Qwen3-MoE preset, AdamW lr 1e-3, batch 32, 1 CPU thread; exact-match
reward on 128 eval problems, sampled at temperature 1 / greedy): the default mix (copy, reverse,
sort; lengths 3-6) reaches 0.04 / 0.38 after 100 warm-up steps, 0.36 / 0.64 after 150, 0.63 / 0.81
after 200 and 0.86 / 0.97 after 400; lengths 4-8 reach 0.48 / 0.70 after 300 steps; ``add`` with
1-3 digit operands stays below 0.05 after 500 steps.
"""

from __future__ import annotations

import dataclasses
import random

from megatron_pr2.tasks.problem import Problem

OPERATIONS = {
    "copy": ("cp", lambda digits: digits),
    "reverse": ("rv", lambda digits: digits[::-1]),
    "sort": ("so", lambda digits: "".join(sorted(digits))),
}
ADD_PREFIX = "ad"
TASK_KINDS = (*OPERATIONS, "add")


@dataclasses.dataclass(frozen=True)
class DigitTaskConfig:
    """Which problems to draw.

    Attributes:
        kinds: operations to mix uniformly, from :data:`TASK_KINDS`.
        min_len, max_len: digit-string length range (inclusive); the difficulty knob.
        seed: base seed of the problem stream.
        partial_credit: reward per-position matches instead of exact match only.
        stratified: problem ``i`` takes its operation and length from ``i`` (every run of
            ``len(kinds) * (max_len - min_len + 1)`` consecutive problems holds each pair once;
            only the digits are drawn), so batches of that size have the same difficulty mix and
            the batch-to-batch spread of the reward is the policy's, not the draw's.
    """

    kinds: tuple[str, ...] = ("copy", "reverse", "sort")
    min_len: int = 3
    max_len: int = 6
    seed: int = 0
    partial_credit: bool = False
    stratified: bool = False

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in TASK_KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {TASK_KINDS}, got {self.kinds}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")


def _digits(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(length))


def _number(rng: random.Random, length: int) -> int:
    """A uniformly drawn ``length``-digit number (no leading zero unless ``length == 1``)."""
    return rng.randrange(10 ** (length - 1) if length > 1 else 0, 10 ** length)


def stratum(index: int, cfg: DigitTaskConfig) -> tuple[str, int]:
    """The (operation, length) of stratified problem ``index``: operations vary fastest."""
    kind = cfg.kinds[index % len(cfg.kinds)]
    length = cfg.min_len + (index // len(cfg.kinds)) % (cfg.max_len - cfg.min_len + 1)
    return kind, length


def make_problem(rng: random.Random, cfg: DigitTaskConfig,
                 cell: tuple[str, int] | None = None) -> Problem:
    """Draw one problem with ``rng`` (``cell``: its operation and length, else drawn too)."""
    kind = cell[0] if cell else rng.choice(cfg.kinds)

    def length() -> int:
        return cell[1] if cell else rng.randint(cfg.min_len, cfg.max_len)

    if kind == "add":
        a = _number(rng, length())
        b = _number(rng, length())
        return Problem(prompt=f"{ADD_PREFIX}:{a}+{b}=", answer=str(a + b), kind=kind)
    prefix, solve = OPERATIONS[kind]
    digits = _digits(rng, length())
    return Problem(prompt=f"{prefix}:{digits}=", answer=solve(digits), kind=kind)


class DigitTask:
    """A seeded, indexable stream of digit problems with their reward."""

    def __init__(self, cfg: DigitTaskConfig | None = None):
        self.cfg = cfg or DigitTaskConfig()

    def problem(self, index: int, split: str = "train") -> Problem:
        """Problem ``index`` of ``split`` (splits are independent streams; they may overlap)."""
        if index < 0:
            raise ValueError(f"problem index must be >= 0, got {index}")
        rng = random.Random(f"{self.cfg.seed}/{split}/{index}")
        return make_problem(rng, self.cfg, stratum(index, self.cfg) if self.cfg.stratified else None)

    def problems(self, start: int, count: int, split: str = "train") -> list[Problem]:
        """Problems ``start .. start + count - 1`` of ``split``."""
        return [self.problem(i, split) for i in range(start, start + count)]

    def reward(self, problem: Problem, response: str) -> float:
        """Score a decoded response (text before ``<eos>``); see :func:`digit_reward`."""
        return digit_reward(response, problem.answer, self.cfg.partial_credit)


def digit_reward(response: str, answer: str, partial_credit: bool = False) -> float:
    """1.0 for an exact match (surrounding whitespace ignored), else 0.0.

    With ``partial_credit``, the share of positions ``i < max(len(response), len(answer))`` where
    both strings have the same character: 1.0 only for an exact match, and extra or missing
    characters count as wrong positions.
    """
    response, answer = response.strip(), answer.strip()
    if response == answer:
        return 1.0
    if not partial_credit:
        return 0.0
    hits = sum(r == a for r, a in zip(response, answer))
    return hits / max(len(response), len(answer))
