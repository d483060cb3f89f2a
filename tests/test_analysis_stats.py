"""Aggregation over seeds, bootstrap CIs, time-to-target and speedups on curves with known answers."""
import math

import numpy as np
import pandas as pd
import pytest

from d2v2.analysis import speedup as sp
from d2v2.analysis.stats import bootstrap_ci, median, olympic_mean

INF = math.inf


def test_median_and_olympic_mean_known_values():
    assert median([3, 1, 2]) == 2
    assert median([1, 2, INF]) == 2            # one non-converged run does not move the median
    assert median([1, INF]) == INF             # half not converged: the median did not converge
    assert olympic_mean([10, 1, 2, 3, 4]) == pytest.approx(3.0)          # drops 1 and 10
    assert olympic_mean([1, 2, 3, 4, INF]) == pytest.approx(3.0)         # one inf is the dropped max
    assert olympic_mean([1, 2, 3, INF, INF]) == INF                      # MLPerf: "not converged"
    assert math.isnan(olympic_mean([1, 2, 3, 4]))                        # too few runs to report it
    with pytest.raises(ValueError, match="NaN"):
        median([1.0, float("nan")])


def test_bootstrap_ci_is_seeded_and_covers_the_truth():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 1.0, size=50)
    lo, hi = bootstrap_ci(x, np.mean, seed=3)
    assert (lo, hi) == bootstrap_ci(x, np.mean, seed=3)
    assert lo < 10.0 < hi and hi - lo < 1.0
    # the percentile interval of the mean is about mean +- 1.96 * sd / sqrt(n)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.08) and hi == pytest.approx(x.mean() + half, abs=0.08)
    assert all(math.isnan(v) for v in bootstrap_ci([5.0]))
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_time_to_target_interpolates_higher_is_better():
    # crosses 0.7 between t=20 (0.6) and t=30 (0.8): 25
    r = sp.time_to_target([10, 20, 30], [0.5, 0.6, 0.8], 0.7, higher_is_better=True)
    assert r.status == sp.REACHED and r.time == pytest.approx(25.0)
    # unsorted input is sorted by time first
    r = sp.time_to_target([30, 10, 20], [0.8, 0.5, 0.6], 0.7, higher_is_better=True)
    assert r.time == pytest.approx(25.0)


def test_time_to_target_lower_is_better_and_first_crossing():
    # WER: 40 -> 30 -> 20, target 25 reached half way between t=2 and t=3
    r = sp.time_to_target([1, 2, 3], [40, 30, 20], 25, higher_is_better=False)
    assert r.status == sp.REACHED and r.time == pytest.approx(2.5)
    # the first crossing counts even if the curve later gets worse again
    r = sp.time_to_target([1, 2, 3, 4], [40, 20, 30, 10], 25, higher_is_better=False)
    assert r.time == pytest.approx(1.75)


def test_time_to_target_censored_cases():
    first = sp.time_to_target([5, 10], [0.9, 0.95], 0.8, higher_is_better=True)
    assert first.status == sp.AT_MOST and first.time == 5 and (first.low, first.high) == (0.0, 5)
    never = sp.time_to_target([5, 10], [0.5, 0.6], 0.8, higher_is_better=True)
    assert never.status == sp.NOT_REACHED and (never.low, never.high) == (10, INF)
    never_wer = sp.time_to_target([5, 10], [30, 26], 25, higher_is_better=False)
    assert never_wer.status == sp.NOT_REACHED


def T(t, status=sp.REACHED):
    return sp.TimeToTarget(t, status)


def test_speedup_exact_and_compare_with_bootstrap_ci():
    s = sp.speedup([T(100), T(110), T(90)], [T(10), T(11), T(9)])
    assert s.relation == "=" and s.value == pytest.approx(10.0)
    # WER (lower is better), target = median final WER = 20: seed 0 reaches it at t=100, seed 1 at
    # 50 + 60 * 10/11 (interpolated), seed 2 never (final 21);
    # data2vec 2.0 seeds cross 20 half way between t=5 and t=15 -> 10 s
    base = [(np.array([50.0, t]), np.array([30.0, w])) for t, w in ((100, 20.0), (110, 19.0), (120, 21.0))]
    ref = [(np.array([5.0, 15.0]), np.array([25.0, 15.0]))] * 3
    c = sp.compare(base, ref, higher_is_better=False, n_boot=300)
    assert c.target == pytest.approx(20.0)
    assert [r.status for r in c.baseline] == [sp.REACHED, sp.REACHED, sp.NOT_REACHED]
    expected = (50 + 60 * 10 / 11) / 10
    assert c.speedup.relation == "=" and c.speedup.value == pytest.approx(expected)
    lo, hi = c.speedup.ci
    # resampled targets are re-derived from the resampled baseline seeds, so the CI stays finite
    assert lo <= expected <= hi and math.isfinite(hi)
    assert c.speedup.describe().startswith(f"{expected:.2f}x [")
    assert c == sp.compare(base, ref, higher_is_better=False, n_boot=300)       # seeded
    one = sp.compare(base[:1], ref[:1], higher_is_better=False)
    assert all(math.isnan(v) for v in one.speedup.ci) and one.speedup.describe() == "10.00x"


