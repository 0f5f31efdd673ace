from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from metabench.stats import (
    Estimate,
    average_estimate,
    estimate,
    paired_stats,
    significantly_different,
    tie_aware_ranks,
    tie_groups,
    top_group,
)


def test_estimate_is_meta_dataset_ci() -> None:
    values = np.array([0.2, 0.4, 0.9, 0.5, 0.65])
    est = estimate(values)
    assert est.mean == pytest.approx(values.mean())
    assert est.half_width == pytest.approx(1.96 * values.std(ddof=0) / math.sqrt(len(values)))
    assert est.var == pytest.approx(values.var(ddof=0) / len(values))
    assert est.n == 5


def test_average_of_means_and_its_ci() -> None:
    a, b = Estimate(0.8, 0.0004, 100), Estimate(0.6, 0.0009, 50)
    avg = average_estimate([a, b])
    assert avg.mean == pytest.approx(0.7)
    assert avg.half_width == pytest.approx(1.96 * math.sqrt(0.0004 + 0.0009) / 2)
    assert not average_estimate([a, Estimate(math.nan, math.nan, 0)]).valid


def test_significance_rule() -> None:
    a, b = Estimate(0.80, 0.01**2, 600), Estimate(0.77, 0.01**2, 600)
    threshold = 1.96 * math.sqrt(2) * 0.01  # 0.0277
    assert significantly_different(a, b)  # 0.03 > 0.0277
    assert not significantly_different(a, Estimate(0.80 - threshold + 1e-6, 0.01**2, 600))


def _e(mean: float, se: float = 0.01) -> Estimate:
    return Estimate(mean, se**2, 600)


def test_ranks_clear_winner() -> None:
    entries = {"a": _e(0.90), "b": _e(0.80), "c": _e(0.70)}
    assert tie_aware_ranks(entries) == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert top_group(entries) == {"a"}


def test_ranks_two_tied() -> None:
    # threshold between two se=0.01 entries is 0.0277: a and b tie, c is far below.
    entries = {"c": _e(0.70), "b": _e(0.89), "a": _e(0.90)}
    assert tie_aware_ranks(entries) == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert top_group(entries) == {"a", "b"}


def test_ranks_chained_ties_are_anchored_at_the_group_best() -> None:
    # a~b (0.02), b~c (0.02), but a vs c (0.04) is significant: groups {a, b}, {c}; c does not join via b.
    entries = {"a": _e(0.90), "b": _e(0.88), "c": _e(0.86), "d": _e(0.855)}
    assert tie_groups(entries) == [["a", "b"], ["c", "d"]]
    assert tie_aware_ranks(entries) == {"a": 1.5, "b": 1.5, "c": 3.5, "d": 3.5}


def test_group_is_contiguous_in_mean_order() -> None:
    # b is significantly below a; c has a huge CI (would tie with a) but ranks after b, so it starts b's group.
    entries = {"a": _e(0.90, 0.001), "b": _e(0.85, 0.001), "c": _e(0.84, 0.2)}
    assert tie_groups(entries) == [["a"], ["b", "c"]]


def test_all_tied_means_no_bold_and_one_entry_no_bold() -> None:
    entries = {"a": _e(0.80, 0.05), "b": _e(0.79, 0.05)}
    assert tie_aware_ranks(entries) == {"a": 1.5, "b": 1.5}
    assert top_group(entries) == set()
    assert top_group({"a": _e(0.8)}) == set()


def test_invalid_entries_are_left_out_of_ranks() -> None:
    entries = {"a": _e(0.9), "x": Estimate(math.nan, math.nan, 0)}
    assert tie_aware_ranks(entries) == {"a": 1.0}


def test_paired_stats_match_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.4, 0.9, 40)
    b = a - rng.normal(0.02, 0.05, 40)
    res = paired_stats(a, b)
    t = sps.ttest_rel(a, b)
    w = sps.wilcoxon(a - b)
    assert res["n"] == 40
    assert res["diff"] == pytest.approx(np.mean(a - b))
    assert res["t"] == pytest.approx(t.statistic) and res["p_t"] == pytest.approx(t.pvalue)
    assert res["wilcoxon"] == pytest.approx(w.statistic) and res["p_wilcoxon"] == pytest.approx(w.pvalue)
    ci = t.confidence_interval(0.95)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((ci.low, ci.high))


def test_paired_stats_degenerate_cases() -> None:
    same = paired_stats([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["diff"] == 0 and same["p_t"] == 1.0 and same["p_wilcoxon"] == 1.0
    assert math.isnan(paired_stats([0.5], [0.4])["p_t"])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_stats([0.5, 0.6], [0.5])
