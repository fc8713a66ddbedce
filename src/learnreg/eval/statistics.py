"""Statistics of evaluation results: bootstrap confidence intervals and paired comparisons.

Every function here ignores NaN (and, for records, ``None`` and failed pairs) rather than
letting one missing value poison a mean, and reports ``n``, the number of values actually used,
so that a table can say how many pairs stand behind each number.

Records follow the schema of :mod:`learnreg.runner.evaluate`: one plain dict per
(method, pair) with scalar metrics such as ``"dice_mean"`` and an ``"error"`` that is set
when the pair failed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _sps

__all__ = [
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "bootstrap_ci",
    "compare",
    "holm",
    "methods_in",
    "paired_comparison",
    "summarize",
]

DEFAULT_METRICS: tuple[str, ...] = (
    "dice_mean",
    "hd95_mean",
    "tre_mean",
    "folding_fraction",
    "sdlogj",
    "ice_mean",
    "seconds",
    "peak_memory_mb",
)

#: Direction of improvement of each known metric (others are assumed lower-is-better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice_mean": True,
    "hd95_mean": False,
    "tre_mean": False,
    "tre_max": False,
    "folding_fraction": False,
    "folding_count": False,
    "sdlogj": False,
    "ice_mean": False,
    "seconds": False,
    "peak_memory_mb": False,
}

# resampled values held in memory at once (resamples x n), about 32 MB of float64
_CHUNK_ELEMENTS = 4_000_000


def _as_float(values) -> np.ndarray:
    """1D float array; ``None`` becomes NaN."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64, copy=False).ravel()
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).ravel()


def _finite_1d(values) -> np.ndarray:
    a = _as_float(values)
    return a[~np.isnan(a)]


