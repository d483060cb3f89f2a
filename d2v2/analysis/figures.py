"""Figures (matplotlib Agg + seaborn style, PNG and SVG, written atomically).

- ``curves_<modality>``: fine-tuned primary metric vs pretraining time for every method (default
  variants): median over seeds per checkpoint, a 95% bootstrap band over seeds, one marker per
  checkpoint; the baselines' targets as dotted lines (the paper's efficiency figure, METHOD.md#paper-results);
- ``speedups``: measured speedups of data2vec 2.0 with CIs and bounds, beside the paper's claims and
  the speedups its efficiency figure implies;
- ``ablation_<modality>_<method>_<param>``: final metric vs an ablated parameter (e.g. M, decoder
  depth), and ``ablation_<modality>_<method>_curves``: metric vs time per variant;
- ``training_<modality>``: pretraining health per run: loss and the logged diagnostics (target and
  prediction std, the targets' position share) vs pretraining time, from the ``progress`` table;
- ``paper_efficiency``: the paper's efficiency figure redrawn from ``results/paper``.

Every function returns ``[(png_path, caption), ...]``; captions name the clock, device and seeds.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from d2v2.analysis.collect import ablated_fields  # noqa: E402
from d2v2.analysis.paper import METHOD_NAMES  # noqa: E402
from d2v2.analysis.speedup import CLOCKS, PROTOCOLS, is_default_variant  # noqa: E402
from d2v2.analysis.stats import bootstrap_ci  # noqa: E402
from d2v2.atomic import atomic_write  # noqa: E402

__all__ = ["save", "curve_summary", "plot_curves", "plot_speedups", "plot_ablations", "plot_training",
           "plot_paper_efficiency"]

Figure = tuple[Path, str]


def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _color(method: str):
    """The same colour for a method in every figure: the paper's methods get the first colours, any other
    method one of the rest (fixed by its name)."""
    known = list(METHOD_NAMES)
    palette = sns.color_palette("colorblind", 10)
    if method in known:
        return palette[known.index(method)]
    return palette[len(known) + zlib.crc32(method.encode()) % (len(palette) - len(known))]


def _seeds(runs) -> str:
    n = runs["seed"].nunique()
    return f"{n} seed" if n == 1 else f"{n} seeds"


def save(fig: plt.Figure, out_dir: str | Path, name: str) -> Path:
    """Write ``name.png`` and ``name.svg`` atomically; return the PNG path."""
    out_dir = Path(out_dir)
    for ext in ("png", "svg"):
        with atomic_write(out_dir / f"{name}.{ext}", "wb") as f:
            fig.savefig(f, format=ext, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out_dir / f"{name}.png"


def _hardware(df: pd.DataFrame) -> str:
    devices = ", ".join(sorted(df["device_name"].astype(str).unique()))
    counts = "/".join(str(c) for c in sorted(df["prov_device_count"].unique()))
    return f"{devices} x{counts}"


def curve_summary(runs: pd.DataFrame, clock: str, seed: int = 0) -> pd.DataFrame:
    """Per budget fraction: median time and median metric over seeds, with a bootstrap CI of the latter."""
    rows = []
    for fraction, g in runs.groupby("budget_fraction", sort=True):
        lo, hi = bootstrap_ci(g["value"].to_numpy(), seed=seed, n_boot=2000)
        rows.append({"budget_fraction": fraction, "time": g[clock].median(), "value": g["value"].median(),
                     "ci_low": lo, "ci_high": hi, "seeds": g["seed"].nunique()})
    return pd.DataFrame(rows)


def _draw_curve(ax, runs: pd.DataFrame, clock: str, label: str, color) -> None:
    s = curve_summary(runs, clock)
    ax.plot(s["time"], s["value"], marker="o", color=color, label=label)
    if s["ci_low"].notna().any():
        ax.fill_between(s["time"], s["ci_low"], s["ci_high"], color=color, alpha=0.2, linewidth=0)


def _better(df: pd.DataFrame) -> str:
    return "higher" if df["higher_is_better"].iloc[0] else "lower"


def _random_init_line(ax, random_init: pd.DataFrame | None, modality: str, task: str) -> bool:
    """Fine-tuning from random initialisation, the median over its seeds, as a dash-dotted line; whether there
    was one to draw."""
    if random_init is None:
        return False
    rand = random_init[(random_init.modality == modality) & (random_init.task == task)]
    if rand.empty:
        return False
    ax.axhline(rand["value"].median(), ls="-.", color="black", lw=1, label=f"random init ({_seeds(rand)})")
    return True


def plot_curves(evals: pd.DataFrame, out_dir: str | Path, clock: str = "train_time_s",
                target_table: pd.DataFrame | None = None, random_init: pd.DataFrame | None = None,
                protocol: str = "anytime") -> list[Figure]:
    """Metric vs pretraining time per modality and task, every method's default variant; fine-tuning
    from random initialisation (if given) as a dash-dotted line. ``evals`` holds the points of one
    ``protocol`` (d2v2.analysis.speedup.protocol_points), named in the title, caption and file name
    (``curves_<modality>_<task>`` for anytime, ``..._sweep`` for a budget sweep)."""
    sns.set_theme(style="whitegrid")
    figures = []
    default = evals[evals["params"].map(is_default_variant)]
    for (modality, task), df in default.groupby(["modality", "task"], sort=True):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, runs in df.groupby("method", sort=True):
            _draw_curve(ax, runs, clock, f"{_name(method)} ({_seeds(runs)})", _color(method))
        if target_table is not None:
            for t in target_table[(target_table.modality == modality) & (target_table.task == task)].itertuples():
                ax.axhline(t.target, ls=":", color=_color(t.baseline), lw=1)
        _random_init_line(ax, random_init, modality, task)
        metric = df["primary_metric"].iloc[0]
        ax.set(xlabel=f"pretraining time ({CLOCKS[clock]}, clock '{clock}')",
               ylabel=f"{metric} ({_better(df)} is better)", title=f"{modality} / {task} ({protocol})")
        _legend_outside(ax)
        seeds = df.groupby("method")["seed"].nunique()
        caption = (f"{modality} / {task}: fine-tuned {metric} vs pretraining time on the {clock} clock "
                   f"({CLOCKS[clock]}); protocol {PROTOCOLS[protocol]}; device {_hardware(df)}; preset {', '.join(map(str, df['preset'].unique()))}; "
                   f"median over seeds ({', '.join(f'{_name(m)}: {n}' for m, n in seeds.items())}), "
                   "band = 95% bootstrap CI over seeds (none with one seed), one marker per point; "
                   "dotted lines: each baseline's target (its final quality); dash-dotted: fine-tuned from random "
                   "initialisation (if run).")
        suffix = "" if protocol == "anytime" else f"_{protocol}"
        figures.append((save(fig, out_dir, f"curves_{modality}_{task}{suffix}"), caption))
    return figures


def plot_speedups(speedups: pd.DataFrame, implied: pd.DataFrame, claims: pd.DataFrame,
                  out_dir: str | Path, clock: str = "train_time_s") -> list[Figure]:
    """Dot chart: measured speedups (CI bars, bound arrows, intervals; a note on a row without a point) with the
    paper's claimed and implied values."""
    sns.set_theme(style="whitegrid")
    ours = speedups[(speedups["clock"] == clock) & speedups["default_variant"]]
    keys = sorted({(r.modality, r.baseline) for df in (ours, implied, claims) for r in df.itertuples()})
    if not keys:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(keys) + 1.4))
    markers = {"=": "o", ">=": ">", "<=": "<"}
    finite = [v for df, col in ((ours, "speedup"), (ours, "speedup_low"), (ours, "speedup_high"), (ours, "ci_low"),
                                (ours, "ci_high"), (implied, "speedup"), (claims, "speedup"))
              for v in df[col] if np.isfinite(v) and v > 0] + [1.0]
    right = max(finite) * 2

    notes = []

    def note(y: int, text: str, color: str) -> None:        # at the left edge, where no paper value lies
        notes.append(ax.text(0.01, y, text, transform=ax.get_yaxis_transform(), va="center", fontsize=7, color=color))

    for y, (modality, baseline) in enumerate(keys):
        measured = ours[(ours.modality == modality) & (ours.baseline == baseline)]
        if measured.empty:
            note(y, "not run here", "grey")
        for r in measured.itertuples():
            if r.relation in markers:
                ax.plot(r.speedup, y, markers[r.relation], color="C0", ms=8)
            elif r.relation == "in":             # bounded on both sides without one value: the interval itself
                ax.hlines(y, r.speedup_low, r.speedup_high, color="C0", lw=6, alpha=0.35)
            else:                                # "?": neither method's time is bounded
                note(y, "undetermined", "C0")
            if not math.isnan(r.ci_low):
                ax.hlines(y, max(r.ci_low, 1e-3), min(r.ci_high, right), color="C0", lw=2)
                if math.isinf(r.ci_high):
                    ax.plot(right, y, ">", color="C0", ms=5)
        for r in implied[(implied.modality == modality) & (implied.baseline == baseline)].itertuples():
            if r.relation in markers:
                ax.plot(r.speedup, y + 0.18, markers[r.relation] if r.relation != "=" else "D", color="grey", ms=5)
        for r in claims[(claims.modality == modality) & (claims.baseline == baseline)].itertuples():
            ax.plot(r.speedup, y - 0.18, "X", color="C3", ms=8)
    ax.plot([], [], "o", color="C0", label="measured here, 95% CI (> lower / < upper bound)")
    if (ours["relation"] == "in").any():
        ax.plot([], [], "-", color="C0", lw=6, alpha=0.35, label="measured here: lies in this interval")
    ax.plot([], [], "D", color="grey", label="implied by the paper's figure points")
    ax.plot([], [], "X", color="C3", label="paper's claim")
    _legend_outside(ax)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(finite) / (4 if notes else 2), right * 1.2)          # notes end left of 1x
    ax.set_ylim(-0.6, len(keys) - 0.4)
    ax.set_yticks(range(len(keys)), [f"{m}: vs {_name(b)}" for m, b in keys])
    ax.set(xlabel=f"speedup of data2vec 2.0 (time to baseline's target, clock '{clock}')",
           title="data2vec 2.0 speedups: measured vs paper")
    protocols = ", ".join(sorted(set(ours["protocol"]))) if "protocol" in ours else "anytime"
    caption = (f"Speedup of data2vec 2.0 = time(baseline) / time(data2vec 2.0) to reach the baseline's target, "
               f"on the {clock} clock ({CLOCKS[clock]}); protocol: {protocols}; bars: 95% bootstrap CI over seeds; '>'/'<' markers "
               "are bounds (target reached at the first checkpoint / not reached within the budget); a shaded bar: "
               "the speedup lies in that interval; 'undetermined': neither method's time is bounded; 'not run here': "
               "no run of this pair. "
               "Paper values are on the paper's hardware and scale (results/paper).")
    return [(save(fig, out_dir, "speedups"), caption)]


