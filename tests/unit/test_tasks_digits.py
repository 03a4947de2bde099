"""Character tokenizer, digit tasks, rewards and warm-up batches."""

import pytest
import torch

from megatron_pr2.models.presets import TINY_QWEN3_MOE
from megatron_pr2.tasks import (
    CharTokenizer,
    DigitTask,
    DigitTaskConfig,
    Problem,
    digit_reward,
)
from megatron_pr2.tasks.sft_batches import answer_ids, prompt_ids, sft_batch

TOK = CharTokenizer()


def test_tokenizer_matches_tiny_preset_and_round_trips():
    assert TOK.vocab_size == TINY_QWEN3_MOE["vocab_size"]
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (TINY_QWEN3_MOE["pad_token_id"],
                                                    TINY_QWEN3_MOE["bos_token_id"],
                                                    TINY_QWEN3_MOE["eos_token_id"])
    text = "rv:0123456789=abc xyz+-*/()<>,.;?!^%|#_&@$~"
    ids = TOK.encode(text)
    assert len(ids) == len(text) and len(set(ids)) == len(set(text))  # one id per character
    assert min(ids) >= 3 and max(ids) < 64
    assert TOK.decode(ids) == text
    assert TOK.encode("09") == [3, 12]  # digits follow the three special tokens


def test_tokenizer_specials_and_errors():
    ids = [TOK.bos_id, *TOK.encode("12"), TOK.eos_id, *TOK.encode("9"), TOK.pad_id]
    assert TOK.decode(ids) == "12"
    assert TOK.decode(ids, stop_at_eos=False) == "129"
    with pytest.raises(ValueError, match="'Q' at position 1"):
        TOK.encode("aQ")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([64])


def test_problems_are_correct_and_deterministic():
    task = DigitTask(DigitTaskConfig(kinds=("copy", "reverse", "sort", "add"), min_len=2,
                                     max_len=4, seed=7))
    problems = task.problems(0, 200)
    assert problems == DigitTask(task.cfg).problems(0, 200)
    assert task.problem(37) == problems[37]
    assert problems != task.problems(0, 200, split="eval")
    assert {p.kind for p in problems} == {"copy", "reverse", "sort", "add"}
    for p in problems:
        prefix, body = p.prompt[:-1].split(":")
        assert p.prompt.endswith("=")
        if p.kind == "add":
            a, b = body.split("+")
            assert prefix == "ad" and 2 <= len(a) <= 4 and 2 <= len(b) <= 4
            assert int(p.answer) == int(a) + int(b)
        else:
            assert 2 <= len(body) <= 4
            expected = {"copy": body, "reverse": body[::-1], "sort": "".join(sorted(body))}
            assert (prefix, p.answer) == ({"copy": "cp", "reverse": "rv", "sort": "so"}[p.kind],
                                          expected[p.kind])


def test_bad_task_config_raises():
    with pytest.raises(ValueError, match="kinds"):
        DigitTaskConfig(kinds=("multiply",))
    with pytest.raises(ValueError, match="min_len"):
        DigitTaskConfig(min_len=5, max_len=3)
    with pytest.raises(ValueError, match=">= 0"):
        DigitTask().problem(-1)


def test_exact_and_partial_rewards():
    assert digit_reward("1234", "1234") == 1.0
    assert digit_reward(" 1234 ", "1234") == 1.0
    assert digit_reward("1243", "1234") == 0.0
    assert digit_reward("1243", "1234", partial_credit=True) == 0.5   # positions 0, 1 match
    assert digit_reward("12345", "1234", partial_credit=True) == 4 / 5  # extra char is wrong
    assert digit_reward("", "1234", partial_credit=True) == 0.0
    task = DigitTask()
    problem = Problem(prompt="rv:123=", answer="321", kind="reverse")
    assert task.reward(problem, TOK.decode(TOK.encode("321") + [TOK.eos_id, 5])) == 1.0
    assert task.reward(problem, "123") == 0.0


def test_sft_batch_layout():
    problems = [Problem("rv:12=", "21", "reverse"), Problem("cp:1=", "1", "copy")]
    batch = sft_batch(TOK, problems)
    full0 = [1, *TOK.encode("rv:12=21"), 2]
    assert prompt_ids(TOK, problems[0]) == [1, *TOK.encode("rv:12=")]
    assert answer_ids(TOK, problems[0]) == [*TOK.encode("21"), 2]
    assert batch.input_ids[0].tolist() == full0[:-1]
    assert batch.labels[0].tolist() == full0[1:]
    # loss on labels "2", "1", <eos> only
    assert batch.loss_mask[0].tolist() == [0.0] * 6 + [1.0] * 3
    full1 = [1, *TOK.encode("cp:1=1"), 2]
    assert batch.input_ids[1].tolist() == full1[:-1] + [0, 0]
    assert batch.labels[1].tolist() == full1[1:] + [0, 0]
    assert batch.loss_mask[1].tolist() == [0.0] * 5 + [1.0] * 2 + [0.0] * 2
    assert batch.input_ids.dtype == torch.long
    with pytest.raises(ValueError, match="at least one"):
        sft_batch(TOK, [])
    with pytest.raises(TypeError, match="text prompt"):
        sft_batch(TOK, [Problem([{"role": "user", "content": "1"}], "1", "math")])


def test_stratified_problems_cover_every_operation_and_length_once_per_cycle():
    from megatron_pr2.tasks.digits import OPERATIONS, DigitTask, DigitTaskConfig

    task = DigitTask(DigitTaskConfig(min_len=3, max_len=6, seed=5, stratified=True))
    solvers = {prefix: solve for prefix, solve in OPERATIONS.values()}
    for start in (0, 12, 36):
        cells = []
        for problem in task.problems(start, 12):
            prefix, digits = problem.prompt[:-1].split(":")
            assert problem.answer == solvers[prefix](digits)  # still a correct problem
            cells.append((prefix, len(digits)))
        assert sorted(cells) == sorted((p, n) for p in ("cp", "rv", "so") for n in range(3, 7))
    # the digits are still drawn: two cycles differ
    assert [p.prompt for p in task.problems(0, 12)] != [p.prompt for p in task.problems(12, 12)]
