"""The non-finite guard skips exactly the steps with a non-finite loss or gradient."""

import math

import pytest
import torch

from megatron_pr2.training.metrics_log import NONFINITE_COUNT, MetricsLogger, read_jsonl
from megatron_pr2.training.nonfinite import (
    NonFiniteError,
    NonFiniteGuard,
    assert_finite_weights,
    nonfinite_context,
    nonfinite_summary,
    step_is_finite,
)


class CountingOptimizer:
    """Stands in for Megatron's optimizer: counts steps, returns (success, grad_norm, zeros)."""

    def __init__(self):
        self.steps = 0
        self.zeroed = 0

    def step(self):
        self.steps += 1
        return True, 0.5, None

    def zero_grad(self):
        self.zeroed += 1


def _model_with_grad(value: float):
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.full_like(layer.weight, value)
    layer.bias.main_grad = torch.zeros_like(layer.bias)  # Megatron DDP's buffer wins over .grad
    layer.bias.grad = torch.full_like(layer.bias, math.nan)
    return [layer]


def test_step_is_finite_reads_loss_and_main_grad_before_grad():
    assert step_is_finite(_model_with_grad(1.0), [0.3, 0.1])
    assert not step_is_finite(_model_with_grad(math.inf), [0.3])
    assert not step_is_finite(_model_with_grad(1.0), [0.3, math.nan])


def test_guard_steps_skips_and_stops_after_n_in_a_row():
    guard, optimizer = NonFiniteGuard(max_consecutive=3), CountingOptimizer()
    good, bad = _model_with_grad(1.0), _model_with_grad(math.nan)
    assert guard.step(optimizer, good, [1.0], "s1") .skipped is False
    outcome = guard.step(optimizer, bad, [1.0], "s2")
    assert outcome.skipped and not outcome.success and math.isnan(outcome.grad_norm)
    guard.step(optimizer, bad, [1.0], "s3")
    assert optimizer.steps == 1 and guard.consecutive == 2
    guard.step(optimizer, good, [1.0], "s4")  # a finite step resets the run of skips
    assert optimizer.steps == 2 and guard.consecutive == 0 and guard.total == 2
    guard.step(optimizer, bad, [1.0], "s5")
    guard.step(optimizer, good, [math.inf], "s6")
    with pytest.raises(NonFiniteError, match=r"stopped at s7: 3 optimizer steps in a row"):
        guard.step(optimizer, bad, [1.0], "s7")
    assert optimizer.steps == 2
    assert guard.metrics() == {"skipped_steps_total": 5.0, "skipped_steps_in_a_row": 3.0}


def test_context_names_the_iteration_and_summary_names_the_metrics():
    with pytest.raises(NonFiniteError, match=r"^iteration 7: boom"), nonfinite_context(7):
        raise NonFiniteError("boom")
    text = nonfinite_summary({"train/grad_norm": math.nan, "a": 1.0,
                              "train/skipped_steps_in_a_row": 2.0,
                              "train/skipped_steps_total": 5.0})
    assert text == " NON-FINITE train/grad_norm; skipped 2 step(s) in a row, 5 in total"
    assert nonfinite_summary({"a": 1.0, "train/skipped_steps_in_a_row": 0.0}) == ""


def test_non_finite_weights_are_refused():
    layer = torch.nn.Linear(2, 2)
    assert_finite_weights([layer], "iteration 3")
    with torch.no_grad():
        layer.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="refusing to save iteration 3"):
        assert_finite_weights([layer], "iteration 3")


def test_metrics_log_keeps_non_finite_values_and_counts_them(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(None, str(path))
    log.log(1, {"loss": 0.5, "grad_norm": 2.0})
    log.log(2, {"loss": math.nan, "grad_norm": math.inf})
    rows = read_jsonl(str(path))
    assert rows[0][NONFINITE_COUNT] == 0 and rows[1][NONFINITE_COUNT] == 2
    assert math.isnan(rows[1]["loss"]) and rows[1]["grad_norm"] == math.inf