def _legend_outside(ax) -> None:
    """The legend right of the axes, so it never covers a data point."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _fmt_param(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _final(runs: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.Series:
    """Per seed (and value of the ``by`` columns), the value at the largest budget fraction."""
    return runs.loc[runs.groupby([*by, "seed"])["budget_fraction"].idxmax(), "value"]


def _param_key(value) -> tuple:
    """Sort key of a parameter value: numbers by size, before anything else."""
    return (0, float(value), "") if pd.api.types.is_number(value) else (1, 0.0, str(value))


def _slice(df: pd.DataFrame, param: str, others: list[str], default: pd.DataFrame) -> pd.DataFrame:
    """The rows where ``param`` varies and every other ablated field is at the default: not set by the row's
    variant, or set to the default variant's recorded value (one field at a time, also through a grid)."""
    rows = df[df[f"param.{param}"].notna()]
    own = rows["params"].map(json.loads)
    keep = pd.Series(True, index=rows.index)
    for other in others:
        keep &= ~own.map(lambda p, o=other: o in p) | (rows[f"param.{other}"] == _recorded(default, other))
    return rows[keep]


def _recorded(default: pd.DataFrame, param: str):
    """The default variant's value of an ablated field, if its runs recorded one (all the same), else None."""
    values = default[f"param.{param}"].dropna().unique() if f"param.{param}" in default else []
    return values[0] if len(values) == 1 and default[f"param.{param}"].notna().all() else None


