"""The report: Markdown and a self-contained HTML page (``python -m d2v2 report``).

Reads the tables written by :mod:`d2v2.analysis.collect`, computes targets and speedups
(:mod:`d2v2.analysis.speedup`), draws the figures (:mod:`d2v2.analysis.figures`), and writes

- ``OUT/report.md`` (figures linked from ``OUT/figures/``) and ``OUT/report.html`` (figures embedded
  as base64 PNG, inline CSS: one file that opens anywhere);
- ``OUT/derived/{targets,speedups,final_quality,scorecard,paper_implied,protocol_gap}.csv``: every number the
  report prints, so it can be checked against the tables.

Nothing in the report is typed in by hand: each number comes from the tables or ``results/paper``.
The report is a list of blocks (heading, paragraph, list, table, figure, code) rendered twice, once
as Markdown and once as HTML, so the two always say the same thing.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from d2v2.analysis import figures, paper
from d2v2.analysis.collect import ablated_fields, write_table
from d2v2.analysis.paper import METHOD_NAMES
from d2v2.analysis.speedup import (AT_MOST, CLOCKS, NOT_REACHED, PROTOCOLS, protocol_points, protocols_of,
                                   ratio_text, recorded_clocks, speedup_table, targets)
from d2v2.analysis.stats import OLYMPIC_MIN_RUNS, bootstrap_ci, median, olympic_mean
from d2v2.atomic import atomic_write

__all__ = ["build_report", "render_markdown", "render_html", "main"]


# --- blocks ---------------------------------------------------------------------------------------

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    df: pd.DataFrame


@dataclass
class Figure:
    png: Path
    caption: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Heading | Para | Bullets | Table | Figure | Code


def _cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def render_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            cols = [str(c) for c in b.df.columns]
            rows = [[_cell(v).replace("|", "\\|") for v in r] for r in b.df.itertuples(index=False)]
            out.append("\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                                 + ["| " + " | ".join(r) + " |" for r in rows]))
        elif isinstance(b, Figure):
            out.append(f"![{b.png.stem}]({b.png.relative_to(base).as_posix()})\n\n*{b.caption}*")
        elif isinstance(b, Code):
            out.append(f"```{b.lang}\n{b.text.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f3f3f3}figure{margin:1.5rem 0}img{max-width:100%}figcaption{font-size:.85rem;color:#555}
pre{background:#f6f6f6;padding:.75rem;overflow-x:auto;font-size:.8rem}"""


def _inline_html(text: str) -> str:
    """Escape, then render Markdown code spans (the only inline markup the report uses)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(str(c))}</th>" for c in b.df.columns)
            body = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in r) + "</tr>"
                           for r in b.df.itertuples(index=False))
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{esc(b.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{esc(b.text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out)


# --- content ---------------------------------------------------------------------------------------

def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _hours(x: float, clock: str) -> str:
    if math.isinf(x):
        return "inf"
    return f"{x:.4g} " + {"device_hours": "h", "train_cpu_s": "CPU-s"}.get(clock, "s")


# The paper's ablation tables (results/paper/) by the method field they vary.
PAPER_ABLATIONS = {"num_masks": "ablation_multimask", "mask_width": "ablation_block_width",
                   "inverse_mask": "ablation_block_width"}

# final_quality's columns that describe a pretraining run: none for a random initialisation (its fine-tune builds
# the shared backbone through one method's model, whose name would read as if that method were pretrained)
PRETRAINING_COLUMNS = ["method", "variant", "budget_fraction", "train_time_s", "device_hours"]


def final_quality(evals: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (modality, task, method, variant): the primary metric at each seed's largest budget fraction."""
    rows = []
    for (modality, task, method, variant), g in evals.groupby(["modality", "task", "method", "variant"]):
        final = g.loc[g.groupby("seed")["budget_fraction"].idxmax()]
        v = final["value"].to_numpy()
        lo, hi = bootstrap_ci(v, seed=seed, n_boot=2000)
        rows.append({"modality": modality, "task": task, "method": method, "variant": variant,
                     "metric": g["primary_metric"].iloc[0], "seeds": len(v), "median": median(v),
                     "ci_low": lo, "ci_high": hi, f"olympic_mean (>= {OLYMPIC_MIN_RUNS} seeds)": olympic_mean(v),
                     "budget_fraction": final["budget_fraction"].max(),
                     "train_time_s": final["train_time_s"].median(), "device_hours": final["device_hours"].median()})
    return pd.DataFrame(rows)