def test_speedup_bound_when_data2vec2_never_reaches():
    # baseline needs 100 s; data2vec 2.0 did not reach within its 40 s budget: speedup < 100 / 40
    s = sp.speedup([T(100)], [T(40, sp.NOT_REACHED)])
    assert s.relation == "<=" and s.value == pytest.approx(2.5) and s.low == 0
    assert s.describe().startswith("<= 2.50x")


def test_speedup_bound_when_reached_at_first_checkpoint():
    # data2vec 2.0 already at target at its first checkpoint (8 s): speedup >= 100 / 8
    s = sp.speedup([T(100)], [T(8, sp.AT_MOST)])
    assert s.relation == ">=" and s.value == pytest.approx(12.5)
    # both censored from below: no information either way
    assert sp.speedup([T(5, sp.AT_MOST)], [T(8, sp.AT_MOST)]).relation == "?"
    # baseline not converged (configured target), data2vec 2.0 reached: speedup > 50 / 10
    s = sp.speedup([T(50, sp.NOT_REACHED)], [T(10)])
    assert s.relation == ">=" and s.value == pytest.approx(5.0)


def test_median_of_seeds_with_one_non_converged_run_stays_exact():
    agg = sp.aggregate_times([T(10), T(20), T(30, sp.NOT_REACHED)])
    assert agg.status == sp.REACHED and agg.low == agg.high == 20
    agg = sp.aggregate_times([T(10), T(20, sp.NOT_REACHED), T(30, sp.NOT_REACHED)])
    assert agg.status == sp.NOT_REACHED and agg.low == 20


def test_a_median_between_two_seeds_times_is_an_interval_with_a_bootstrap_ci():
    """Of three seeds one reaches the target at 587 s, one does not within its 960.02 s, one reaches it at 960.03 s:
    the median lies between the last two (both bounded: not 'at first checkpoint'), and its speedup is an interval
    that gets a bootstrap CI like an exact one."""
    agg = sp.aggregate_times([T(587), T(960.02, sp.NOT_REACHED), T(960.03)])
    assert agg.status == sp.BETWEEN and (agg.low, agg.high) == (960.02, 960.03)
    assert sp.aggregate_times([T(5, sp.AT_MOST), T(6, sp.AT_MOST), T(9)]).status == sp.AT_MOST     # low 0
    # CER falls; the baseline's final values 0.652 / 0.699 / 0.680 make its target 0.680
    base = [(np.array([240.0, t]), np.array([0.71, v])) for t, v in ((960.0, 0.652), (960.02, 0.699), (960.03, 0.680))]
    ref = [(np.array([240.0, 960.0]), np.array([0.77, v])) for v in (0.639, 0.665, 0.656)]
    c = sp.compare(base, ref, higher_is_better=False, n_boot=300)
    assert c.speedup.relation == "in" and c.speedup.low < c.speedup.high
    lo, hi = c.speedup.ci
    assert lo <= c.speedup.low and c.speedup.high <= hi
    assert c.speedup.describe().startswith(f"{c.speedup.low:.2f}x [")           # the interval is below the rounding
    assert sp.Speedup(1.5, 3.0).describe() == "1.50x-3.00x"


def _curves(method, seeds, times, values_by_seed, task="t", modality="image", params="{}",
            variant="default", hib=True):
    rows = []
    for seed, values in zip(seeds, values_by_seed):
        for f, (t, v) in enumerate(zip(times, values), start=1):
            rows.append({"modality": modality, "task": task, "method": method, "variant": variant,
                         "params": params, "seed": seed, "budget_fraction": f / len(times),
                         "train_time_s": t, "e2e_time_s": t * 1.1, "device_hours": t / 3600,
                         "primary_metric": "accuracy", "higher_is_better": hib, "value": v})
    return rows


