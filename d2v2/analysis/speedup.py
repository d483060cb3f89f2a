"""Time-to-target and speedups: what "data2vec 2.0 is N x faster" means (HARNESS_NOTES, MLPerf).

For one run, the time to reach a target quality is linearly interpolated between the two checkpoints
around the first crossing of the target (respecting ``higher_is_better``: WER falls, accuracy rises).
Two cases are censored, and are kept as bounds rather than made up:

- reached already at the first checkpoint: the time is *at most* that checkpoint's time;
- never reached within the budget: the run did not converge; its time is *more than* its last
  checkpoint's time (MLPerf counts it as infinite).

Over seeds the time is the median (AlgoPerf); censoring turns it into an interval ``[low, high]``
(``low``: censored-below runs at 0 and non-converged runs at their last checkpoint; ``high``:
censored-below runs at their checkpoint and non-converged runs at infinity), exact when the censoring
does not move the median. The speedup of data2vec 2.0 over a baseline is
``time(baseline) / time(data2vec 2.0)``, hence the interval ``[low_b / high_d, high_b / low_d]``: e.g.
data2vec 2.0 not reaching the target gives "speedup < T_baseline / T_budget(data2vec 2.0)", and
reaching it at its first checkpoint gives "speedup >= T_baseline / T_first(data2vec 2.0)".

The target of a baseline is, by default, its own final quality at the full budget (median over seeds),
or a configured value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from d2v2.analysis.stats import bootstrap_ratio_ci, median, olympic_mean

__all__ = [
    "REACHED", "AT_MOST", "NOT_REACHED", "CLOCKS", "TimeToTarget", "AggregateTime", "Speedup",
    "time_to_target", "aggregate_times", "speedup", "is_default_variant", "targets", "speedup_table",
]

REACHED, AT_MOST, NOT_REACHED = "reached", "reached at first checkpoint", "not reached"
CLOCKS = {"train_time_s": "train-only seconds", "e2e_time_s": "end-to-end seconds",
          "device_hours": "device-hours"}
REFERENCE_METHOD = "data2vec2"


@dataclass(frozen=True)
class TimeToTarget:
    """One run's time to target; ``time`` is exact (reached), an upper bound (at most) or the last
    checkpoint's time that the run went past without reaching the target (not reached)."""

    time: float
    status: str

    @property
    def low(self) -> float:
        return {REACHED: self.time, AT_MOST: 0.0, NOT_REACHED: self.time}[self.status]

    @property
    def high(self) -> float:
        return {REACHED: self.time, AT_MOST: self.time, NOT_REACHED: math.inf}[self.status]


def _reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def time_to_target(times: Sequence[float], values: Sequence[float], target: float,
                   higher_is_better: bool) -> TimeToTarget:
    """First time a run's quality curve reaches ``target``, interpolated linearly between checkpoints."""
    t, v = np.asarray(times, dtype=float), np.asarray(values, dtype=float)
    if t.shape != v.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"times and values must be equal-length non-empty 1-D ({t.shape} vs {v.shape})")
    if np.isnan(t).any() or np.isnan(v).any():
        raise ValueError("times/values contain NaN")
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    hits = [i for i in range(t.size) if _reached(v[i], target, higher_is_better)]
    if not hits:
        return TimeToTarget(float(t[-1]), NOT_REACHED)
    i = hits[0]
    if i == 0:
        return TimeToTarget(float(t[0]), AT_MOST)
    frac = (target - v[i - 1]) / (v[i] - v[i - 1])
    return TimeToTarget(float(t[i - 1] + frac * (t[i] - t[i - 1])), REACHED)


@dataclass(frozen=True)
class AggregateTime:
    """Median time to target over seeds as an interval; ``olympic`` is MLPerf's olympic mean."""

    low: float
    high: float
    olympic: float
    n: int

    @property
    def status(self) -> str:
        if math.isinf(self.high):
            return NOT_REACHED
        return REACHED if self.low == self.high else AT_MOST