def protocol_gap(evals: pd.DataFrame) -> pd.DataFrame:
    """Where both protocols have a point at the same share of a modality's budget below the full one: per
    (modality, task, method, variant), the median over seeds of the separate run's final checkpoint (sweep)
    and of the full run's checkpoint at that share (anytime), and how far the anytime point is from it."""
    keys = ["modality", "task", "method", "variant", "share"]
    sweep_points, anytime_points = (protocol_points(evals, p).assign(share=lambda d: d["budget_fraction"].round(3))
                                    for p in ("sweep", "anytime"))
    anytime = dict(list(anytime_points.groupby(keys)))
    rows = []
    for key, sweep in sweep_points[sweep_points["share"] < 1].groupby(keys):
        if key not in anytime:
            continue
        s, a = median(sweep["value"].to_numpy()), median(anytime[key]["value"].to_numpy())
        better = sweep["higher_is_better"].iloc[0]
        rows.append({**dict(zip([*keys[:-1], "budget_fraction"], key)), "metric": sweep["primary_metric"].iloc[0],
                     "seeds (sweep / anytime)": f"{len(sweep)} / {len(anytime[key])}", "sweep": s, "anytime": a,
                     "anytime - sweep": a - s,
                     "anytime looks": "the same" if a == s else "better" if (a > s) == better else "worse"})
    return pd.DataFrame(rows)


def headline(speedups: pd.DataFrame, evals: pd.DataFrame, clock: str) -> pd.DataFrame:
    """The speedups the report leads with: default variants on ``clock``, per modality on its headline
    protocol (the budget sweep where there is one, :func:`d2v2.analysis.speedup.protocols_of`)."""
    rows = speedups[(speedups["clock"] == clock) & speedups["default_variant"]]
    first = {m: protocols_of(g)[0] for m, g in evals.groupby("modality")}
    return rows[np.array([first.get(m) == p for m, p in zip(rows["modality"], rows["protocol"])], dtype=bool)]


def _protocol_points(evals: pd.DataFrame, modality: str, protocol: str) -> list[float]:
    """Where ``protocol`` puts a modality's points: the sweep's budget scales, or one run's checkpoint fractions."""
    g = evals[evals["modality"] == modality]
    return sorted(set(g["budget_scale" if protocol == "sweep" else "budget_fraction"]))


def _protocol_words(evals: pd.DataFrame, modality: str, protocol: str) -> str:
    points = _protocol_points(evals, modality, protocol)
    listed = ", ".join(f"{x:g}" for x in points)
    if protocol == "sweep":
        return f"budget sweep of {len(points)} runs per method ({listed} of the budget)"
    return f"checkpoints at {listed} of one run's budget"


