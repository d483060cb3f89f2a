"""What the workflow's rules run: the launch prefix of a training job's shell command, and a run dir made
ready for its request (``python -m d2v2 prepare-run``)."""
from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from d2v2.atomic import atomic_write_json

__all__ = ["launch_command", "prepare_run_dir"]


def launch_command(config: Mapping[str, Any], kind: str, name: str, folder: str,
                   job_file: str | None = None) -> str:
    """The ``python -m d2v2 launch ... --`` prefix of a training rule's shell command (kind: pretrain|finetune).

    A Snakemake shell template: ``name``, ``folder`` and ``job_file`` are inserted as given, as shell words
    (the rules pass quoted placeholders such as ``{params.job_file:q}``); everything taken from the config
    is shell-quoted and has its braces escaped.
    """
    def lit(value: Any) -> str:
        return str(value).replace("{", "{{").replace("}", "}}")

    launcher = config["launcher"]
    threads = launcher[f"{kind}_threads"]
    args = [lit(sys.executable), "-m", "d2v2", "launch", "--backend", launcher["backend"], "--threads", str(threads)]
    if launcher["backend"] == "slurm":
        from d2v2.launch.slurm import SlurmOptions

        options = SlurmOptions.for_job(config["slurm"], kind, threads)
        args += ["--name", "{name}", "--folder", "{folder}", "--poll-s", str(launcher["poll_s"]),
                 "--options-json", lit(options.model_dump_json(exclude_defaults=True))]
        if job_file:
            args += ["--job-file", "{job_file}"]
        if kind == "pretrain":
            args += ["--checkpointable", "--grace-s", str(launcher["grace_s"])]
    words = {"{name}": name, "{folder}": folder, "{job_file}": job_file}
    return " ".join(words.get(arg) or shlex.quote(arg) for arg in args) + " --"


def prepare_run_dir(run_dir: str | Path, request: Mapping[str, Any]) -> Path | None:
    """Make ``run_dir`` ready for ``request``: a run dir holding another config is moved aside.

    The pretraining runner resumes a run dir only with the same config (and refuses otherwise). When
    Snakemake re-runs a run because its config changed, the old run is kept as
    ``<run_dir>.replaced-<UTC time>`` (never deleted) and the new one starts fresh. Returns the new
    location of the old run, if one was moved.
    """
    from d2v2.engine.runconfig import config_differences, resolve_run_config

    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    new = resolve_run_config(request).model_dump(mode="json")
    if not config_differences(yaml.safe_load(saved.read_text()) or {}, new):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    run_dir.rename(moved)
    return moved


def main(argv: list[str]) -> int:
    """``python -m d2v2 prepare-run RUN_DIR REQUEST_JSON``: what the pretrain rule runs before launching: move
    a run dir holding another config aside (:func:`prepare_run_dir`), write ``RUN_DIR/run.yaml``."""
    if len(argv) != 2:
        print("usage: python -m d2v2 prepare-run RUN_DIR REQUEST_JSON", file=sys.stderr)
        return 2
    run_dir, request = Path(argv[0]), json.loads(argv[1])
    moved = prepare_run_dir(run_dir, request)
    if moved is not None:
        print(f"{run_dir}: its config changed; the previous run was moved to {moved}")
    atomic_write_json(run_dir / "run.yaml", request)        # JSON is YAML
    return 0
