"""Supervised warm-up batches: ``<bos> prompt answer <eos>`` with loss on the answer only."""

from __future__ import annotations

import dataclasses

import torch

from megatron_pr2.tasks.problem import Problem
from megatron_pr2.tasks.tokenizer import CharTokenizer


@dataclasses.dataclass
class SFTBatch:
    """Next-token training tensors in Megatron's GPT convention, right-padded with ``<pad>``.

    Attributes:
        input_ids: ``[B, S]`` tokens ``x_0 .. x_{S-1}``.
        labels: ``[B, S]`` next tokens ``x_1 .. x_S``.
        loss_mask: ``[B, S]`` float, 1 where the label is an answer token or the final ``<eos>``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


def prompt_ids(tokenizer: CharTokenizer, problem: Problem) -> list[int]:
    """Rollout prompt tokens: ``<bos>`` + prompt."""
    if not isinstance(problem.prompt, str):
        raise TypeError("the character tokenizer needs a text prompt, got a chat message list")
    return [tokenizer.bos_id, *tokenizer.encode(problem.prompt)]


def answer_ids(tokenizer: CharTokenizer, problem: Problem) -> list[int]:
    """Target response tokens: answer + ``<eos>``."""
    return [*tokenizer.encode(problem.answer), tokenizer.eos_id]


def sft_batch(tokenizer: CharTokenizer, problems: list[Problem]) -> SFTBatch:
    """Pack ``problems`` into one right-padded :class:`SFTBatch`."""
    if not problems:
        raise ValueError("sft_batch needs at least one problem")
    rows = [(prompt_ids(tokenizer, p), answer_ids(tokenizer, p)) for p in problems]
    width = max(len(q) + len(a) for q, a in rows) - 1
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for row, (prompt, answer) in enumerate(rows):
        tokens = torch.tensor(prompt + answer)
        n = len(tokens) - 1
        input_ids[row, :n] = tokens[:-1]
        labels[row, :n] = tokens[1:]
        loss_mask[row, len(prompt) - 1:n] = 1.0
    return SFTBatch(input_ids, labels, loss_mask)