def aggregate_times(runs: Sequence[TimeToTarget]) -> AggregateTime:
    """Median over seeds (interval under censoring) and olympic mean (non-converged = inf)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    highs = [r.high for r in runs]
    return AggregateTime(median([r.low for r in runs]), median(highs), olympic_mean(highs), len(runs))


@dataclass(frozen=True)
class Speedup:
    """The speedup lies in ``[low, high]`` (0 and inf mean unbounded); ``ci`` is a bootstrap CI over
    seeds of the reported value or bound."""

    low: float
    high: float
    ci: tuple[float, float]

    @property
    def relation(self) -> str:
        """``=`` exact, ``>=`` lower bound, ``<=`` upper bound, ``in`` both, ``?`` unbounded both ways."""
        if self.low == self.high:
            return "="
        if self.low == 0 and math.isinf(self.high):
            return "?"
        if math.isinf(self.high):
            return ">="
        return "<=" if self.low == 0 else "in"

    @property
    def value(self) -> float:
        """The number to print next to :attr:`relation` (NaN for ``in`` and ``?``)."""
        return {"=": self.low, ">=": self.low, "<=": self.high}.get(self.relation, math.nan)

    def describe(self) -> str:
        rel = self.relation
        if rel == "?":
            return "undetermined"
        if rel == "in":
            return f"{self.low:.2f}x-{self.high:.2f}x"
        prefix = {"=": "", ">=": ">= ", "<=": "<= "}[rel]
        text = f"{prefix}{self.value:.2f}x"
        if not any(math.isnan(c) for c in self.ci):
            text += f" [{_fmt_ratio(self.ci[0])}, {_fmt_ratio(self.ci[1])}]"
        return text


def _fmt_ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _div(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.divide(a, b))


def speedup(baseline: Sequence[TimeToTarget], reference: Sequence[TimeToTarget], n_boot: int = 10_000,
            seed: int = 0) -> Speedup:
    """Speedup of ``reference`` (data2vec 2.0) over ``baseline``: median time ratio, as an interval."""
    b, r = aggregate_times(baseline), aggregate_times(reference)
    low, high = _div(b.low, r.high), _div(b.high, r.low)
    result = Speedup(low, high, (math.nan, math.nan))
    # CI of the number reported: exact values use MLPerf's inf convention, bounds their own substitutes.
    sides = {"=": ("high", "high"), ">=": ("low", "high"), "<=": ("high", "low")}.get(result.relation)
    if sides is None:
        return result
    num = [getattr(x, sides[0]) for x in baseline]
    den = [getattr(x, sides[1]) for x in reference]
    return Speedup(low, high, bootstrap_ratio_ci(num, den, n_boot=n_boot, seed=seed))


def is_default_variant(params: Mapping | str | None) -> bool:
    """A run with no ablation parameters is the method's default variant."""
    if isinstance(params, str):
        return params in ("", "{}")
    return not params


def _final_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's evaluation at its largest budget fraction."""
    idx = runs.groupby("seed")["budget_fraction"].idxmax()
    return runs.loc[idx]


def targets(evals: pd.DataFrame, configured: Mapping[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Target per (modality, task, baseline): configured, or the baseline's final quality (median over
    seeds at its largest budget fraction, normally 1.0) for its default variant."""
    configured = dict(configured or {})
    rows = []
    base = evals[(evals["method"] != REFERENCE_METHOD) & evals["params"].map(is_default_variant)]
    for (modality, task, method), runs in base.groupby(["modality", "task", "method"], sort=True):
        final = _final_rows(runs)
        key = (modality, method)
        rows.append({
            "modality": modality, "task": task, "baseline": method,
            "primary_metric": runs["primary_metric"].iloc[0],
            "higher_is_better": bool(runs["higher_is_better"].iloc[0]),
            "target": float(configured[key]) if key in configured else median(final["value"]),
            "target_source": "configured" if key in configured else
            f"baseline final (median of {len(final)} seed(s) at budget fraction "
            f"{final['budget_fraction'].max():g})",
        })
    unknown = set(configured) - {(r["modality"], r["baseline"]) for r in rows}
    if unknown:
        raise ValueError(f"configured targets for runs not in the table: {sorted(unknown)}")
    return pd.DataFrame(rows)


def run_times(runs: pd.DataFrame, target: float, higher_is_better: bool, clock: str) -> list[TimeToTarget]:
    """Time to target of every seed of one (method, variant) curve, on ``clock``."""
    return [time_to_target(r[clock].to_numpy(), r["value"].to_numpy(), target, higher_is_better)
            for _, r in runs.groupby("seed", sort=True)]


def speedup_table(evals: pd.DataFrame, target_table: pd.DataFrame, clocks: Iterable[str] = CLOCKS,
                  n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One row per (target, data2vec 2.0 variant, clock): both methods' times and the speedup."""
    rows = []
    for t in target_table.itertuples(index=False):
        same_task = evals[(evals["modality"] == t.modality) & (evals["task"] == t.task)]
        base = same_task[(same_task["method"] == t.baseline) & same_task["params"].map(is_default_variant)]
        ref_all = same_task[same_task["method"] == REFERENCE_METHOD]
        for variant, ref in ref_all.groupby("variant", sort=True):
            for clock in clocks:
                tb = run_times(base, t.target, t.higher_is_better, clock)
                tr = run_times(ref, t.target, t.higher_is_better, clock)
                ab, ar, s = aggregate_times(tb), aggregate_times(tr), speedup(tb, tr, n_boot, seed)
                rows.append({
                    "modality": t.modality, "task": t.task, "baseline": t.baseline,
                    "variant": variant, "default_variant": is_default_variant(ref["params"].iloc[0]),
                    "clock": clock, "primary_metric": t.primary_metric, "target": t.target,
                    "target_source": t.target_source,
                    "baseline_time_low": ab.low, "baseline_time_high": ab.high,
                    "baseline_olympic": ab.olympic, "baseline_status": ab.status, "baseline_seeds": ab.n,
                    "d2v2_time_low": ar.low, "d2v2_time_high": ar.high, "d2v2_olympic": ar.olympic,
                    "d2v2_status": ar.status, "d2v2_seeds": ar.n,
                    "speedup_low": s.low, "speedup_high": s.high, "relation": s.relation,
                    "speedup": s.value, "ci_low": s.ci[0], "ci_high": s.ci[1], "speedup_text": s.describe(),
                })
    return pd.DataFrame(rows)
