"""Time-to-target and speedups: what "data2vec 2.0 is N x faster" means (PROTOCOL.md#aggregation-and-claims).

For one run, the time to reach a target quality is linearly interpolated between the two checkpoints
around the first crossing of the target (respecting ``higher_is_better``: WER falls, accuracy rises).
Two cases are censored, and are kept as bounds rather than made up:

- reached already at the first checkpoint: the time is *at most* that checkpoint's time;
- never reached within the budget: the run did not converge; its time is *more than* its last
  checkpoint's time (MLPerf counts it as infinite).

Over seeds the time is the median (AlgoPerf); censoring turns it into an interval ``[low, high]``
(``low``: censored-below runs at 0 and non-converged runs at their last checkpoint; ``high``:
censored-below runs at their checkpoint and non-converged runs at infinity), exact when the censoring
does not move the median (status ``between``: e.g. of three seeds one reached the target at 587 s, one at
960 s and one did not within its 960 s, so the median time lies between the last two). The speedup of
data2vec 2.0 over a baseline is ``time(baseline) / time(data2vec 2.0)``, hence the interval
``[low_b / high_d, high_b / low_d]``: e.g. data2vec 2.0 not reaching the target gives
"speedup < T_baseline / T_budget(data2vec 2.0)", and reaching it at its first checkpoint gives
"speedup >= T_baseline / T_first(data2vec 2.0)".

The target of a baseline is, by default, its own final quality at the full budget: the median over
seeds, where for an even number of seeds the worse of the two middle values is taken, so that at least
half of the baseline's seeds reach it and its median time is finite. Or a configured value.

A run's curve comes from one of two protocols (PROTOCOL.md#protocols): ``sweep``, the paper's, where each
point is the final checkpoint of a separate run whose schedules are fitted to its budget; or ``anytime``,
the checkpoints at budget fractions of one full run, read inside its schedule (not what a smaller budget
buys: the two can differ either way). :func:`protocol_points` gives either view with ``budget_fraction`` =
the share of the modality's budget behind each point; every speedup row names its protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from d2v2.analysis.stats import median, olympic_mean, percentile_interval

__all__ = [
    "REACHED", "AT_MOST", "BETWEEN", "NOT_REACHED", "CLOCKS", "PROTOCOLS", "protocol_points", "protocols_of",
    "TimeToTarget", "AggregateTime", "Speedup", "Comparison",
    "time_to_target", "aggregate_times", "speedup", "median_final", "compare", "is_default_variant", "curves", "targets",
    "speedup_table", "recorded_clocks", "ratio_text",
]

REACHED, AT_MOST, NOT_REACHED = "reached", "reached at first checkpoint", "not reached"
BETWEEN = "reached, median between two seeds' times"          # an aggregate's only: censoring leaves an interval
CLOCKS = {"train_time_s": "train-only seconds", "e2e_time_s": "end-to-end seconds",
          "device_hours": "device-hours", "train_cpu_s": "train-only CPU seconds"}
PROTOCOLS = {"sweep": "budget sweep: the final checkpoints of separate runs, each with its schedules fitted to "
                      "its own budget (the paper's protocol)",
             "anytime": "anytime: checkpoints at budget fractions of one full-budget run, inside its schedule"}
REFERENCE_METHOD = "data2vec2"
TARGET_COLUMNS = ["modality", "task", "baseline", "primary_metric", "higher_is_better", "configured", "target",
                  "target_source"]
SPEEDUP_COLUMNS = [
    "modality", "task", "baseline", "variant", "default_variant", "clock", "protocol", "primary_metric", "target",
    "target_source", "baseline_time_low", "baseline_time_high", "baseline_olympic", "baseline_status",
    "baseline_seeds", "d2v2_time_low", "d2v2_time_high", "d2v2_olympic", "d2v2_status", "d2v2_seeds",
    "d2v2_budget", "speedup_low", "speedup_high", "relation", "speedup", "ci_low", "ci_high", "speedup_text"]


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
        if self.low == self.high:
            return REACHED
        return AT_MOST if self.low == 0 else BETWEEN


def aggregate_times(runs: Sequence[TimeToTarget]) -> AggregateTime:
    """Median over seeds (interval under censoring) and olympic mean (non-converged = inf)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    highs = [r.high for r in runs]
    return AggregateTime(median([r.low for r in runs]), median(highs), olympic_mean(highs), len(runs))


@dataclass(frozen=True)
class Speedup:
    """The speedup lies in ``[low, high]`` (0 and inf mean unbounded); ``ci`` is the 95% bootstrap CI
    over seeds of the reported value or bound (NaN with a single seed per method)."""

    low: float
    high: float
    ci: tuple[float, float] = (math.nan, math.nan)

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
            text = ratio_text(self.low, self.high)
        else:
            text = {"=": "", ">=": ">= ", "<=": "<= "}[rel] + f"{self.value:.2f}x"
        if not any(math.isnan(c) for c in self.ci):
            text += f" [{_fmt_ratio(self.ci[0])}, {_fmt_ratio(self.ci[1])}]"
        return text