def _variant_order(df: pd.DataFrame) -> list[str]:
    """The default variant first, then the others by field name and value (M = 2 before M = 16)."""
    params = df.drop_duplicates("variant").set_index("variant")["params"].map(json.loads)
    return sorted(params.index, key=lambda v: (bool(params[v]),
                                               [(k, _param_key(x)) for k, x in sorted(params[v].items())]))


def plot_ablations(evals: pd.DataFrame, out_dir: str | Path, clock: str = "train_time_s",
                   random_init: pd.DataFrame | None = None) -> list[Figure]:
    """Ablations found in the table (variants = identity.params): metric vs each parameter (the median over
    seeds, each seed as a small dot) and vs time. The default variant stands on a parameter's axis where its
    value was recorded (collect's ``param.<name>``), else as a dashed line; fine-tuning from random
    initialisation (if given) is a dash-dotted line in both, the bar a pretraining variant has to clear."""
    sns.set_theme(style="whitegrid")
    figures = []
    for (modality, method, task), df in evals.groupby(["modality", "method", "task"], sort=True):
        is_default = df["params"].map(is_default_variant)
        if is_default.all():
            continue
        metric = df["primary_metric"].iloc[0]
        default = df[is_default]
        params = ablated_fields(df["params"])
        for param in params:
            col = f"param.{param}"
            rows = _slice(df, param, [p for p in params if p != param], default)
            if rows.empty:
                continue
            finals = rows.loc[_final(rows, by=(col,)).index, [col, "value"]]
            summary = (finals.groupby(col)["value"].median().reset_index()
                       .sort_values(col, key=lambda v: v.map(_param_key)))
            labels = [_fmt_param(v) for v in summary[col]]
            fig, ax = plt.subplots(figsize=(5.2, 3.8))
            median, = ax.plot(labels, summary["value"], marker="o")
            ax.plot(finals[col].map(_fmt_param), finals["value"], ls="none", marker=".", ms=5, alpha=0.5,
                    color=median.get_color(), label="one seed")
            value = _recorded(default, param)
            if value is not None and value in set(summary[col]):
                ax.plot([_fmt_param(value)], [_final(default).median()], marker="*", ms=14, ls="none",
                        color="black", label=f"default variant ({param}={_fmt_param(value)})", zorder=3)
                where = "the star"
            elif not default.empty:
                ax.axhline(_final(default).median(), ls="--", color="grey", label="default variant")
                where = "dashed"
            random = _random_init_line(ax, random_init, modality, task)
            _legend_outside(ax)
            ax.set(xlabel=param, ylabel=f"{metric} at the full budget ({_better(df)} is better)",
                   title=f"{modality} / {_name(method)}: {param}")
            caption = (f"{modality} / {_name(method)} ablation of {param}: fine-tuned {metric} at the final "
                       f"checkpoint (median over seeds, dots: each seed) vs {param}"
                       + (f"; {where}: the default variant" if not default.empty else "")
                       + ("; dash-dotted: fine-tuned from random initialisation" if random else "")
                       + f"; device {_hardware(df)}.")
            safe = param.replace(".", "_")
            figures.append((save(fig, out_dir, f"ablation_{modality}_{method}_{safe}"), caption))
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        order = _variant_order(df)
        for color, variant in zip(sns.color_palette("colorblind", len(order)), order):
            runs = df[df["variant"] == variant]
            label = variant
            if runs["params"].map(is_default_variant).all():
                known = [f"{p}={_fmt_param(v)}" for p in params if (v := _recorded(runs, p)) is not None]
                label = f"{variant} ({', '.join(known)})" if known else variant
            _draw_curve(ax, runs, clock, f"{label} ({_seeds(runs)})", color)
        random = _random_init_line(ax, random_init, modality, task)
        ax.set(xlabel=f"pretraining time ({CLOCKS[clock]}, clock '{clock}')",
               ylabel=f"{metric} ({_better(df)} is better)", title=f"{modality} / {_name(method)}: variants")
        _legend_outside(ax)
        caption = (f"{modality} / {_name(method)}: fine-tuned {metric} vs pretraining time ({clock}) per "
                   f"variant; median over seeds with 95% bootstrap band"
                   + ("; dash-dotted: fine-tuned from random initialisation" if random else "")
                   + f"; device {_hardware(df)}.")
        figures.append((save(fig, out_dir, f"ablation_{modality}_{method}_curves"), caption))
    return figures


