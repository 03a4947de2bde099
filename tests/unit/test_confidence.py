"""Confidence intervals against printed t tables and hand arithmetic."""

import math

import pytest

from megatron_pr2.confidence import (
    mean_ci,
    paired_difference,
    ratio_interval,
    t_critical,
    verdict,
)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                       (30, 2.042)])
def test_t_critical_matches_the_printed_table(df, table):
    assert t_critical(df) == pytest.approx(table, abs=2e-3)


def test_mean_ci_by_hand():
    # values 1, 2, 3: mean 2, sample sd 1, half-width t_2 * 1 / sqrt(3)
    interval = mean_ci([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.303 / math.sqrt(3), abs=2e-3)
    assert math.isnan(mean_ci([5.0]).half_width)


def test_paired_difference_and_verdict():
    lookahead = [0.02, 0.021, 0.019]
    r2 = [0.03, 0.032, 0.031]  # differences -0.010, -0.011, -0.012
    diff = paired_difference(lookahead, r2)
    assert diff.mean == pytest.approx(-0.011)
    assert diff.half_width == pytest.approx(4.303 * 0.001 / math.sqrt(3), abs=1e-5)
    assert verdict(diff, higher_is_better=False) == "better"
    assert verdict(diff, higher_is_better=True) == "worse"
    assert verdict(paired_difference([1.0, 2.0, 3.0], [2.0, 1.0, 3.0]),
                   higher_is_better=True) == "not distinguishable at 95%"
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])


def test_ratio_interval_is_the_geometric_mean_ratio():
    value, low, high = ratio_interval([2.0, 8.0], [1.0, 2.0])  # ratios 2 and 4
    assert value == pytest.approx(math.sqrt(8.0))
    assert low < value < high
    assert ratio_interval([0.0, 1.0], [1.0, 1.0]) is None
