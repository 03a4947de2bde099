"""Drift attribution against routes worked out by hand on a tiny router (H=2, E=3, top-1)."""

import pytest
import torch

from megatron_pr2.routing.drift_attribution import DriftCounts, drift_counts
from megatron_pr2.training.drift_probe import drift_metrics


def test_four_routes_by_hand():
    # experts' weight rows (E=3, H=2); the current weight moves expert 2 up along x
    w_old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    w_cur = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.6]])
    h_old = torch.tensor([[1.0, 0.2],    # old logits 1.0, 0.2, 0.72 -> e0; cur-W 1.0, .2, 1.02 -> e2
                          [0.2, 1.0],    # .2, 1.0, .72 -> e1;   cur-W .2, 1.0, .78 -> e1
                          [1.0, 0.9],    # 1.0, .9, 1.14 -> e2;  cur-W 1.0, .9, 1.44 -> e2
                          [0.5, 0.4]])   # .5, .4, .54 -> e2;    cur-W .5, .4, .69 -> e2
    h_cur = torch.tensor([[1.0, 0.2],    # unchanged input
                          [0.9, 0.2],    # old W: .9, .2, .66 -> e0; cur W: .9, .2, .93 -> e2
                          [1.0, 0.9],    # unchanged
                          [0.2, 0.9]])   # old W: .2, .9, .66 -> e1; cur W: .2, .9, .72 -> e1
    # live (h_cur W_cur): e2, e2, e2, e1
    # stale (h_old W_old): e0, e1, e2, e2 -> agrees on token 2 only
    # weight-known (h_old W_cur): e2, e1, e2, e2 -> agrees on tokens 0, 2
    # input-known (h_cur W_old): e0, e0, e2, e1 -> agrees on tokens 2, 3
    counts = drift_counts(h_old, h_cur, w_old, w_cur, k=1)
    assert counts == DriftCounts(tokens=4, stale_hits=1, weight_known_hits=2, input_known_hits=2)
    summary = counts.summary()
    assert summary["deviation"] == pytest.approx(0.75)
    assert summary["weight_share"] == pytest.approx((2 - 1) / 4 / 0.75)
    assert summary["input_share"] == pytest.approx((2 - 1) / 4 / 0.75)


def test_top_k_sets_and_no_drift():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(16, 8, generator=gen)
    w = torch.randn(6, 8, generator=gen)
    counts = drift_counts(h, h, w, w, k=2)
    assert counts.stale_hits == counts.weight_known_hits == counts.input_known_hits == 16
    assert "weight_share" not in counts.summary()  # nothing deviates: no share to explain


def test_metrics_sum_counts_over_layers_and_later_ministeps():
    step1 = {1: DriftCounts(10, 10, 10, 10)}
    step2 = {1: DriftCounts(10, 8, 8, 10), 3: DriftCounts(10, 6, 7, 9)}
    metrics = drift_metrics([step1, step2])
    assert metrics["drift/deviation/ministep1"] == 0.0
    assert metrics["drift_layer/layer_3/input_share/ministep2"] == pytest.approx(0.3 / 0.4)
    # mini-steps >= 2, both layers: 20 tokens, 14 stale hits, 15 weight-known, 19 input-known
    assert metrics["drift/deviation/ministeps_ge2"] == pytest.approx(6 / 20)
    assert metrics["drift/weight_share/ministeps_ge2"] == pytest.approx((1 / 20) / (6 / 20))
    assert metrics["drift/input_share/ministeps_ge2"] == pytest.approx((5 / 20) / (6 / 20))


def test_shape_errors():
    with pytest.raises(ValueError, match="same tokens"):
        drift_counts(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="hidden size"):
        drift_counts(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 5), torch.zeros(3, 5), 1)
