"""Train/rollout mismatch metrics and entropy against hand-computed values."""

import math

import pytest
import torch

from megatron_pr2.rl.mismatch import mismatch_metrics
from megatron_pr2.training.logprobs import token_entropy


def test_mismatch_metrics_match_hand_values():
    train = torch.tensor([[-1.0, -2.0, -0.1], [-3.0, -0.2, 7.0]])
    rollout = torch.tensor([[-1.5, -2.0, -1.0], [-2.2, -0.25, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # last token is padding with a huge gap
    log_r = [0.5, 0.0, 0.9, -0.8, 0.05]
    k3 = sum(math.exp(x) - 1 - x for x in log_r) / 5
    absdiff = sum(abs(x) for x in log_r) / 5
    # max(r, 1/r) > 2: r = e^0.9 = 2.46 and 1/r = e^0.8 = 2.23 -> 2 of 5
    got = mismatch_metrics(train, rollout, mask, tau=2.0)
    assert got["k3_kl"].item() == pytest.approx(k3, rel=1e-5)
    assert got["abs_logprob_diff"].item() == pytest.approx(absdiff, rel=1e-5)
    assert got["extreme_token_fraction"].item() == pytest.approx(2 / 5)
    assert mismatch_metrics(train, rollout, mask, tau=3.0)["extreme_token_fraction"].item() == 0.0


def test_identical_logprobs_have_zero_mismatch():
    x = torch.randn(4, 5)
    got = mismatch_metrics(x, x.clone(), torch.ones(4, 5))
    assert all(v.item() == 0.0 for v in got.values())


def test_mismatch_rejects_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        mismatch_metrics(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau"):
        mismatch_metrics(torch.zeros(2), torch.zeros(2), torch.ones(2), tau=1.0)


def test_token_entropy_hand_values():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)], [1.0, 1.0, float("-inf")]])
    p = [1 / 6, 2 / 6, 3 / 6]
    expected = [-sum(x * math.log(x) for x in p), math.log(2.0)]
    assert token_entropy(logits).tolist() == pytest.approx(expected, rel=1e-5)
    assert token_entropy(torch.zeros(64)).item() == pytest.approx(math.log(64), rel=1e-6)
