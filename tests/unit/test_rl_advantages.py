"""GRPO advantages against hand-computed group statistics."""

import statistics

import pytest
import torch

from megatron_pr2.rl.advantages import broadcast_to_tokens, grpo_advantages

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.25, 1.0, 0.0]


def _reference(rewards, group_size, normalize_std, eps=1e-6):
    out = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g:g + group_size]
        mean = sum(group) / len(group)
        std = statistics.stdev(group)  # sample (Bessel-corrected) std
        for r in group:
            out.append((r - mean) / (std + eps) if normalize_std else r - mean)
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_advantages_match_hand_values(normalize_std):
    got = grpo_advantages(torch.tensor(REWARDS), group_size=4, normalize_std=normalize_std)
    expected = _reference(REWARDS, 4, normalize_std)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_grpo_advantages_explicit_numbers():
    # group [1, 0, 0, 1]: mean 0.5, sample std sqrt(1/3) -> +-0.5 * sqrt(3)
    got = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    a = 0.5 * 3 ** 0.5
    assert got.tolist() == pytest.approx([a, -a, -a, a], abs=1e-5)


def test_constant_group_gives_zero_and_2d_input_is_accepted():
    got = grpo_advantages(torch.tensor([[0.5, 0.5], [2.0, 0.0]]), group_size=2)
    assert got.tolist() == pytest.approx([0.0, 0.0, 2 ** -0.5, -(2 ** -0.5)], abs=1e-5)


def test_bad_group_sizes_raise():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.ones(4), group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.ones(4), group_size=3)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    assert got.tolist() == [[0.5, 0.5, 0.0], [0.0, -2.0, -2.0]]
    with pytest.raises(ValueError, match="response_mask"):
        broadcast_to_tokens(torch.ones(3), mask)
