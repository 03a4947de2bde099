"""Predictor losses against references computed expert by expert with ``math``."""

import math

import pytest
import torch

from megatron_pr2.routing.predictor_loss import PREDICTOR_LOSSES, predictor_loss

P_CUR = [[0.3, -1.0, 2.0, 0.1], [1.5, 0.2, -0.4, 0.0]]
P_OLD = [[0.1, -0.5, 1.0, 0.4], [1.0, 0.9, -0.2, -0.3]]
DELTA = [[0.2, -0.1, 0.6, -0.5], [0.0, -0.3, 0.1, 0.4]]


def _softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(target_logits, model_logits):
    q, r = _softmax(target_logits), _softmax(model_logits)
    return sum(qi * math.log(qi / ri) for qi, ri in zip(q, r))


def _hand(name, t):
    cur, old, delta = P_CUR[t], P_OLD[t], DELTA[t]
    if name == "kl-post":
        return _kl(cur, [o + d for o, d in zip(old, delta)])
    if name == "kl":
        return _kl([c - o for c, o in zip(cur, old)], delta)
    return sum((d - (c - o)) ** 2 for c, o, d in zip(cur, old, delta)) / len(cur)


def _tensors():
    return (torch.tensor(P_CUR, requires_grad=True), torch.tensor(P_OLD, requires_grad=True),
            torch.tensor(DELTA, requires_grad=True))


@pytest.mark.parametrize("name", ["kl-post", "kl", "l2"])
def test_per_token_loss_matches_hand_formula(name):
    loss = predictor_loss(name, *_tensors())
    expected = [_hand(name, t) for t in range(2)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ["kl-post", "kl", "l2"])
def test_only_delta_receives_gradient(name):
    cur, old, delta = _tensors()
    predictor_loss(name, cur, old, delta).sum().backward()
    assert cur.grad is None and old.grad is None
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_kl_post_gradient_is_predicted_minus_target_probabilities():
    # d/d delta KL(q || softmax(p_old + delta)) = softmax(p_old + delta) - q
    cur, old, delta = _tensors()
    predictor_loss("kl-post", cur, old, delta).sum().backward()
    for t in range(2):
        r = _softmax([o + d for o, d in zip(P_OLD[t], DELTA[t])])
        q = _softmax(P_CUR[t])
        assert delta.grad[t].tolist() == pytest.approx([ri - qi for ri, qi in zip(r, q)], abs=1e-6)


def test_kl_post_is_zero_when_prediction_is_exact():
    cur = torch.tensor(P_CUR)
    old = torch.tensor(P_OLD)
    assert predictor_loss("kl-post", cur, old, cur - old).abs().max() < 1e-6


def test_unknown_variant_and_bad_shapes_are_refused():
    cur, old, delta = _tensors()
    with pytest.raises(ValueError, match="unknown predictor loss 'mse'"):
        predictor_loss("mse", cur, old, delta)
    with pytest.raises(ValueError, match=r"one shape \[n, E\]"):
        predictor_loss("kl-post", cur, old[:, :3], delta)
    assert set(PREDICTOR_LOSSES) == {"kl-post", "kl", "l2"}