def ratio_text(low: float, high: float) -> str:
    """``low``-``high`` as ratios; an interval narrower than the rounding reads as one value."""
    a, b = f"{low:.2f}x", f"{high:.2f}x"
    return a if a == b else f"{a}-{b}"


def _fmt_ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _div(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.divide(a, b))


def speedup(baseline: Sequence[TimeToTarget], reference: Sequence[TimeToTarget]) -> Speedup:
    """Speedup of ``reference`` (data2vec 2.0) over ``baseline``: ratio of median times, as an interval."""
    b, r = aggregate_times(baseline), aggregate_times(reference)
    return Speedup(_div(b.low, r.high), _div(b.high, r.low))


def median_final(values: Sequence[float], higher_is_better: bool) -> float:
    """Median final quality; with an even count, the worse middle value (see module docstring)."""
    return float(np.quantile(np.asarray(values, dtype=float), 0.5, method="lower" if higher_is_better else "higher"))


Curve = tuple[np.ndarray, np.ndarray]   # one seed: (times, values) at its checkpoints, sorted by time


@dataclass(frozen=True)
class Comparison:
    """data2vec 2.0 against one baseline: the target, each seed's time to it, and the speedup."""

    target: float
    baseline: list[TimeToTarget]
    reference: list[TimeToTarget]
    speedup: Speedup


