"""Verifiable tasks and rewards: synthetic digit tasks for the tiny CPU models, math datasets.

Every task has ``problem(index, split)``, ``problems(start, count, split)`` and
``reward(problem, response_text)``.
"""

from megatron_pr2.tasks.dataset import MathDataset, load_problems, split_problems
from megatron_pr2.tasks.digits import DigitTask, DigitTaskConfig, digit_reward
from megatron_pr2.tasks.math_reward import math_reward
from megatron_pr2.tasks.problem import Problem
from megatron_pr2.tasks.sft_batches import SFTBatch, answer_ids, prompt_ids, sft_batch
from megatron_pr2.tasks.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "DigitTask",
    "DigitTaskConfig",
    "MathDataset",
    "Problem",
    "SFTBatch",
    "answer_ids",
    "digit_reward",
    "load_problems",
    "math_reward",
    "prompt_ids",
    "sft_batch",
    "split_problems",
]