def _points(evals: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The points of ``protocol`` of every modality that has it."""
    have = [m for m in evals["modality"].unique() if protocol in protocols_of(evals[evals["modality"] == m])]
    return protocol_points(evals[evals["modality"].isin(have)], protocol)


def claim_sentence(r, evals: pd.DataFrame, clock: str) -> str:
    """One line in plain words for a headline speedup row: what was shown, with protocol, scale and seeds."""
    b, metric = _name(r.baseline), r.primary_metric.removeprefix("test_")
    where = (f"{_protocol_words(evals, r.modality, r.protocol)}; clock {clock}; preset "
             f"{', '.join(map(str, evals[evals.modality == r.modality]['preset'].unique()))}; "
             f"{r.d2v2_seeds} / {r.baseline_seeds} seed(s)")
    target = f"{b}'s final {metric} ({r.target:.3g})"
    if r.d2v2_status == NOT_REACHED:
        return (f"{r.modality} vs {b}: not shown at this scale: data2vec 2.0 did not reach {target} within "
                f"{_hours(r.d2v2_budget, clock)} ({where}).")
    if r.relation in ("=", "in"):
        return (f"{r.modality} vs {b}: {_verdict(r)}: data2vec 2.0 reached {target} in "
                f"{_median_time(r.d2v2_time_low, r.d2v2_time_high, clock)}, {b} in "
                f"{_median_time(r.baseline_time_low, r.baseline_time_high, clock)} ({where}; "
                f"data2vec 2.0 vs {b}: {r.speedup_text}).")
    if r.relation == ">=":
        return (f"{r.modality} vs {b}: at least {r.speedup:.2f}x faster: data2vec 2.0 reached {target} already "
                f"at its first point ({_hours(r.d2v2_time_high, clock)}), so only a lower bound ({where}).")
    if r.relation == "<=":
        return (f"{r.modality} vs {b}: at most {r.speedup:.2f}x: {b} reached its own target only as a bound "
                f"({r.baseline_status}) ({where}; data2vec 2.0 vs {b}: {r.speedup_text}).")
    if r.baseline_status == r.d2v2_status == AT_MOST:
        first = "only" if len(_protocol_points(evals, r.modality, r.protocol)) == 1 else "first"
        return (f"{r.modality} vs {b}: undetermined at this scale: both reached {target} already at their {first} "
                f"point (data2vec 2.0 at {_hours(r.d2v2_time_high, clock)}, {b} at "
                f"{_hours(r.baseline_time_high, clock)}), so these points cannot tell which got there first ({where}).")
    return (f"{r.modality} vs {b}: undetermined: {b} {r.baseline_status}, data2vec 2.0 {r.d2v2_status}, so "
            f"neither time is bounded on both sides ({where}).")


def _median_time(low: float, high: float, clock: str) -> str:
    """A median time over seeds: exact, or the interval censoring leaves it in."""
    a, b = _hours(low, clock), _hours(high, clock)
    return b if a == b else f"between {a} and {b}"


def _verdict(r) -> str:
    """Whether a speedup bounded on both sides (exact, or an interval where censoring leaves a median time between
    two seeds' times) shows the claim: only where its 95% bootstrap CI over seeds lies above 1x; a faster median
    whose interval reaches 1x, or that has no interval (one seed per method), is not established."""
    low, high = r.speedup_low, r.speedup_high
    if high < 1:
        return f"not shown: data2vec 2.0 was {ratio_text(1 / high, 1 / low)} slower"
    if low <= 1:
        return "equal time" if low == high else f"not shown: {ratio_text(low, high)}, which contains 1x (equal time)"
    if math.isnan(r.ci_low):
        return f"not established: {ratio_text(low, high)} faster, but with one seed per method there is no interval"
    if r.ci_low <= 1:
        return f"not established: {ratio_text(low, high)} faster in the medians, but the 95% CI over seeds reaches 1x"
    return f"shown: {ratio_text(low, high)} faster"


def random_init_sentence(quality: pd.DataFrame, ref: pd.Series, higher_is_better: bool) -> str:
    """One line in plain words for one (modality, task): which methods' full-budget runs (default variants, rows of
    :func:`final_quality`) fine-tuned better than from random initialisation (``ref``, its row of
    :func:`final_quality`), which did not; a speedup between methods that all stay at or below random init says
    nothing about the claim."""
    rows = quality.sort_values("median", ascending=not higher_is_better)
    beat = (rows["median"] > ref["median"]) if higher_is_better else (rows["median"] < ref["median"])
    words = lambda rs: ", ".join(f"{_name(r.method)} {r.median:.3g}" for r in rs.itertuples())
    paid, missed = rows[beat], rows[~beat]
    verdict = (f"pretraining paid for every method ({words(paid)})" if missed.empty else
               f"pretraining paid for no method ({words(missed)}), so a speedup between them is no test of the "
               "claim here" if paid.empty else f"pretraining paid for {words(paid)}, not for {words(missed)}")
    return (f"{ref['modality']} ({ref['task']}, {ref['metric'].removeprefix('test_')}, "
            f"{'higher' if higher_is_better else 'lower'} is better; random init {ref['median']:.3g}): {verdict}; "
            f"medians of {' / '.join(map(str, rows['seeds']))} seed(s), random init {ref['seeds']}.")


def scorecard(speedups: pd.DataFrame, implied: pd.DataFrame, claims: pd.DataFrame, evals: pd.DataFrame,
              clock: str) -> pd.DataFrame:
    """Each paper claim (and each comparison the paper's figure implies) beside what this run measured
    (on the headline protocol: the budget sweep where there is one)."""
    ours = headline(speedups, evals, clock)
    # every comparison the paper's figure implies, plus any baseline run here that the figure lacks
    extra = ours[~ours.set_index(["modality", "baseline"]).index.isin(
        implied.set_index(["modality", "baseline"]).index)][["modality", "baseline"]].drop_duplicates()
    implied = pd.concat([implied, extra.assign(speedup_text="not in the paper's figure")], ignore_index=True)
    rows = []
    for r in implied.itertuples():
        claim = claims[(claims.modality == r.modality) & (claims.baseline == r.baseline)]
        mine = ours[(ours.modality == r.modality) & (ours.baseline == r.baseline)]
        sub = evals[evals.modality == r.modality]
        ours_scale = (f"preset {', '.join(map(str, sub['preset'].unique()))}; "
                      f"{', '.join(map(str, sub['device_name'].unique()))}; clock {clock}") if len(sub) else "–"
        rows.append({
            "modality": r.modality, "data2vec 2.0 vs": _name(r.baseline),
            "paper claim": f"{claim['speedup'].iloc[0]:g}x ({claim['model'].iloc[0]})" if len(claim) else "–",
            "paper figure implies": r.speedup_text,
            "paper scale": paper.PAPER_SCALE.get(r.modality, "–"),
            "measured here": "; ".join(f"{m.speedup_text} on {m.task}" for m in mine.itertuples())
            if len(mine) else "not run here",
            "protocol": ", ".join(sorted(set(mine["protocol"]))) if len(mine) else "–",
            "target reached (baseline / data2vec 2.0)": "; ".join(
                f"{m.baseline_status} / {m.d2v2_status}" for m in mine.itertuples()) if len(mine) else "–",
            "our scale": ours_scale + ("; time includes its inputs (Input costs)" if "inputs_train_time_s" in sub
                                       and (sub[sub.method == r.baseline]["inputs_train_time_s"] > 0).any() else ""),
        })
    return pd.DataFrame(rows)


def _summary(evals: pd.DataFrame, runs: pd.DataFrame, speedups: pd.DataFrame, clock: str, quality: pd.DataFrame,
             random_init: pd.DataFrame) -> list[Block]:
    lines = [claim_sentence(r, evals, clock) for r in headline(speedups, evals, clock).itertuples()]
    blocks: list[Block] = [
        Heading("Summary"),
        Para(f"The claims, one line each (time for data2vec 2.0 to reach each baseline's final quality, on the "
             f"{clock} clock: {CLOCKS[clock]}; protocols: " + "; ".join(PROTOCOLS.values()) + "):"),
        Bullets(lines or ["no baseline with a data2vec 2.0 comparison in the tables"])]
    paid = []
    if not random_init.empty:
        reference = final_quality(random_init).set_index(["modality", "task"], drop=False)
        better = evals.groupby(["modality", "task"])["higher_is_better"].first()
        paid = [random_init_sentence(g, reference.loc[key], bool(better[key]))
                for key, g in quality[quality["variant"] == "default"].groupby(["modality", "task"])
                if key in reference.index]
    if paid:
        blocks += [Para("Did pretraining pay at all? Each method's full-budget run (final checkpoint, default "
                        "variant) against fine-tuning from random initialisation, which every method should beat:"),
                   Bullets(paid)]
    items = []
    for modality, g in evals.groupby("modality"):
        methods = ", ".join(f"{_name(m)} ({', '.join(sorted(v['variant'].unique()))})"
                            for m, v in g.groupby("method"))
        items.append(f"{modality} (task {', '.join(g['task'].unique())}, metric {g['primary_metric'].iloc[0]}): "
                     f"{methods}; seeds {sorted(g['seed'].unique().tolist())}; "
                     + "; ".join(_protocol_words(evals, modality, p) for p in protocols_of(g)) + "; preset "
                     f"{', '.join(map(str, g['preset'].unique()))}; device "
                     f"{', '.join(map(str, g['device_name'].unique()))} x{'/'.join(map(str, g['prov_device_count'].unique()))}")
    blocks += [Para(f"What was run: {len(evals)} fine-tuned evaluation points from {len(runs)} pretraining "
                    "run(s) with summaries. Every method was pretrained under the same budget per modality and "
                    "fine-tuned with the same recipe at each point."), Bullets(items)]
    return blocks


def input_costs(evals: pd.DataFrame) -> pd.DataFrame:
    """Per method whose runs were trained on inputs that cost compute (HuBERT: its k-means labels and first
    iteration), its time without them, theirs, and the total that every comparison uses (medians over seeds
    of the full runs' final checkpoints)."""
    if "inputs_train_time_s" not in evals:            # tables collected before input costs were recorded
        return pd.DataFrame()
    final = protocol_points(evals, "anytime")
    final = final[final["budget_fraction"] == 1.0]
    rows = []
    for (modality, method), g in final.groupby(["modality", "method"], sort=True):
        if not (g["inputs_train_time_s"] > 0).any():
            continue
        for clock in ("train_time_s", "e2e_time_s", "train_cpu_s"):
            if g[clock].isna().any():
                continue
            total, inputs = float(g[clock].median()), float(g[f"inputs_{clock}"].median())
            rows.append({"modality": modality, "method": _name(method), "clock": clock, "without inputs": total - inputs,
                         "inputs": inputs, "total (compared)": total, "inputs share": inputs / total if total else 0.0})
    return pd.DataFrame(rows)


def _provenance(evals: pd.DataFrame) -> list[Block]:
    cols = ["git_commit", "git_dirty", "preset", "device", "device_name", "prov_device_count", "host"]
    prov = evals.groupby(cols, dropna=False).agg(
        evaluations=("source", "size"), slurm_job_ids=("slurm_job_ids", lambda s: ", ".join(
            sorted({j for v in s for j in str(v).split(",") if j})) or "–")).reset_index()
    versions = sorted(set(evals["versions"]))
    return [Heading("Provenance"), Table(prov),
            Para("Package versions (as recorded by each run):"),
            Bullets([", ".join(f"{k} {v}" for k, v in json.loads(s).items()) for s in versions])]


def _caveats(evals: pd.DataFrame, notes: list[str], clock: str, implied: pd.DataFrame) -> list[Block]:
    presets = ", ".join(map(str, evals["preset"].unique()))
    seeds = evals.groupby(["modality", "method", "variant"])["seed"].nunique()
    small = set(evals["preset"].astype(str)) <= {"tiny", "smoke"}
    items = [
        f"Scale: preset {presets}. " + (
            "Models, data and budgets of this preset are far smaller than the paper's (ViT-B on ImageNet, Base "
            "on LibriSpeech 960 h, Base on Books+Wiki): speedups at this scale test the mechanism, not the "
            "paper's numbers." if small else
            "The Configuration section gives the models, data and budgets; compare them with the paper's."),
        "Hardware: the paper timed its runs on its own GPUs (type not stated; its SLURM configs request V100 "
        "32 GB); this run's devices are listed under Provenance. Compare speedups (ratios), not hours.",
        f"Clock: speedups use '{clock}' ({CLOCKS[clock]}); the table of speedups lists every clock. Train-only "
        "time excludes evaluation, checkpoint writing and data preparation; end-to-end includes them.",
        "Data: " + ("the embedded offline data (Fashion-MNIST, synthesised speech, embedded English text and "
                    "sentence tasks) stands in for ImageNet, LibriSpeech and GLUE." if small else
                    "as configured (see Configuration)."),
        "Fine-tuning: one recipe for every method; the model is scored at the end of fine-tuning (not the best "
        "validation checkpoint) and speech is decoded greedily without a language model (the paper: 4-gram LM).",
        ("Baselines: wav2vec 2.0 (the paper's speech claim) runs on the shared speech backbone, cross-checked step "
         "by step against fairseq's." if "wav2vec2" in set(evals["method"]) else
         "Baselines: the paper's speech claim is against wav2vec 2.0, which this configuration does not run (add "
         "wav2vec2 to methods.speech)") + " The paper's efficiency figure implies " + ", ".join(
            f"{r.speedup_text} vs {_name(r.baseline)}" for r in implied[implied.modality == "speech"].itertuples())
        + " for speech.",
        "The paper's efficiency-figure points are read off a plot (about ±0.5 h, ±0.1 points); the implied "
        "speedups carry that error.",
        f"Seeds: {seeds.min()}-{seeds.max()} per configuration; the olympic mean needs at least "
        f"{OLYMPIC_MIN_RUNS} seeds and a CI needs at least 2.",
        "A target equal to the baseline's median final quality is by construction not reached by about half "
        "of the baseline's seeds (counted as not converged); the median is what the speedup uses.",
    ]
    return [Heading("Caveats"), Bullets(items + [f"Collector warning: {n}" for n in notes])]


def build_report(tables: str | Path, out: str | Path, config: str | Path | None = None,
                 clock: str = "train_time_s", configured_targets: dict | None = None,
                 paper_dir: str | Path = paper.PAPER_DIR, n_boot: int = 2000, mode: str = "finetune") -> dict[str, Path]:
    """Everything ``python -m d2v2 report`` does; returns the paths written.

    Only evaluations in ``mode`` (``finetune`` or ``linear_probe``) are compared; fine-tunes from random
    initialisation are shown as reference lines and in their own table, never used for speedups.
    """
    tables, out = Path(tables), Path(out)
    if clock not in CLOCKS:
        raise ValueError(f"--clock: unknown clock '{clock}'; choose one of {', '.join(CLOCKS)}")
    evals_path = tables / "evals.parquet"
    if not evals_path.is_file():
        raise FileNotFoundError(f"{evals_path}: not found (run `python -m d2v2 collect` first)")
    table = pd.read_parquet(evals_path)
    table = table[table["mode"] == mode]
    evals, random_init = table[table["init"] == "pretrained"], table[table["init"] == "random"]
    if evals.empty:
        raise ValueError(f"{evals_path}: no evaluations of pretrained checkpoints in mode '{mode}'")
    if clock not in recorded_clocks(evals):
        raise ValueError(f"--clock: '{clock}' is not recorded for every evaluation in {evals_path} (runs "
                         f"pretrained before it was recorded); choose one of {', '.join(recorded_clocks(evals))}")
    runs_path, progress_path = tables / "runs.parquet", tables / "progress.parquet"
    runs = pd.read_parquet(runs_path) if runs_path.is_file() else pd.DataFrame()
    progress = pd.read_parquet(progress_path) if progress_path.is_file() else pd.DataFrame()
    notes_path = tables / "collect_warnings.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else []
    config_text = None
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config: {config}: not found")
        config_text = Path(config).read_text()

    points, claims = paper.load("efficiency_points", paper_dir), paper.load("claims", paper_dir)
    implied = paper.implied_speedups(paper_dir)
    target_table = targets(evals, configured_targets)
    speedups = speedup_table(evals, target_table, n_boot=n_boot)
    anytime = protocol_points(evals, "anytime")          # the full runs: final quality, ablations
    quality = final_quality(anytime)
    gap = protocol_gap(evals)
    card = scorecard(speedups, implied, claims, evals, clock)
    derived = out / "derived"
    for name, df in (("targets", target_table), ("speedups", speedups), ("final_quality", quality),
                     ("scorecard", card), ("paper_implied", implied), ("protocol_gap", gap)):
        write_table(df, derived, name)

    fig_dir = out / "figures"
    figs = {
        "curves": [f for p, pts in ((p, _points(evals, p)) for p in PROTOCOLS) if not pts.empty
                   for f in figures.plot_curves(pts, fig_dir, clock, target_table, random_init, protocol=p)],
        "speedups": figures.plot_speedups(headline(speedups, evals, clock), implied, claims, fig_dir, clock),
        "ablations": figures.plot_ablations(anytime, fig_dir, clock, random_init),
        "paper": figures.plot_paper_efficiency(points, fig_dir),
        "training": figures.plot_training(progress, fig_dir, clock),
    }

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "data2vec 2.0 reproduction: efficiency report"
    speed_cols = ["modality", "task", "baseline", "variant", "clock", "protocol", "target", "baseline_status",
                  "baseline_time_high", "d2v2_status", "d2v2_time_high", "d2v2_budget", "speedup_text"]
    blocks: list[Block] = [
        Heading(title, 1),
        Para(f"Generated {now} from {tables} by `python -m d2v2 report`. Paper: Baevski et al., Efficient "
             "Self-supervised Learning with Contextualized Target Representations for Vision, Speech and Language "
             "(data2vec 2.0), arXiv:2212.07525. The question: does data2vec 2.0 reach its baselines' fine-tuned "
             "quality in less pretraining time, and by how much (the paper claims " + ", ".join(
                 f"{c.speedup:g}x vs {c.baseline_name}" for c in claims.itertuples()) + ")?"),
        *_summary(evals, runs, speedups, clock, quality, random_init),
        Heading("Scorecard: the paper's claims beside this run"),
        Para("'paper figure implies' applies this report's time-to-target rule to the paper's efficiency-figure "
             "points; 'measured here' is the speedup of data2vec 2.0 (default variant) with its 95% bootstrap CI."),
        Table(card),
        *[Figure(p, c) for p, c in figs["speedups"]],
        Heading("Quality vs pretraining time"),
        *[Figure(p, c) for p, c in figs["curves"]],
        *([Para("The two protocols at the same budgets: the final checkpoint of a separate run with that budget "
                "(sweep) beside the full run's checkpoint after the same share of the budget (anytime), medians "
                "over seeds. 'anytime looks better' means a time to target read off the anytime points "
                "overstates what that budget buys in a run of its own (PROTOCOL.md#protocols)."), Table(gap)]
          if not gap.empty else []),
        Heading("Speedups (all variants and clocks)"),
        Para("Times are medians over seeds (upper ends when censored); 'not reached' = did not reach the target "
             "within the budget (infinite time, MLPerf); 'reached at first checkpoint' = time at most the first "
             "checkpoint's. speedup_text: value or bound with [95% bootstrap CI]."),
        Table(speedups[speed_cols]),
        Heading("Final quality per method"),
        Table(quality),
    ]
    costs = input_costs(evals)
    if not costs.empty:
        blocks += [Heading("Input costs"),
                   Para("Some methods train on inputs that other runs made: HuBERT on k-means labels of MFCCs and "
                        "of its own first iteration (runs/hubert_chain/), WavLM on the same chain's labels. Every "
                        "time in this report, its speedups "
                        "and the scorecard included, is the total: the run's own time plus what made its inputs "
                        "(PROTOCOL.md#input-costs). Final checkpoints of the full runs, medians over seeds:"),
                   Table(costs)]
    if not random_init.empty:
        blocks += [Para("Fine-tuned from random initialisation (no pretraining), the reference every method "
                        "should beat:"), Table(final_quality(random_init).drop(columns=PRETRAINING_COLUMNS))]
    if figs["ablations"]:
        blocks += [Heading("Ablations"), *[Figure(p, c) for p, c in figs["ablations"]]]
        fields = ablated_fields(evals["params"])
        for name in sorted({PAPER_ABLATIONS[f] for f in fields if f in PAPER_ABLATIONS}):
            blocks += [Para(f"The paper's {name.replace('_', ' ')} (results/paper/{name}.csv):"),
                       Table(paper.load(name, paper_dir))]
        if others := [f for f in fields if f not in PAPER_ABLATIONS]:
            blocks += [Para(f"No numbers of the paper to compare with for: {', '.join(others)}.")]
    if not runs.empty:
        keep = [c for c in runs.columns if c in ("run_dir", "status", "train_time_s", "e2e_time_s", "updates",
                                                 "samples", "last_loss", "compute.flops_per_update",
                                                 "compute.achieved_flops_per_s", "compute.mfu",
                                                 "data_wait.share_of_train_time")
                or c.startswith(("identity.", "throughput.samples", "throughput.tokens", "peak_"))]
        blocks += [Heading("Pretraining runs: throughput, compute and memory"),
                   Para("FLOPs per update are counted on each run's first update (matrix products, convolutions "
                        "and attention, forward and backward); achieved FLOP/s and MFU are on the train-only "
                        "clock, MFU against the device's dense bf16 peak (none on a CPU); data_wait is the share "
                        "of train time spent waiting for the data loader."),
                   Table(runs[keep])]
    if figs["training"]:
        blocks += [Heading("Pretraining health"),
                   Para("Loss and the logged diagnostics of every pretraining run, from its events.jsonl "
                        "(results/tables/progress.csv). Read them before the quality curves: a target std "
                        "near 0 means the targets no longer carry the input, and fine-tuning cannot gain from "
                        "such a run; a high target position share means they mostly say where a token is, "
                        "not what it holds (at 0.83 a CPU replay of the gpu preset still pretrained a useful "
                        "start: docs/BENCHMARKS.md, \"Positional targets and the patch projection's init\")."),
                   *[Figure(p, c) for p, c in figs["training"]]]
    blocks += [Heading("The paper's efficiency figure"), *[Figure(p, c) for p, c in figs["paper"]],
               Table(implied)]
    blocks += _provenance(evals)
    blocks += [Heading("Configuration"),
               Code(config_text, "yaml") if config_text else Para("No workflow configuration was given (--config).")]
    blocks += _caveats(evals, notes, clock, implied)

    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    with atomic_write(paths["markdown"], "w") as f:
        f.write(render_markdown(blocks, out))
    with atomic_write(paths["html"], "w") as f:
        f.write(render_html(blocks, title))
    return paths


def _parse_target(text: str) -> tuple[tuple[str, str], float]:
    try:
        key, value = text.split("=", 1)
        modality, method = key.split(":", 1)
        return (modality, method), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target '{text}': expected MODALITY:BASELINE=VALUE") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", required=True, help="folder written by `python -m d2v2 collect`")
    parser.add_argument("--config", help="the resolved workflow config (YAML), printed in the report")
    parser.add_argument("--out", required=True, help="output folder: report.md, report.html, figures/, derived/")
    parser.add_argument("--clock", default="train_time_s", choices=list(CLOCKS), help="clock for headline speedups")
    parser.add_argument("--target", action="append", type=_parse_target, default=[],
                        help="configured target, e.g. image:mae=0.85 (default: the baseline's final quality)")
    parser.add_argument("--mode", default="finetune", choices=("finetune", "linear_probe"),
                        help="which evaluations to compare (default finetune)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.tables, args.out, args.config, args.clock, dict(args.target),
                             n_boot=args.bootstrap, mode=args.mode)
    except (FileNotFoundError, ValueError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {paths['markdown']}, {paths['html']}")
    return 0