def compare(baseline: Sequence[Curve], reference: Sequence[Curve], higher_is_better: bool,
            target: float | None = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Comparison:
    """Time-to-target speedup of ``reference`` over ``baseline`` with a seeded bootstrap CI over seeds.

    ``target=None`` uses the baseline's final quality (:func:`median_final`). Each bootstrap resample
    draws seeds with replacement within each method and re-derives that target from the resampled
    baseline seeds, since the target is estimated from them too. The CI is of the number reported:
    an exact speedup or an interval gets ``[q_lo(low), q_hi(high)]`` of the resampled intervals, a lower
    bound the quantiles of the resampled lower bounds, an upper bound those of the upper bounds.
    """
    cache: dict[tuple[int, int, float], TimeToTarget] = {}

    def times(group: int, curves: Sequence[Curve], idx, tgt: float) -> list[TimeToTarget]:
        out = []
        for i in idx:
            key = (group, int(i), tgt)
            if key not in cache:
                cache[key] = time_to_target(*curves[i], tgt, higher_is_better)
            out.append(cache[key])
        return out

    def target_of(idx) -> float:
        return target if target is not None else median_final([baseline[i][1][-1] for i in idx], higher_is_better)

    nb, nr = len(baseline), len(reference)
    tgt = target_of(range(nb))
    tb, tr = times(0, baseline, range(nb), tgt), times(1, reference, range(nr), tgt)
    point = speedup(tb, tr)
    if max(nb, nr) < 2 or point.relation == "?":
        return Comparison(tgt, tb, tr, point)
    rng = np.random.default_rng(seed)
    lows, highs = np.empty(n_boot), np.empty(n_boot)
    for k in range(n_boot):
        ib, ir = rng.integers(0, nb, nb), rng.integers(0, nr, nr)
        t = target_of(ib)
        s = speedup(times(0, baseline, ib, t), times(1, reference, ir, t))
        lows[k], highs[k] = s.low, s.high
    if point.relation in ("=", "in"):
        ci = (percentile_interval(lows, level)[0], percentile_interval(highs, level)[1])
    else:
        ci = percentile_interval(lows if point.relation == ">=" else highs, level)
    return Comparison(tgt, tb, tr, Speedup(point.low, point.high, ci))


def _scale(evals: pd.DataFrame) -> pd.Series:
    """Each row's budget scale (tables collected before budget sweeps have none: every run was full)."""
    return evals["budget_scale"] if "budget_scale" in evals else pd.Series(1.0, index=evals.index)


def protocols_of(evals: pd.DataFrame) -> list[str]:
    """The protocols ``evals`` (one modality) supports, the headline first: ``sweep`` where it holds runs
    with a budget below the full one, then ``anytime``."""
    return (["sweep"] if (_scale(evals) < 1.0).any() else []) + ["anytime"]


def protocol_points(evals: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The evaluation points of ``protocol`` with ``budget_fraction`` = the share of the modality's budget
    behind each: ``anytime``, the full runs' checkpoints; ``sweep``, every run's final checkpoint (the
    full run's included), at its budget scale."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' unknown (have {', '.join(PROTOCOLS)})")
    scale = _scale(evals)
    if protocol == "anytime":
        return evals[scale == 1.0]
    final = evals[evals["budget_fraction"] == 1.0]
    return final.assign(budget_fraction=scale[final.index])


def is_default_variant(params: Mapping | str | None) -> bool:
    """A run with no ablation parameters is the method's default variant."""
    if isinstance(params, str):
        return params in ("", "{}")
    return not params


def curves(runs: pd.DataFrame, clock: str) -> list[Curve]:
    """One (times, values) curve per seed of one (method, variant), on ``clock``."""
    out = []
    for _, r in runs.sort_values(clock).groupby("seed", sort=True):
        out.append((r[clock].to_numpy(dtype=float), r["value"].to_numpy(dtype=float)))
    return out


def _baseline_runs(evals: pd.DataFrame, modality: str, task: str, method: str) -> pd.DataFrame:
    return evals[(evals["modality"] == modality) & (evals["task"] == task) & (evals["method"] == method)
                 & evals["params"].map(is_default_variant)]


def targets(evals: pd.DataFrame, configured: Mapping[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Target per (modality, task, baseline): configured, or the baseline's final quality
    (:func:`median_final` of each seed's value at its full run's largest budget fraction, normally 1.0) for
    its default variant."""
    configured = dict(configured or {})
    rows = []
    evals = protocol_points(evals, "anytime")
    base = evals[(evals["method"] != REFERENCE_METHOD) & evals["params"].map(is_default_variant)]
    for (modality, task, method), runs in base.groupby(["modality", "task", "method"], sort=True):
        final = runs.loc[runs.groupby("seed")["budget_fraction"].idxmax()]
        key, hib = (modality, method), bool(runs["higher_is_better"].iloc[0])
        rows.append({
            "modality": modality, "task": task, "baseline": method,
            "primary_metric": runs["primary_metric"].iloc[0],
            "higher_is_better": hib, "configured": key in configured,
            "target": float(configured[key]) if key in configured else median_final(final["value"], hib),
            "target_source": "configured" if key in configured else
            f"baseline's final quality (median of {len(final)} seed(s) at budget fraction "
            f"{final['budget_fraction'].max():g})",
        })
    unknown = set(configured) - {(r["modality"], r["baseline"]) for r in rows}
    if unknown:
        raise ValueError(f"configured targets for runs not in the table: {sorted(unknown)}")
    return pd.DataFrame(rows, columns=TARGET_COLUMNS)


def recorded_clocks(evals: pd.DataFrame) -> list[str]:
    """The clocks of :data:`CLOCKS` that every evaluation point has (older runs lack ``train_cpu_s``)."""
    return [c for c in CLOCKS if c in evals.columns and evals[c].notna().all()]


def speedup_table(evals: pd.DataFrame, target_table: pd.DataFrame, clocks: Iterable[str] | None = None,
                  n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (target, data2vec 2.0 variant, clock, protocol): both methods' times and the speedup
    (every recorded clock unless ``clocks`` is given; every protocol of :func:`protocols_of`)."""
    clocks = recorded_clocks(evals) if clocks is None else clocks
    rows = []
    for t, clock, protocol in ((t, c, p) for t in target_table.itertuples(index=False) for c in clocks
                               for p in protocols_of(evals[evals["modality"] == t.modality])):
        points = protocol_points(evals, protocol)
        base = _baseline_runs(points, t.modality, t.task, t.baseline)
        same_task = points[(points["modality"] == t.modality) & (points["task"] == t.task)]
        for variant, ref in same_task[same_task["method"] == REFERENCE_METHOD].groupby("variant", sort=True):
            c = compare(curves(base, clock), curves(ref, clock), t.higher_is_better,
                        t.target if t.configured else None, n_boot=n_boot, seed=seed)
            ab, ar, s = aggregate_times(c.baseline), aggregate_times(c.reference), c.speedup
            rows.append({
                "modality": t.modality, "task": t.task, "baseline": t.baseline,
                "variant": variant, "default_variant": is_default_variant(ref["params"].iloc[0]),
                "clock": clock, "protocol": protocol, "primary_metric": t.primary_metric, "target": c.target,
                "target_source": t.target_source,
                "baseline_time_low": ab.low, "baseline_time_high": ab.high,
                "baseline_olympic": ab.olympic, "baseline_status": ab.status, "baseline_seeds": ab.n,
                "d2v2_time_low": ar.low, "d2v2_time_high": ar.high, "d2v2_olympic": ar.olympic,
                "d2v2_status": ar.status, "d2v2_seeds": ar.n,
                "d2v2_budget": float(np.median([cv[0][-1] for cv in curves(ref, clock)])),
                "speedup_low": s.low, "speedup_high": s.high, "relation": s.relation,
                "speedup": s.value, "ci_low": s.ci[0], "ci_high": s.ci[1], "speedup_text": s.describe(),
            })
    return pd.DataFrame(rows, columns=SPEEDUP_COLUMNS)
