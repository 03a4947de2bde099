"""Routing metrics against counts made by hand on small examples."""

import pytest
import torch

from megatron_pr2.routing.metrics import (
    LayerRoutingMetrics,
    predictor_stats,
    same_expert_set,
    topk_overlap,
)

REPLAYED = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
LIVE = torch.tensor([[1, 0], [2, 4], [6, 7], [6, 7]])  # same set, half, none, same


def test_same_set_ignores_order():
    assert same_expert_set(REPLAYED, LIVE).tolist() == [True, False, False, True]


def test_overlap_counts_shared_experts():
    assert topk_overlap(REPLAYED, LIVE).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="expert id shapes differ"):
        same_expert_set(REPLAYED, LIVE[:, :1])


def test_layer_metrics_accumulate_over_microbatches():
    metrics = LayerRoutingMetrics()
    metrics.add_replay(REPLAYED[:2], LIVE[:2])
    metrics.add_replay(REPLAYED[2:], LIVE[2:])
    summary = metrics.summary()
    assert summary["zero_deviation_ratio"] == pytest.approx(2 / 4)
    assert summary["topk_overlap"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert "predictor_topk_acc" not in summary


def test_predictor_stats_by_hand():
    # 3 experts, top-2. Token 0: p_old top-2 {0, 1}; p_cur top-2 {0, 2}; delta moves 2 above 1.
    # Token 1: p_old top-2 {1, 2} == p_cur top-2; delta keeps it.
    p_old = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    p_cur = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.5, 1.5]])
    delta = torch.tensor([[0.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    stats = predictor_stats(p_cur, p_old, delta, k=2)
    assert stats.tokens == 2
    assert stats.predictor_hits == 2  # both tokens right
    assert stats.zero_predictor_hits == 1  # only token 1
    ratio0 = (1.0 + 0.25) ** 0.5 / (9 + 4 + 1) ** 0.5
    assert stats.delta_ratio_sum == pytest.approx(ratio0 + 0.0)
    metrics = LayerRoutingMetrics()
    metrics.add_predictor(stats, loss_value=0.5)
    summary = metrics.summary()
    assert summary["predictor_topk_acc"] == 1.0
    assert summary["zero_predictor_topk_acc"] == 0.5
    assert summary["predictor_loss"] == 0.5
