"""Verifiable tasks and rewards: synthetic digit tasks for the tiny CPU models, math datasets.

Every task exposes the same small interface (:class:`Task`): ``problem(index, split)``,
``problems(start, count, split)`` and ``reward(problem, response_text)``.
"""

from typing import Protocol

from megatron_pr2.tasks.dataset import MathDataset, load_problems
from megatron_pr2.tasks.digits import DigitTask, DigitTaskConfig, digit_reward
from megatron_pr2.tasks.math_reward import math_reward
from megatron_pr2.tasks.problem import Problem
from megatron_pr2.tasks.tokenizer import CharTokenizer
from megatron_pr2.tasks.warmup import SFTBatch, answer_ids, prompt_ids, sft_batch


class Task(Protocol):
    """What the trainer needs from a task."""

    def problem(self, index: int, split: str = "train") -> Problem: ...

    def problems(self, start: int, count: int, split: str = "train") -> list[Problem]: ...

    def reward(self, problem: Problem, response: str) -> float: ...


__all__ = [
    "CharTokenizer",
    "DigitTask",
    "DigitTaskConfig",
    "MathDataset",
    "Problem",
    "SFTBatch",
    "Task",
    "answer_ids",
    "digit_reward",
    "load_problems",
    "math_reward",
    "prompt_ids",
    "sft_batch",
]