# Panels of the training-health figures: the loss, then the diagnostics METHOD.md#loss calls the main health
# signals, plus data2vec 2.0's target position share (d2v2.model.targets.position_share).
HEALTH_PANELS = {"loss": "training loss (log scale)", "diag.target_var": "target std (per dim.)",
                 "diag.pred_var": "prediction std (per dim.)",
                 "diag.target_pos_share": "target variance explained by position"}


def plot_training(progress: pd.DataFrame, out_dir: str | Path, clock: str = "train_time_s") -> list[Figure]:
    """Per modality: loss and health diagnostics vs pretraining time, one line per run (method, variant,
    seed), from the ``progress`` table of ``python -m d2v2 collect``."""
    sns.set_theme(style="whitegrid")
    figures = []
    if progress.empty:
        return figures
    for modality, df in progress.groupby("modality", sort=True):
        panels = [c for c in HEALTH_PANELS if c in df and df[c].notna().any()]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
        # colour: the method (as in the curves); line style: the variant
        variants = sorted(df["variant"].unique(), key=lambda v: (v != "default", v))
        styles = {v: ["-", "--", ":", "-."][i % 4] for i, v in enumerate(variants)}
        for ax, column in zip(axes[0], panels):
            named = set()                                  # one legend entry per method and variant, not per seed
            # a run is its folder: a budget sweep's runs share method, variant and seed
            for (method, variant, _, _), run in df.groupby(["method", "variant", "seed", "run_dir"], sort=True):
                run = run[run[column].notna()].sort_values("updates")
                label = _name(method) + ("" if variant == "default" else f" {variant}")
                if not run.empty:
                    ax.plot(run[clock], run[column], color=_color(method), ls=styles[variant],
                            label=None if label in named else label, lw=1.2)
                    named.add(label)
            ax.set(xlabel=f"pretraining time ({CLOCKS[clock]})", title=HEALTH_PANELS[column])
            if column == "loss":
                ax.set_yscale("log")
            elif column == "diag.target_pos_share":
                ax.set_ylim(0, 1)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, 1.08))
        fig.tight_layout()
        caption = (f"{modality}: pretraining health vs time on the {clock} clock ({CLOCKS[clock]}), one line per "
                   f"run ({df['run_dir'].nunique()} runs), one point per logging interval. Loss scales differ "
                   "between methods (each has its own objective). Target/prediction std: per-dimension std "
                   "over masked tokens averaged over dimensions (fairseq's target_var / pred_var; a fall to "
                   "near 0 is a collapse). Position share (data2vec 2.0): the share of the targets' variance "
                   "that position alone explains; near 1, the targets no longer depend on the content.")
        figures.append((save(fig, out_dir, f"training_{modality}"), caption))
    return figures


def plot_paper_efficiency(points: pd.DataFrame, out_dir: str | Path) -> list[Figure]:
    """The paper's efficiency figure (METHOD.md#paper-results) redrawn from its transcribed points."""
    sns.set_theme(style="whitegrid")
    modalities = list(dict.fromkeys(points["modality"]))
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.2 * len(modalities), 3.6))
    for ax, modality in zip(np.atleast_1d(axes), modalities):
        pts = points[points["modality"] == modality]
        for method, g in pts.groupby("method", sort=True):
            ax.plot(g["hours"], g["value"], marker="o", label=_name(method), color=_color(method))
        ax.set(title=modality, xlabel="pretraining hours (paper's hardware)", ylabel=pts["metric"].iloc[0])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22))   # below: off the data
    caption = ("The paper's efficiency figure redrawn from results/paper/efficiency_points.csv (values read "
               "off the plot: about ±0.5 h and ±0.1 points; GPU type not stated).")
    return [(save(fig, out_dir, "paper_efficiency"), caption)]