def _apply(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    """``statistic`` of each row of ``samples``; uses ``axis=1`` when the callable takes it."""
    try:
        out = np.asarray(statistic(samples, axis=1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.apply_along_axis(statistic, 1, samples).astype(np.float64)


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int | np.random.Generator | None = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap: ``(estimate, low, high)`` of ``statistic`` of ``values``.

    NaN (and ``None``) values are dropped first. The estimate is ``statistic`` of the remaining
    values; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles
    of the statistic over ``n_resamples`` resamples with replacement, drawn all at once (in
    chunks of bounded memory) from ``numpy.random.default_rng(seed)``: resample ``r`` uses the
    ``r``-th block of ``n`` indices of ``rng.integers(0, n, ...)``, so a loop drawing
    ``rng.integers(0, n, size=n)`` per resample gives the same numbers.

    ``statistic`` should accept ``axis=`` (as numpy reductions do); other callables are applied
    row by row. With no values the result is ``(nan, nan, nan)``; with one, ``(v, nan, nan)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    x = _finite_1d(values)
    n = x.size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    estimate = float(_apply(statistic, x[None])[0])
    if n < 2:
        return (estimate, math.nan, math.nan)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    boot = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = _apply(statistic, x[idx])
    alpha = 1.0 - confidence
    low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (estimate, float(low), float(high))


def paired_comparison(
    a,
    b,
    statistic: Callable = np.mean,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> dict:
    """Compare two methods measured on the same pairs (``a[i]`` and ``b[i]`` on pair ``i``).

    Pairs where either value is NaN/None are dropped. Returns a dict with

    - ``n``: pairs used; ``mean_a``, ``mean_b``: means of each over those pairs;
    - ``difference``: ``statistic(a - b)`` (the mean difference by default), with ``low`` and
      ``high``, its percentile-bootstrap interval at ``confidence``;
    - ``p_value``: two-sided Wilcoxon signed-rank test of the differences
      (``scipy.stats.wilcoxon``, zero differences dropped as in its default ``"wilcox"``
      method). It is ``nan`` when fewer than 2 pairs remain (no test is possible) and ``1.0``
      when every difference is exactly zero (the methods agree on every pair: no evidence of a
      difference), and ``nan`` if scipy cannot compute it otherwise.
    """
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: a and b differ in length, {a.size} vs {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    d = a - b
    n = int(d.size)
    est, low, high = bootstrap_ci(d, statistic, n_resamples, confidence, seed)
    if n < 2:
        p = math.nan
    elif not np.any(d != 0):
        p = 1.0
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(_sps.wilcoxon(a, b, alternative="two-sided").pvalue)
        except ValueError:
            p = math.nan
    return {
        "n": n,
        "mean_a": float(a.mean()) if n else math.nan,
        "mean_b": float(b.mean()) if n else math.nan,
        "difference": est,
        "low": low,
        "high": high,
        "confidence": confidence,
        "p_value": p,
        "test": "wilcoxon signed-rank, two-sided",
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def _ok(record: Mapping) -> bool:
    return not record.get("error")


def _value(record: Mapping, metric: str) -> float:
    v = record.get(metric)
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def methods_in(records: Iterable[Mapping]) -> list[str]:
    """Method names in order of first appearance."""
    return list(dict.fromkeys(str(r["method"]) for r in records))


def summarize(
    records: Sequence[Mapping],
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> dict[str, dict[str, dict]]:
    """Mean and bootstrap CI of each metric per method.

    Returns ``{method: {metric: {"mean", "low", "high", "n"}}}``, methods in order of first
    appearance. Failed records (``error`` set) and ``None``/NaN values are ignored; ``n`` counts
    the values used, and a metric without any has ``mean = low = high = nan`` and ``n = 0``.
    """
    out: dict[str, dict[str, dict]] = {}
    for method in methods_in(records):
        rows = [r for r in records if str(r["method"]) == method and _ok(r)]
        out[method] = {}
        for metric in metrics:
            vals = _finite_1d([_value(r, metric) for r in rows])
            mean, low, high = bootstrap_ci(vals, np.mean, n_resamples, confidence, seed)
            out[method][metric] = {"mean": mean, "low": low, "high": high, "n": int(vals.size)}
    return out


def compare(
    records: Sequence[Mapping],
    reference: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> dict:
    """Paired comparison of every method against ``reference`` (default: first method seen).

    For each metric, only pairs that both methods finished (no ``error``) with a value for that
    metric are used, matched by ``record["pair"]``. Returns::

        {"reference": str,
         "comparisons": {method: {metric: paired_comparison(method, reference) + "p_holm"}}}

    where the difference is ``method - reference`` and ``p_holm`` is the Wilcoxon p-value
    adjusted (Holm) over the methods compared on that metric. Raises ``ValueError`` if a
    method has two records for the same pair, or if ``reference`` is not among the methods.
    """
    methods = methods_in(records)
    if not methods:
        return {"reference": reference, "comparisons": {}}
    if reference is None:
        reference = methods[0]
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} not in the records; have {methods}")
    by_method: dict[str, dict[str, Mapping]] = {m: {} for m in methods}
    for r in records:
        m, pair = str(r["method"]), str(r["pair"])
        if pair in by_method[m]:
            raise ValueError(f"method {m!r} has more than one record for pair {pair!r}")
        by_method[m][pair] = r
    ref = {p: r for p, r in by_method[reference].items() if _ok(r)}
    comparisons: dict[str, dict[str, dict]] = {}
    for m in methods:
        if m == reference:
            continue
        mine = {p: r for p, r in by_method[m].items() if _ok(r)}
        pairs = [p for p in mine if p in ref]
        comparisons[m] = {}
        for metric in metrics:
            a = [_value(mine[p], metric) for p in pairs]
            b = [_value(ref[p], metric) for p in pairs]
            res = paired_comparison(a, b, np.mean, n_resamples, confidence, seed)
            res["reference"] = reference
            comparisons[m][metric] = res
    for metric in metrics:
        names = list(comparisons)
        adjusted = holm([comparisons[m][metric]["p_value"] for m in names])
        for m, p in zip(names, adjusted, strict=True):
            comparisons[m][metric]["p_holm"] = p
    return {"reference": reference, "comparisons": comparisons}
