"""Policy losses against references written with plain Python loops and ``math``.

Each reference recomputes the formula of docs/method.md (Policy losses) token by token; gradients are checked
against the hand-derived derivative of the active branch of the clipped objective.
"""

import math

import pytest
import torch

from megatron_pr2.rl.losses import (
    LOSS_DEFAULTS,
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossInputs,
    gather_router_logprobs,
    policy_loss,
    router_shift_weight,
)

# Two sequences, three positions; position (1, 2) is padding with values that would dominate.
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 5.0]]
OLD = [[-1.1, -0.9, -1.5], [-0.3, -0.8, -0.2]]
ADV = [[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]
MASK = [[1, 1, 1], [1, 1, 0]]
# pi_old / pi_rollout = exp(OLD - ROLLOUT): e^0.2, e^1.0 (> 2), e^-1.0 (< 0.5), e^0, e^2.0 (> 5)
ROLLOUT = [[-1.3, -1.9, -0.5], [-0.3, -2.8, -0.2]]
# Router log-probs [B, T, L=2, K=2] at the old routes.
ROUTER_OLD = [[[[-0.5, -1.0], [-0.7, -1.2]]] * 3, [[[-0.4, -1.5], [-0.9, -0.9]]] * 3]
SHIFTS = [[[[0.1, -0.1], [0.0, 0.2]], [[0.5, -0.5], [0.6, 0.4]], [[0.0, 0.0], [0.0, 0.0]]],
          [[[0.3, 0.0], [0.0, -0.1]], [[1.0, 0.2], [-0.4, 0.2]], [[0.0, 0.0], [0.0, 0.0]]]]
ROUTER_CUR = [[[[o + s for o, s in zip(ko, ks)] for ko, ks in zip(lo, ls)]
               for lo, ls in zip(to, ts)] for to, ts in zip(ROUTER_OLD, SHIFTS)]


def _inputs(rollout=False, router=False):
    t = torch.tensor
    return PolicyLossInputs(
        logp=t(LOGP, requires_grad=True), old_logp=t(OLD), advantages=t(ADV), mask=t(MASK),
        rollout_logp=t(ROLLOUT) if rollout else None,
        router_logp_cur=t(ROUTER_CUR) if router else None,
        router_logp_old=t(ROUTER_OLD) if router else None)


def _ref_gamma(b, t):
    total = 0.0
    for l in range(2):
        total += sum(abs(ROUTER_CUR[b][t][l][k] - ROUTER_OLD[b][t][l][k]) for k in range(2)) / 2
    return math.exp(-total / 2)


def _ref_token_loss(eps_low, eps_high, agg="token_mean", tis=None, icepop=None, gamma_min=None,
                    gspo=False):
    """Loss and d loss / d logp, computed position by position."""
    n_tokens = [sum(row) for row in MASK]
    seq_log_ratio = [sum((LOGP[b][t] - OLD[b][t]) * MASK[b][t] for t in range(3)) / n_tokens[b]
                     for b in range(2)]
    losses = [[0.0] * 3 for _ in range(2)]
    grads = [[0.0] * 3 for _ in range(2)]
    for b in range(2):
        for t in range(3):
            if not MASK[b][t]:
                continue
            ratio = math.exp(seq_log_ratio[b] if gspo else LOGP[b][t] - OLD[b][t])
            if gamma_min is not None:
                ratio *= max(_ref_gamma(b, t), gamma_min)
            weight = 1.0
            w = math.exp(OLD[b][t] - ROLLOUT[b][t])
            if tis is not None:
                weight *= min(w, tis)
            if icepop is not None and not icepop[0] <= w <= icepop[1]:
                weight = 0.0
            a = ADV[b][t]
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            losses[b][t] = -min(ratio * a, clipped * a) * weight
            # d(ratio)/d(logp_t) = ratio (token ratio; GSPO token form alike); 0 if clip active
            grads[b][t] = 0.0 if clipped * a < ratio * a else -ratio * a * weight
    if agg == "token_mean":
        n = sum(n_tokens)
        return (sum(map(sum, losses)) / n, [[g / n for g in row] for row in grads])
    return (sum(sum(losses[b]) / n_tokens[b] for b in range(2)) / 2,
            [[g / n_tokens[b] / 2 for g in grads[b]] for b in range(2)])


def _check(cfg, inputs, ref):
    loss, metrics = policy_loss(inputs, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(ref[0], rel=1e-5, abs=1e-7)
    assert inputs.logp.grad.tolist() == [pytest.approx(row, rel=1e-5, abs=1e-7) for row in ref[1]]
    assert metrics["policy_loss"].item() == pytest.approx(ref[0], rel=1e-5, abs=1e-7)
    return metrics


def test_ppo_clip_token_mean_matches_hand_values():
    metrics = _check(PolicyLossConfig(), _inputs(), _ref_token_loss(0.2, 0.2))
    # clip active at (0,1): r = e^0.4 > 1.2 with A > 0, and (1,1): r = e^-0.4 < 0.8 with A < 0
    assert metrics["pg_clip_fraction"].item() == pytest.approx(2 / 5)
    k3 = [math.exp(x) - 1 - x for x in (0.1, 0.4, -0.5, 0.0, -0.4)]
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 5, rel=1e-5)


def test_ppo_clip_explicit_number():
    # tokens: r=e^.1 (A=1), e^.4 -> 1.2 (A=1), e^-.5 (A=1), 1 (A=-.5), e^-.4 -> .8 (A=-.5)
    expected = -(math.exp(0.1) + 1.2 + math.exp(-0.5) - 0.5 - 0.8 * 0.5) / 5
    loss, _ = policy_loss(_inputs(), PolicyLossConfig())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_clip_higher_and_seq_mean():
    cfg = PolicyLossConfig(eps_low=0.1, eps_high=0.5, aggregation="seq_mean")
    metrics = _check(cfg, _inputs(), _ref_token_loss(0.1, 0.5, agg="seq_mean"))
    # e^0.4 = 1.49 < 1.5 is no longer clipped; e^-0.4 = 0.67 < 0.9 still is (A < 0)
    assert metrics["pg_clip_fraction"].item() == pytest.approx(1 / 5)


def test_gspo_sequence_ratio_matches_hand_values():
    cfg = PolicyLossConfig(loss_type="gspo", eps_low=0.1, eps_high=0.1)
    ref = _ref_token_loss(0.1, 0.1, agg="seq_mean", gspo=True)
    _check(cfg, _inputs(), ref)
    # s_0 = exp((0.1 + 0.4 - 0.5) / 3) = 1 ; s_1 = exp(-0.4 / 2) = 0.819 -> clipped to 0.9 (A < 0)
    s1 = math.exp(-0.2)
    assert ref[0] == pytest.approx((-1.0 + 0.9 * 0.5) / 2)
    assert ref[1][1] == [0.0, 0.0, 0.0] and s1 < 0.9


def test_gspo_unclipped_gradient_is_gradient_of_sequence_ratio():
    cfg = PolicyLossConfig(loss_type="gspo", eps_low=0.5, eps_high=0.5)
    inputs = _inputs()
    loss, _ = policy_loss(inputs, cfg)
    loss.backward()
    s1 = math.exp(-0.2)  # d/dlogp_{1,t} of -(s_1 * A_1) / 2 = -s_1 * A_1 / (2 * n_1)
    assert inputs.logp.grad[1].tolist() == pytest.approx([s1 * 0.5 / 4, s1 * 0.5 / 4, 0.0])
    assert inputs.logp.grad[0].tolist() == pytest.approx([-1 / 6] * 3)


def test_gspo_defaults_are_sequence_level():
    cfg = PolicyLossConfig(loss_type="gspo")
    assert (cfg.eps_low, cfg.eps_high, cfg.aggregation) == (3e-4, 4e-4, "seq_mean")


def test_tis_weights_and_is_clip_fraction():
    metrics = _check(PolicyLossConfig(tis=True), _inputs(rollout=True),
                     _ref_token_loss(0.2, 0.2, tis=2.0))
    # pi_old / pi_rollout > 2 at (0,1) e^1 and (1,1) e^2
    assert metrics["is_ratio_clip_fraction"].item() == pytest.approx(2 / 5)
    assert "icepop_masked_fraction" not in metrics


def test_icepop_masks_out_of_band_tokens():
    metrics = _check(PolicyLossConfig(icepop=True), _inputs(rollout=True),
                     _ref_token_loss(0.2, 0.2, icepop=(0.5, 5.0)))
    # e^-1 = 0.37 < 0.5 at (0,2) and e^2 = 7.4 > 5 at (1,1)
    assert metrics["icepop_masked_fraction"].item() == pytest.approx(2 / 5)


def test_tis_and_icepop_compose():
    _check(PolicyLossConfig(tis=True, icepop=True, tis_cap=1.5), _inputs(rollout=True),
           _ref_token_loss(0.2, 0.2, tis=1.5, icepop=(0.5, 5.0)))


def test_router_shift_weight_hand_values():
    got = router_shift_weight(torch.tensor(ROUTER_CUR), torch.tensor(ROUTER_OLD))
    # token (0,1): |shifts| layer means 0.5 and 0.5 -> exp(-0.5)
    assert got[0, 1].item() == pytest.approx(math.exp(-0.5))
    expected = [[_ref_gamma(b, t) for t in range(3)] for b in range(2)]
    assert got.tolist() == [pytest.approx(row, rel=1e-6) for row in expected]


def test_rspo_scales_ratio_before_clipping():
    inputs = _inputs(router=True)
    metrics = _check(PolicyLossConfig(rspo=True, rspo_gamma_min=0.8), inputs,
                     _ref_token_loss(0.2, 0.2, gamma_min=0.8))
    gammas = [_ref_gamma(b, t) for b in range(2) for t in range(3) if MASK[b][t]]
    assert metrics["rspo_gamma_mean"].item() == pytest.approx(sum(gammas) / 5, rel=1e-6)
    below = sum(g < 0.8 for g in gammas)
    assert below == 2
    assert metrics["rspo_gamma_below_min_fraction"].item() == pytest.approx(below / 5)
    assert inputs.router_logp_cur.grad is None


def test_rspo_router_inputs_are_stop_gradient():
    inputs = _inputs(router=True)
    inputs.router_logp_cur.requires_grad_(True)
    loss, _ = policy_loss(inputs, PolicyLossConfig(rspo=True))
    loss.backward()
    assert inputs.router_logp_cur.grad is None


def test_gamma_metrics_without_rspo_do_not_change_loss():
    plain, _ = policy_loss(_inputs(), PolicyLossConfig())
    monitored, metrics = policy_loss(_inputs(router=True), PolicyLossConfig())
    assert monitored.item() == plain.item() and "rspo_gamma_mean" in metrics


def test_gather_router_logprobs():
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0, 0.0]]])  # [T=1, L=1, E=4]
    got = gather_router_logprobs(logits, torch.tensor([[[1, 3]]], dtype=torch.uint8))
    assert got.tolist() == [[pytest.approx([math.log(0.5), math.log(1 / 6)])]]


