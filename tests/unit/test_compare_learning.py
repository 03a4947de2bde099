"""The compare job's learning checks: reward gain, degeneracy flags, zero-advantage groups."""

import math

import pytest
import torch

from megatron_pr2 import compare
from megatron_pr2.rl.advantages import grpo_advantages, zero_advantage_group_fraction


def _run(rewards, zero_grad=0, skipped=0, ministeps=4, zero_adv=0.25, evals=(0.5, 0.7)):
    """JSONL records of one run as the loop logs them (step 0: the eval before RL)."""
    records = [{"step": 0, compare.EVAL: evals[0]}]
    for step, reward in enumerate(rewards, start=1):
        records.append({"step": step, compare.REWARD: reward, compare.ZERO_ADV: zero_adv,
                        "train/zero_grad_ministeps": float(zero_grad),
                        "train/skipped_ministeps": float(skipped),
                        "train/ministeps": float(ministeps), compare.POLICY_GRAD: 0.1})
    records[-1][compare.EVAL] = evals[1]
    return compare.with_derived(records)


def test_zero_advantage_fraction_matches_the_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    advantages = grpo_advantages(rewards, 4).view(-1, 4)
    no_signal = sum(bool((group == 0).all()) for group in advantages) / 3
    assert no_signal == pytest.approx(2 / 3)  # the first and the last group
    assert zero_advantage_group_fraction(rewards, 4) == pytest.approx(no_signal)
    assert zero_advantage_group_fraction(rewards, 2) == 1.0  # every pair is constant


def test_gain_first_and_final_reductions_by_hand():
    records = _run([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert compare.reduce_run(records, compare.REWARD, "gain") == pytest.approx(
        (0.6 + 0.7 + 0.8 + 0.9) / 4 - (0.1 + 0.2 + 0.3 + 0.4) / 4)
    assert compare.reduce_run(records, compare.REWARD, "head") == pytest.approx(0.25)
    assert compare.reduce_run(records, compare.EVAL, "first") == 0.5
    assert compare.reduce_run(records, compare.EVAL, "final") == 0.7
    # the first and last 4 iterations may not overlap
    assert compare.reduce_run(_run([0.1] * 7), compare.REWARD, "gain") is None


def test_degeneracy_flags_each_reason():
    assert compare.degeneracy(_run([0.2, 0.3, 0.4, 0.5, 0.6])) == []
    # 1 of 4 mini-steps without policy gradient in every iteration: 25% > 10%
    for zero_grad, skipped in ((1, 0), (0, 1)):
        assert compare.degeneracy(_run([0.2, 0.3, 0.4, 0.5, 0.6], zero_grad, skipped)) == [
            "25% of mini-steps had no policy gradient or were skipped"]
    assert "60% of groups had equal rewards" in compare.degeneracy(
        _run([0.2, 0.3, 0.4, 0.5, 0.6], zero_adv=0.6))
    assert any(r.startswith("reward collapsed") for r in
               compare.degeneracy(_run([0.2, 0.1, 0.0, 0.0, 0.0, 0.0])))


def test_learning_section_states_gain_and_degenerate_runs():
    learning = {1: _run([0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7]),
                2: _run([0.1, 0.3, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6]),
                3: _run([0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8])}
    flat = {1: _run([0.0] * 8, zero_grad=4, zero_adv=1.0), 2: _run([0.0] * 8, zero_grad=4,
                                                                    zero_adv=1.0)}
    text = "\n".join(compare.learning_section({"r2": learning, "none": flat}))
    gains = [compare.reduce_run(r, compare.REWARD, "gain") for r in learning.values()]
    mean = sum(gains) / 3
    assert f"- r2: reward gain {mean:.3f} ± " in text and "rises (95% interval excludes 0)" in text
    assert "**2 of 5 runs are degenerate**" in text
    assert text.count("DEGENERATE: 100% of mini-steps had no policy gradient") == 2
    assert compare.degenerate_methods({"r2": learning, "none": flat}) == {"none"}
    paired = "\n".join(compare.paired_section({"r2": learning, "none": {
        seed: learning[seed] for seed in (1, 2)} | {3: flat[1]}}))
    assert "[from degenerate runs]" in paired
    assert not math.isnan(mean)