def test_speedup_table_uses_baseline_final_median_as_target():
    rows = _curves("mae", [0, 1, 2], [100, 200, 300], [[.5, .6, .70], [.5, .6, .72], [.5, .6, .68]])
    rows += _curves("data2vec2", [0, 1, 2], [10, 20, 30], [[.6, .8, .9]] * 3)
    evals = pd.DataFrame(rows)
    tt = sp.targets(evals)
    assert tt.loc[0, "target"] == pytest.approx(0.70)
    table = sp.speedup_table(evals, tt, clocks=["train_time_s"], n_boot=500)
    row = table.iloc[0]
    # data2vec 2.0 reaches 0.70 at 10 + (0.1/0.2)*10 = 15 s; MAE's median seed at 300 s
    assert row["d2v2_time_low"] == pytest.approx(15.0)
    assert row["baseline_time_high"] == pytest.approx(300.0)
    assert row["relation"] == "=" and row["speedup"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="configured targets"):
        sp.targets(evals, {("speech", "mae"): 1.0})
    assert sp.targets(evals, {("image", "mae"): 0.65}).loc[0, "target_source"] == "configured"


def test_default_target_with_even_seeds_is_reached_by_half_the_baseline():
    assert sp.median_final([0.70, 0.74], higher_is_better=True) == 0.70
    assert sp.median_final([20.0, 24.0], higher_is_better=False) == 24.0          # WER: the worse is higher
    assert sp.median_final([1.0, 3.0, 2.0], higher_is_better=True) == 2.0
    # two baseline seeds end at 0.70 and 0.74: target 0.70, reached by both, so the baseline converges
    base = [(np.array([10.0, 20.0]), np.array([0.6, 0.70])), (np.array([10.0, 20.0]), np.array([0.6, 0.74]))]
    ref = [(np.array([5.0, 10.0]), np.array([0.6, 0.8]))] * 2
    c = sp.compare(base, ref, higher_is_better=True, n_boot=100)
    assert c.target == 0.70 and all(t.status == sp.REACHED for t in c.baseline)
    assert c.speedup.relation == "=" and c.speedup.value == pytest.approx(((20 + 10 + 10 / 1.4) / 2) / 7.5)


def _point(method, scale, fraction, time, value):
    return {"modality": "image", "task": "fmnist", "method": method, "variant": "default", "params": "{}",
            "seed": 0, "budget_scale": scale, "budget_fraction": fraction, "train_time_s": time,
            "primary_metric": "accuracy", "higher_is_better": True, "value": value}


def test_sweep_and_anytime_protocols_give_their_own_points_and_speedups():
    """A budget sweep's point at half the budget is a separate run with a finished schedule: here it fine-tunes
    better (0.70) than the full run's checkpoint at half its schedule (0.60), and the speedups differ."""
    rows = [_point("mae", 1.0, 0.5, 50, 0.60), _point("mae", 1.0, 1.0, 100, 0.80), _point("mae", 0.5, 1.0, 50, 0.70)]
    rows += [_point("data2vec2", 1.0, 0.5, 50, 0.60), _point("data2vec2", 1.0, 1.0, 100, 0.90),
             _point("data2vec2", 0.5, 1.0, 50, 0.85)]
    evals = pd.DataFrame(rows)
    assert sp.protocols_of(evals) == ["sweep", "anytime"]
    assert sp.protocols_of(evals[evals.budget_scale == 1.0]) == ["anytime"]
    sweep = sp.protocol_points(evals, "sweep")
    assert sorted(zip(sweep.method, sweep.budget_fraction, sweep.value)) == [
        ("data2vec2", 0.5, 0.85), ("data2vec2", 1.0, 0.9), ("mae", 0.5, 0.7), ("mae", 1.0, 0.8)]
    assert len(sp.protocol_points(evals, "anytime")) == 4
    tt = sp.targets(evals)
    assert tt.loc[0, "target"] == pytest.approx(0.80)                     # the full run's final quality
    table = sp.speedup_table(evals, tt, clocks=["train_time_s"], n_boot=10).set_index("protocol")
    # sweep: data2vec 2.0 reaches 0.80 at its first point (50 s): at least 100 / 50 = 2x
    assert table.loc["sweep", "relation"] == ">=" and table.loc["sweep", "speedup"] == pytest.approx(2.0)
    # anytime: 50 + 50 * (0.2 / 0.3) s
    assert table.loc["anytime", "relation"] == "="
    assert table.loc["anytime", "speedup"] == pytest.approx(100 / (50 + 50 * 2 / 3))
    with pytest.raises(ValueError, match="protocol 'x' unknown"):
        sp.protocol_points(evals, "x")
