"""Bootstrap intervals and paired comparisons against direct references (a slow resampling loop,
scipy.stats.wilcoxon) and against their nominal coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from learnreg.eval.statistics import (
    bootstrap_ci,
    compare,
    holm,
    paired_comparison,
    summarize,
)


def _loop_bootstrap(values, statistic, n_resamples, confidence, seed):
    """Textbook percentile bootstrap, one resample at a time."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boot = [statistic(x[rng.integers(0, x.size, size=x.size)]) for _ in range(n_resamples)]
    alpha = 1 - confidence
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return statistic(x), lo, hi


@pytest.mark.parametrize("statistic", [np.mean, np.median])
def test_bootstrap_matches_reference_loop(statistic):
    x = np.random.default_rng(3).gamma(2.0, 1.5, size=25)
    got = bootstrap_ci(x, statistic, n_resamples=2000, confidence=0.9, seed=11)
    ref = _loop_bootstrap(x, statistic, 2000, 0.9, 11)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_bootstrap_chunking_does_not_change_result(monkeypatch):
    import learnreg.eval.statistics as st

    x = np.random.default_rng(0).normal(size=40)
    full = bootstrap_ci(x, n_resamples=1000, seed=5)
    monkeypatch.setattr(st, "_CHUNK_ELEMENTS", 40 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(x, n_resamples=1000, seed=5) == pytest.approx(full, abs=0)


def test_bootstrap_statistic_without_axis_argument():
    x = np.arange(10.0)
    got = bootstrap_ci(x, lambda v: float(np.max(v) - np.min(v)), n_resamples=300, seed=1)
    ref = _loop_bootstrap(x, lambda v: float(np.max(v) - np.min(v)), 300, 0.95, 1)
    np.testing.assert_allclose(got, ref)


def test_bootstrap_coverage_is_nominal():
    rng = np.random.default_rng(2024)
    hits = 0
    reps = 200
    for r in range(reps):
        x = rng.normal(5.0, 2.0, size=30)
        _, lo, hi = bootstrap_ci(x, n_resamples=1000, seed=r)
        hits += lo <= 5.0 <= hi
    assert 0.90 <= hits / reps <= 0.99


def test_bootstrap_nan_and_small_samples():
    x = [1.0, np.nan, 2.0, None, 3.0]
    est, lo, hi = bootstrap_ci(x, n_resamples=500)
    assert est == pytest.approx(2.0)
    assert bootstrap_ci([1.0, 2.0, 3.0], n_resamples=500) == (est, lo, hi)
    assert 1.0 <= lo <= est <= hi <= 3.0
    est, lo, hi = bootstrap_ci([np.nan, 4.0])
    assert est == 4.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1, 2], confidence=95)


def test_paired_comparison_matches_scipy_wilcoxon():
    rng = np.random.default_rng(7)
    b = rng.normal(0.7, 0.05, size=20)
    a = b + rng.normal(0.0, 0.02, size=20)
    res = paired_comparison(a, b, n_resamples=2000)
    assert res["n"] == 20
    assert res["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
    assert res["difference"] == pytest.approx(np.mean(a - b))
    assert res["low"] <= res["difference"] <= res["high"]
    assert res["mean_a"] == pytest.approx(a.mean()) and res["mean_b"] == pytest.approx(b.mean())
    assert (res["difference"], res["low"], res["high"]) == pytest.approx(
        bootstrap_ci(a - b, n_resamples=2000)
    )


def test_paired_comparison_detects_shift_and_no_shift():
    rng = np.random.default_rng(1)
    b = rng.normal(0.75, 0.05, size=15)
    shifted = paired_comparison(b + 0.03 + rng.normal(0, 0.01, 15), b, n_resamples=2000)
    assert shifted["p_value"] < 0.05 and shifted["low"] > 0
    same = paired_comparison(b + rng.normal(0, 0.01, 15), b, n_resamples=2000)
    assert same["p_value"] > 0.05 and same["low"] < 0 < same["high"]


def test_paired_comparison_degenerate_cases():
    # NaN/None in either drops the pair
    res = paired_comparison([1.0, np.nan, 3.0, 4.0], [0.5, 1.0, None, 3.0], n_resamples=200)
    assert res["n"] == 2
    assert res["p_value"] == pytest.approx(stats.wilcoxon([1.0, 4.0], [0.5, 3.0]).pvalue)
    # fewer than two pairs: no test
    one = paired_comparison([1.0], [2.0])
    assert one["n"] == 1 and math.isnan(one["p_value"]) and one["difference"] == -1.0
    assert math.isnan(one["low"]) and math.isnan(one["high"])
    empty = paired_comparison([], [])
    assert empty["n"] == 0 and math.isnan(empty["p_value"]) and math.isnan(empty["difference"])
    # identical on every pair: no evidence of a difference
    same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    with pytest.raises(ValueError, match="length"):
        paired_comparison([1, 2, 3], [1, 2])


def test_holm():
    adjusted = holm([0.01, 0.04, np.nan, 0.03])
    np.testing.assert_allclose(adjusted[:2] + adjusted[3:], [0.03, 0.06, 0.06])
    assert math.isnan(adjusted[2])
    assert holm([0.6, 0.9]) == [1.0, 1.0]


def _records():
    recs = []
    for i in range(5):
        recs.append({"method": "A", "pair": f"p{i}", "dice_mean": 0.7 + 0.01 * i, "error": None})
        recs.append({"method": "B", "pair": f"p{i}", "dice_mean": 0.75 + 0.01 * i, "error": None})
    # failed pair of B: its (nonsense) value must not count
    recs[-1] = {"method": "B", "pair": "p4", "dice_mean": 0.0, "error": "RuntimeError: boom"}
    recs.append({"method": "C", "pair": "p0", "dice_mean": None, "error": "failed"})
    return recs


def test_summarize_ignores_failed_records_and_missing_values():
    s = summarize(_records(), metrics=("dice_mean", "tre_mean"), n_resamples=500)
    assert list(s) == ["A", "B", "C"]
    assert s["A"]["dice_mean"]["n"] == 5
    assert s["A"]["dice_mean"]["mean"] == pytest.approx(0.72)
    assert s["B"]["dice_mean"]["n"] == 4
    assert s["B"]["dice_mean"]["mean"] == pytest.approx(0.765)
    assert s["A"]["dice_mean"]["low"] <= 0.72 <= s["A"]["dice_mean"]["high"]
    assert s["A"]["tre_mean"]["n"] == 0 and math.isnan(s["A"]["tre_mean"]["mean"])
    assert s["C"]["dice_mean"]["n"] == 0


def test_compare_pairs_only_common_finished_pairs():
    out = compare(_records(), metrics=("dice_mean",), n_resamples=500)
    assert out["reference"] == "A"
    res = out["comparisons"]["B"]["dice_mean"]
    assert res["n"] == 4  # p4 failed for B
    assert res["difference"] == pytest.approx(0.05)
    assert out["comparisons"]["C"]["dice_mean"]["n"] == 0
    assert "p_holm" in res
    rev = compare(_records(), reference="B", metrics=("dice_mean",), n_resamples=500)
    assert rev["comparisons"]["A"]["dice_mean"]["difference"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="reference"):
        compare(_records(), reference="nope")
    with pytest.raises(ValueError, match="more than one record"):
        compare(_records() + [{"method": "A", "pair": "p0", "dice_mean": 0.1}])
