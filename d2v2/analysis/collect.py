"""Metrics files and pretraining run directories -> validated tidy tables (``python -m d2v2 collect``).

Outputs (each as parquet and CSV, written atomically):

- ``evals``: one row per evaluation point, i.e. per fine-tuned checkpoint: identity (modality, method,
  variant, its parameters as JSON and as ``param.<name>`` columns, seed, the run's budget scale (below 1
  for a budget sweep's run), the checkpoint's budget fraction, task), the
  pretraining clocks at that checkpoint (train-only and end-to-end seconds, device-hours, CPU seconds;
  including what made the run's inputs, which ``inputs_<clock>`` also gives apart, PROTOCOL.md#input-costs), updates,
  samples and epochs seen, every metric (``metric.<name>``) plus ``value`` = the primary metric, and
  provenance (git commit and dirty flag, package versions, device name and count, host, SLURM job ids,
  preset) and the source file. A run that leaves a field its method's other variants ablate at its default
  gets that field's ``param.<name>`` too, from the method config its pretraining recorded (the default
  variant's M = 4 beside the variants' 1, 2, 8), so that an ablation's figure places it on the axis;
- ``runs``: one row per pretraining run: status, throughput (samples/s, tokens/s), peak memory,
  clocks and provenance from ``summary.json``, plus the number of events and the last logged loss
  from ``events.jsonl``;
- ``progress``: one row per logging interval of every pretraining run (``train_progress`` events):
  updates, both clocks, loss, LR, gradient norm and the method's diagnostics (``diag.<name>``), the
  data of the report's training-health figures.

Inputs are checked before anything is written; each problem is an error naming the file: a missing
key or wrong type, a metrics file without provenance, the same identity twice, a task whose runs
disagree on the primary metric or its direction. Within one comparison (a modality) the pretrained runs must
share the preset and the device model, since times on different hardware or at different scales are
not comparable: that is an error. Differing device counts are allowed (the ``device_hours`` clock
accounts for them) with a warning, and so are differing or dirty git commits (warnings). The warnings
are saved in ``collect_warnings.json`` for the report.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pydantic
from pydantic import Field

from d2v2.config import ConfigError, get_dotted, validate
from d2v2.atomic import atomic_write, atomic_write_json
from d2v2.engine.clock import CLOCKS
from d2v2.engine.events import EventLogWarning, iter_events
from d2v2.workflow.runs import run_field

__all__ = ["CollectError", "MetricsFile", "load_metrics", "collect_evals", "collect_runs", "ablated_fields",
           "collect_progress", "write_table", "main"]

IDENTITY_COLUMNS = ("modality", "method", "variant", "seed", "budget_scale", "budget_fraction", "task", "init",
                    "mode")


class CollectError(ValueError):
    """Inconsistent or malformed inputs; the message names the file."""


class _Model(pydantic.BaseModel):
    # Producers may add keys (fine-tuning wall-clock, its config, ...): required keys are checked,
    # others are carried along where the table has a place for them.
    model_config = pydantic.ConfigDict(extra="allow", protected_namespaces=())


class Identity(_Model):
    modality: str
    method: str
    variant: str
    params: dict[str, Any] = {}
    seed: int
    budget_fraction: float = Field(ge=0, le=1)
    budget_scale: float = Field(1.0, gt=0, le=1)     # the run's budget / the modality's (< 1: a budget sweep)
    task: str
    init: str = "pretrained"           # "random": fine-tuned from random weights (budget_fraction 0)
    mode: str = "finetune"             # or "linear_probe"


class InputCosts(_Model):
    """The clocks of what made a run's inputs (PROTOCOL.md#input-costs; HuBERT: its labels and first iteration)."""

    train_time_s: float = Field(ge=0)
    e2e_time_s: float = Field(ge=0)
    train_cpu_s: float = Field(ge=0)
    device_hours: float = Field(ge=0)
    sources: list[str] = []


class PretrainState(_Model):
    """Clocks and progress of the pretraining run at the checkpoint that was fine-tuned."""

    train_time_s: float = Field(ge=0)
    e2e_time_s: float = Field(ge=0)
    device_hours: float = Field(ge=0)
    train_cpu_s: float | None = Field(None, ge=0)   # None: pretrained before this clock was recorded
    device_count: int = Field(ge=0)    # 0 for random initialisation (no pretraining)
    updates: int = Field(ge=0)
    samples: int = Field(ge=0)
    epochs: float = Field(ge=0)
    inputs: InputCosts | None = None
    method_config: dict[str, Any] | None = None     # the pretraining run's method config (None: not recorded)
    run_config: dict[str, Any] | None = None        # the pretraining run's run config (None: not recorded)