def test_normalizer_replaces_count():
    cfg = PolicyLossConfig()
    local, _ = policy_loss(_inputs(), cfg)
    scaled, _ = policy_loss(_inputs(), cfg, normalizer=20.0)
    assert scaled.item() == pytest.approx(local.item() * 5 / 20)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(_inputs(), cfg, normalizer=0.0)


def test_empty_mask_gives_zero_loss():
    inputs = _inputs()
    inputs.mask = torch.zeros(2, 3)
    for name in POLICY_LOSSES:
        loss, metrics = policy_loss(inputs, PolicyLossConfig(loss_type=name))
        assert loss.item() == 0.0 and metrics["pg_clip_fraction"].item() == 0.0


def test_bad_config_and_inputs_raise():
    assert set(LOSS_DEFAULTS) == set(POLICY_LOSSES)
    with pytest.raises(ValueError, match="unknown loss_type"):
        PolicyLossConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="sum")
    with pytest.raises(ValueError, match="rollout_logp"):
        policy_loss(_inputs(), PolicyLossConfig(tis=True))
    with pytest.raises(ValueError, match="RSPO"):
        policy_loss(_inputs(), PolicyLossConfig(rspo=True))
    with pytest.raises(ValueError, match="shape mismatch"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, T, L, K\]"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3),
                         router_logp_cur=torch.zeros(2, 3, 4), router_logp_old=torch.zeros(2, 3, 4))
