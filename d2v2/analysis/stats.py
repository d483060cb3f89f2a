"""Aggregation over seeds: median, olympic mean, percentile bootstrap confidence intervals.

Rules (PROTOCOL.md#aggregation-and-claims):
- times-to-target of runs that never reach the target are ``inf`` ("not converged"), never a number;
- the **median** (AlgoPerf) is defined for any number of runs and is ``inf`` when half or more of
  them did not converge;
- the **olympic mean** (MLPerf Training) drops the fastest and the slowest run and averages the rest.
  It needs at least :data:`OLYMPIC_MIN_RUNS` runs (MLPerf's smallest required run count is 5; with
  fewer, dropping two runs leaves too little to average) and allows at most one non-converged run,
  which is then the dropped slowest one; with more it is ``inf`` ("not converged");
- confidence intervals are percentile bootstrap intervals over seeds with a fixed seed, so a report is
  reproducible. Their ends use the order statistics just outside the interval (no interpolation), which
  keeps them defined when resampled statistics are infinite.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["OLYMPIC_MIN_RUNS", "median", "olympic_mean", "bootstrap_ci", "percentile_interval"]

OLYMPIC_MIN_RUNS = 5


def _array(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of values, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("values contain NaN; encode a run that did not converge as inf")
    return x


def median(values: Sequence[float]) -> float:
    """Median; ``inf`` entries (non-converged runs) sort last."""
    return float(np.median(_array(values)))


def olympic_mean(values: Sequence[float], min_runs: int = OLYMPIC_MIN_RUNS) -> float:
    """Mean without the smallest and the largest value (MLPerf).

    Returns NaN when there are fewer than ``min_runs`` values (not enough runs to report it) and
    ``inf`` when more than one value is ``inf`` (not converged).
    """
    x = np.sort(_array(values))
    if x.size < max(min_runs, 3):
        return float("nan")
    if np.isinf(x).sum() > 1:
        return float("inf")
    return float(x[1:-1].mean())


def percentile_interval(stats: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics, ends at the order statistics just outside it."""
    alpha = (1.0 - level) / 2.0
    lo = np.percentile(stats, 100 * alpha, method="lower")
    hi = np.percentile(stats, 100 * (1 - alpha), method="higher")
    return float(lo), float(hi)


def _resample(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, x.size, size=(n_boot, x.size))]


def bootstrap_ci(values: Sequence[float], statistic: Callable[..., np.ndarray] = np.median,
                 n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` (called as ``statistic(samples, axis=1)``).

    Fewer than two values give ``(nan, nan)``: one run says nothing about the spread over seeds.
    """
    x = _array(values)
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    return percentile_interval(statistic(_resample(x, n_boot, rng), axis=1), level)