class Provenance(_Model):
    git_commit: str | None
    git_dirty: bool | None
    versions: dict[str, str]
    device: str
    device_name: str | None = None
    device_count: int = Field(ge=1)
    host: str
    slurm_job_ids: list[str] = []
    preset: str | None
    allocator: dict[str, str | None] = {}       # malloc settings (docs/BENCHMARKS.md#allocator); {}: not recorded


class MetricsFile(_Model):
    """The fine-tuning metrics file of docs/ARCHITECTURE.md ("Run directory")."""

    identity: Identity
    pretrain: PretrainState
    metrics: dict[str, float | None]   # None: undefined (e.g. MCC of a constant prediction)
    primary_metric: str
    higher_is_better: bool
    provenance: Provenance                    # of the fine-tuning run
    pretrain_provenance: Provenance | None = None   # of the pretraining run behind the clocks


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CollectError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise CollectError(f"{path}: not valid JSON ({err})") from None


def load_metrics(path: str | Path) -> MetricsFile:
    """Read and validate one metrics file; errors name the file and the key."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CollectError(f"{path}: expected a JSON object")
    if not data.get("provenance"):
        raise CollectError(f"{path}: no provenance (git commit, versions, device, host, preset): "
                           "results without provenance cannot be compared or reproduced")
    try:
        m = validate(MetricsFile, data)
    except ConfigError as err:
        raise CollectError(f"{path}: {err}") from None
    if m.primary_metric not in m.metrics:
        raise CollectError(f"{path}: primary_metric '{m.primary_metric}' is not among the metrics "
                           f"({', '.join(sorted(m.metrics))})")
    if m.metrics[m.primary_metric] is None:
        raise CollectError(f"{path}: primary metric '{m.primary_metric}' is null (NaN): the fine-tune failed")
    return m


def _files(paths: Iterable[str | Path], pattern: str) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(pattern))
            if not found:
                raise CollectError(f"{p}: no {pattern} file in this folder")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise CollectError(f"{p}: no such file or directory")
    return out


def _row(m: MetricsFile, source: Path) -> dict[str, Any]:
    """One table row. Provenance columns describe the pretraining run behind the clocks (the metrics
    file's ``pretrain_provenance``; the fine-tuning provenance for random initialisation), and
    ``ft_*`` columns the fine-tuning run."""
    ident, prov, ft = m.identity, m.pretrain_provenance or m.provenance, m.provenance
    row: dict[str, Any] = {k: getattr(ident, k) for k in IDENTITY_COLUMNS}
    row["params"] = json.dumps(ident.params, sort_keys=True)
    row.update({f"param.{k}": v for k, v in ident.params.items()})
    recorded_configs = {"inputs", "method_config", "run_config"}
    row.update(m.pretrain.model_dump(include=set(PretrainState.model_fields) - recorded_configs))
    # the compared time includes what made the run's inputs; inputs_<clock> keeps that part apart
    inputs = m.pretrain.inputs
    for clock in CLOCKS:
        row[f"inputs_{clock}"] = getattr(inputs, clock) if inputs else 0.0
        if inputs and row[clock] is not None:
            row[clock] += row[f"inputs_{clock}"]
    row.update(primary_metric=m.primary_metric, higher_is_better=m.higher_is_better,
               value=m.metrics[m.primary_metric])
    row.update({f"metric.{k}": (float("nan") if v is None else v) for k, v in m.metrics.items()})
    row.update(git_commit=prov.git_commit, git_dirty=prov.git_dirty,
               versions=json.dumps(prov.versions, sort_keys=True), device=prov.device,
               device_name=prov.device_name or prov.device, prov_device_count=prov.device_count,
               host=prov.host, slurm_job_ids=",".join(prov.slurm_job_ids), preset=prov.preset,
               allocator=json.dumps(prov.allocator, sort_keys=True),
               ft_git_commit=ft.git_commit, ft_device_name=ft.device_name or ft.device, ft_host=ft.host,
               ft_slurm_job_ids=",".join(ft.slurm_job_ids), source=str(source))
    return row


def _check_consistency(evals: pd.DataFrame) -> list[str]:
    """Raise on inputs that cannot be compared; return warnings for those that can, with care."""
    key = list(IDENTITY_COLUMNS)
    dup = evals[evals.duplicated(key, keep=False)]
    if not dup.empty:
        first = dup.groupby(key, sort=False)["source"].apply(list).iloc[0]
        raise CollectError(f"duplicated run (same identity twice): {' and '.join(first)}")
    for (modality, task), g in evals.groupby(["modality", "task"]):
        for col in ("primary_metric", "higher_is_better"):
            if g[col].nunique() > 1:
                odd = g[g[col] != g[col].iloc[0]]["source"].iloc[0]
                raise CollectError(f"{odd}: {col} differs from other '{modality}/{task}' runs "
                                   f"({sorted(map(str, g[col].unique()))})")
    notes = []
    pretrained = evals[evals["init"] == "pretrained"]     # random-init rows have no pretraining clock
    for modality, g in pretrained.groupby("modality"):
        for col, what in (("preset", "presets"), ("device_name", "devices")):
            if g[col].nunique(dropna=False) > 1:
                odd = g[g[col] != g[col].iloc[0]]["source"].iloc[0]
                raise CollectError(f"{odd}: mixed {what} within the '{modality}' comparison "
                                   f"({sorted(map(str, g[col].unique()))}); times are only comparable "
                                   "at one scale on one kind of device: collect them separately")
        if g["prov_device_count"].nunique() > 1:
            notes.append(f"{modality}: runs used different device counts "
                         f"({sorted(g['prov_device_count'].unique().tolist())}); compare them on device_hours")
        if g["allocator"].nunique() > 1:
            notes.append(f"{modality}: runs pretrained under different allocator settings "
                         f"({sorted(g['allocator'].unique().tolist())}); on a CPU the same budget buys "
                         "different training under them (docs/BENCHMARKS.md#allocator)")
    if evals["git_commit"].nunique(dropna=False) > 1:
        notes.append(f"results come from {evals['git_commit'].nunique(dropna=False)} git commits")
    dirty = int((evals["git_dirty"] != False).sum())  # noqa: E712  (None = unknown counts as dirty)
    if dirty:
        notes.append(f"{dirty} evaluation(s) ran from a modified (dirty) or unknown working tree")
    return notes


def ablated_fields(params: Iterable[str]) -> list[str]:
    """The fields some variant sets, sorted: the keys of the rows' ``params`` JSON."""
    return sorted({k for p in params for k in json.loads(p)})


def _recorded_value(pretrain: PretrainState, name: str) -> Any:
    """An ablated field's value in the pretraining run's recorded configs: a method field in its method
    config, a ``pretrain.<field>`` in its run config (d2v2.workflow.runs.run_field); None if not recorded."""
    path = run_field(name)
    return get_dotted(pretrain.method_config, name) if path is None else get_dotted(pretrain.run_config, path)


def _fill_default_params(evals: pd.DataFrame, pretrains: list[PretrainState]) -> None:
    """Give every row the ``param.<name>`` of each field its (modality, method) ablates, from the row's recorded
    configs where its own variant did not set it (``pretrains`` aligned with the rows)."""
    for _, group in evals.groupby(["modality", "method"]):
        for name in ablated_fields(group["params"]):
            col = f"param.{name}"
            values = evals[col].tolist()
            for i in group.index[group[col].isna()]:
                values[i] = _recorded_value(pretrains[i], name)
            evals[col] = values


def collect_evals(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """The ``evals`` table and the warnings about it, from metrics files or folders of them."""
    files = _files(paths, "*.json")
    if not files:
        raise CollectError("no metrics files found")
    loaded = [load_metrics(f) for f in files]
    evals = pd.DataFrame([_row(m, f) for m, f in zip(loaded, files)])
    _fill_default_params(evals, [m.pretrain for m in loaded])
    notes = _check_consistency(evals)
    evals = evals.sort_values(list(IDENTITY_COLUMNS), kind="stable").reset_index(drop=True)
    return evals, notes


def _events(path: Path) -> Iterable[dict[str, Any]]:
    """The events of an ``events.jsonl``, in order (torn lines as :func:`d2v2.engine.events.iter_events`)."""
    if not path.is_file():
        return
    try:
        yield from iter_events(path)
    except ValueError as err:
        raise CollectError(str(err)) from None


def _events_summary(path: Path) -> dict[str, Any]:
    """Number of events and the last logged loss (``{"key": "loss", "value": x}`` or a ``value`` dict
    with a ``loss``, as in ``train_progress``)."""
    n, last_loss = 0, None
    for event in _events(path):
        n += 1
        value = event.get("value")
        loss = value.get("loss") if isinstance(value, dict) else value if event.get("key") == "loss" else None
        if isinstance(loss, (int, float)):
            last_loss = float(loss)
    return {"events": n, "last_loss": last_loss}


def _summaries(run_dirs: Iterable[str | Path]) -> Iterable[tuple[Path, dict[str, Any]]]:
    """``(run_dir, summary)`` of every pretraining run, each summary checked for status and provenance."""
    for run in _files(run_dirs, "summary.json"):
        summary_path = run if run.name == "summary.json" else run / "summary.json"
        summary = _read_json(summary_path)
        if not isinstance(summary, dict):
            raise CollectError(f"{summary_path}: expected a JSON object")
        for required in ("status", "provenance"):
            if not summary.get(required):
                raise CollectError(f"{summary_path}: missing '{required}'")
        yield summary_path.parent, summary


def collect_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """The ``runs`` table: one row per pretraining run directory (``summary.json`` + ``events.jsonl``)."""
    rows = []
    for run_dir, summary in _summaries(run_dirs):
        flat = pd.json_normalize(summary, sep=".").iloc[0].to_dict()
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()}
        rows.append({"run_dir": str(run_dir), **flat, **_events_summary(run_dir / "events.jsonl")})
    return pd.DataFrame(rows)


def _variant(run_dir: Path, method: str | None) -> str:
    """The workflow's variant name from its run layout ``.../<method>/<variant>/seed<k>``, else the folder."""
    return run_dir.parent.name if run_dir.parent.parent.name == method else run_dir.name


def collect_progress(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """The ``progress`` table: one row per logging interval (``train_progress`` event) of every run:
    identity, updates, the clocks of :data:`CLOCKS` (device-hours as the engine counts them:
    train-only seconds x devices / 3600) and the device count, loss, LR, gradient norm and each logged
    diagnostic as ``diag.<name>`` (e.g. ``diag.target_pos_share``)."""
    rows = []
    for run_dir, summary in _summaries(run_dirs):
        identity = summary.get("identity") or {}
        base = {"run_dir": str(run_dir), "modality": identity.get("modality"), "method": identity.get("method"),
                "variant": _variant(run_dir, identity.get("method")), "seed": identity.get("seed"),
                "device_count": summary["provenance"].get("device_count", 1)}
        for event in _events(run_dir / "events.jsonl"):
            value = event.get("value")
            if event.get("key") != "train_progress" or not isinstance(value, dict):
                continue
            row = {**base, **{k: value.get(k) for k in ("updates", "train_time_s", "e2e_time_s", "train_cpu_s", "loss",
                                                       "lr", "grad_norm")}}
            if row["train_time_s"] is not None:
                row["device_hours"] = row["train_time_s"] * base["device_count"] / 3600
            row.update({f"diag.{k}": v for k, v in (value.get("diagnostics") or {}).items()
                        if isinstance(v, (int, float))})
            rows.append(row)
    return pd.DataFrame(rows)


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name.parquet`` and ``name.csv`` atomically."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.parquet", out_dir / f"{name}.csv"]
    with atomic_write(paths[0], "wb") as f:
        df.to_parquet(f, index=False)
    with atomic_write(paths[1], "w") as f:
        df.to_csv(f, index=False)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics JSON files or folders of them")
    parser.add_argument("--runs", nargs="*", default=[], help="pretraining run directories (or folders of them)")
    parser.add_argument("--out", required=True, help="output folder for the tables (e.g. results/tables)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EventLogWarning)
            evals, notes = collect_evals(args.metrics)
            runs, progress = collect_runs(args.runs), collect_progress(args.runs)
    except CollectError as err:
        print(f"collect: error: {err}", file=sys.stderr)
        return 2
    notes += sorted({str(w.message) for w in caught if issubclass(w.category, EventLogWarning)})
    for note in notes:
        print(f"collect: warning: {note}", file=sys.stderr)
    written = (write_table(evals, args.out, "evals") + write_table(runs, args.out, "runs")
               + write_table(progress, args.out, "progress"))
    atomic_write_json(Path(args.out) / "collect_warnings.json", notes)
    print(f"collect: {len(evals)} evaluation points, {len(runs)} pretraining runs -> "
          + ", ".join(map(str, written)))
    return 0
