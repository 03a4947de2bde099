"""Prompt/answer datasets for real runs: JSONL or parquet records, math answers via math-verify."""

from __future__ import annotations

import json
import pathlib
import random

from megatron_pr2.tasks.math_reward import math_reward
from megatron_pr2.tasks.problem import Problem


def _field(record: dict, key: str, where: str):
    """``record[key]``, where a dotted key (``reward_model.ground_truth``) walks nested dicts."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: missing field {key!r} (record keys: {sorted(record)})")
        value = value[part]
    return value


def _to_problem(record, prompt_key: str, answer_key: str, kind: str, where: str) -> Problem:
    if not isinstance(record, dict):
        raise TypeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = _field(record, prompt_key, where)
    answer = _field(record, answer_key, where)
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
            raise ValueError(f"{where}: a list prompt must hold {{'role', 'content'}} messages")
    elif not isinstance(prompt, str):
        raise TypeError(f"{where}: prompt must be text or a message list, got "
                         f"{type(prompt).__name__}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise TypeError(f"{where}: answer must be text or a number, got {type(answer).__name__}")
    return Problem(prompt=prompt, answer=str(answer), kind=kind)


def _read_jsonl(path: pathlib.Path) -> list[tuple[str, object]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
    return rows


def _read_parquet(path: pathlib.Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); "
                          "or convert the data to JSONL") from err
    return [(f"{path}: row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]


READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}


def load_problems(path: str | pathlib.Path, prompt_key: str = "prompt",
                  answer_key: str = "answer", kind: str = "math") -> list[Problem]:
    """Read ``{"prompt": ..., "answer": ...}`` records from a ``.jsonl`` or ``.parquet`` file.

    Args:
        path: the data file.
        prompt_key, answer_key: field names; dotted names reach nested fields.
        kind: the ``Problem.kind`` given to every record.
    """
    path = pathlib.Path(path)
    if path.suffix not in READERS:
        raise ValueError(f"{path}: unsupported data format {path.suffix!r}; use one of "
                         f"{sorted(READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    problems = [_to_problem(rec, prompt_key, answer_key, kind, where)
                for where, rec in READERS[path.suffix](path)]
    if not problems:
        raise ValueError(f"{path}: no records")
    return problems


class MathDataset:
    """A fixed list of math problems as an endless, seeded, reshuffled-per-epoch stream.

    Problem ``index`` is a pure function of ``(seed, index)``; the reward is :func:`math_reward`.
    """

    def __init__(self, problems: list[Problem], seed: int = 0, shuffle: bool = True):
        if not problems:
            raise ValueError("MathDataset needs at least one problem")
        self.items, self.seed, self.shuffle = list(problems), seed, shuffle
        self._orders: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def problem(self, index: int, split: str = "train") -> Problem:
        """Problem ``index`` (epochs of ``len(self)`` problems; ``split`` only seeds the order)."""
        if index < 0:
            raise ValueError(f"problem index must be >= 0, got {index}")
        epoch, position = divmod(index, len(self.items))
        return self.items[self._order(split, epoch)[position]]

    def _order(self, split: str, epoch: int) -> list[int]:
        """The item order of one epoch (a few recent orders are cached)."""
        key = (split, epoch)
        if key not in self._orders:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(f"{self.seed}/{split}/{epoch}").shuffle(order)
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = order
        return self._orders[key]

    def problems(self, start: int, count: int, split: str = "train") -> list[Problem]:
        """Problems ``start .. start + count - 1``."""
        return [self.problem(i, split) for i in range(start, start + count)]

    def reward(self, problem: Problem, response: str) -> float:
        """math-verify equivalence of the response's final answer with ``problem.answer``."""
        return math_reward(response, problem.answer)


def split_problems(problems: list[Problem], eval_fraction: float,
                   seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """A seeded held-out split: ``(train, eval)``, disjoint, together all of ``problems``.

    ``eval_fraction`` of the problems (rounded, at least one when > 0) are drawn at random
    (seeded) for evaluation; both parts keep the file order among themselves.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    count = max(1, round(eval_fraction * len(problems))) if eval_fraction > 0 else 0
    if count >= len(problems):
        raise ValueError(f"an eval fraction of {eval_fraction} leaves no training problem out "
                         f"of {len(problems)}")
    order = list(range(len(problems)))
    random.Random(f"{seed}/eval-split").shuffle(order)
    held_out = set(order[:count])
    train = [p for i, p in enumerate(problems) if i not in held_out]
    return train, [p for i, p in enumerate(problems) if i in held_out]
