"""``python -m d2v2 launch``: run one command locally or as a SLURM job; what the workflow's rules call.

    python -m d2v2 launch --backend local --threads 1 -- python -m d2v2 pretrain --config run.yaml --out RUN
    python -m d2v2 launch --backend slurm --partition gpu --gpus-per-node 8 --time-min 4320 \\
        --checkpointable --job-file RUN/slurm_job.json --folder RUN/slurm -- python -m d2v2 pretrain ...

The SLURM options are :class:`d2v2.launch.slurm.SlurmOptions`' fields, as flags or all at once as
``--options-json`` (the workflow's rules pass ``SlurmOptions.for_job(...)`` that way).

``--backend local`` runs the command as a child process with ``--threads`` math threads
(:mod:`d2v2.launch.local`); ``--backend slurm`` submits it through submitit and waits
(:mod:`d2v2.launch.slurm`): ``--checkpointable`` makes it requeue on timeout/preemption, ``--job-file``
lets a restarted workflow re-attach to a job that is still running. The exit status is the command's
(local) or 0/1 (SLURM; a failure prints the tail of the job's stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from d2v2.config import ConfigError, validate

__all__ = ["main", "build_parser", "BACKENDS"]

BACKENDS = ("local", "slurm")      # where a job runs: a child process, or a SLURM job through submitit

# SlurmOptions fields exposed as --flags (list/dict fields get their own repeatable flags below).
_SLURM_FLAGS = {"partition": str, "account": str, "qos": str, "constraint": str, "nodes": int,
                "gpus_per_node": int, "cpus_per_task": int, "mem_gb": float, "time_min": int,
                "signal_delay_s": int, "max_timeouts": int}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2v2 launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, required=True)
    p.add_argument("--threads", type=int, default=1,
                   help="math threads per task (local: the job's share of the CPU; slurm: default cpus per task)")
    p.add_argument("--name", default="d2v2", help="job name (SLURM)")
    p.add_argument("--folder", default="logs/slurm/%%j", help="submitit folder, shared with the nodes (%%j = job id)")
    p.add_argument("--job-file", help="record the SLURM job id here; re-attach if that job still runs")
    p.add_argument("--checkpointable", action="store_true",
                   help="requeue on timeout/preemption (the command must checkpoint on SIGUSR2 and resume)")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="checkpointable: seconds to wait for the command to checkpoint before requeueing")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between sacct polls")
    slurm = p.add_argument_group("SLURM options (d2v2.launch.slurm.SlurmOptions)")
    slurm.add_argument("--options-json", metavar="JSON",
                       help="all SLURM options as one JSON object (what the workflow passes); "
                            "the flags below override single fields")
    for field, type_ in _SLURM_FLAGS.items():
        slurm.add_argument("--" + field.replace("_", "-"), dest=field, type=type_)
    slurm.add_argument("--setup", action="append", default=[], help="a shell line run before the job (repeatable)")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch parameter, value parsed as YAML (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    return p


def _slurm_options(args: argparse.Namespace):
    from d2v2.launch.slurm import SlurmOptions

    try:
        data = json.loads(args.options_json) if args.options_json else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--options-json: not a JSON object ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--options-json: not a JSON object (got {data!r})")
    data.update({k: getattr(args, k) for k in _SLURM_FLAGS if getattr(args, k) is not None})
    data.setdefault("cpus_per_task", args.threads)
    data["setup"] = list(data.get("setup", [])) + args.setup
    extra = dict(data.get("sbatch", {}))
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--sbatch '{item}': expected KEY=VALUE")
        extra[key.strip()] = yaml.safe_load(value) if value else True
    data["sbatch"] = extra
    if "partition" not in data:
        raise ConfigError("slurm.partition: required for --backend slurm (set it in the profile or config)")
    return validate(SlurmOptions, data, where="slurm")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("launch: no command given (expected: launch [options] -- COMMAND ...)", file=sys.stderr)
        return 2
    if args.backend == "local":
        from d2v2.launch.local import run_local

        return run_local(command, threads=args.threads)

    from d2v2.launch.slurm import CheckpointableCommand, Command, SlurmJobFailed, run_slurm

    try:
        options = _slurm_options(args)
    except ConfigError as err:
        print(f"launch: {err}", file=sys.stderr)
        return 2
    cls = CheckpointableCommand if args.checkpointable else Command
    extra = {"grace_s": args.grace_s} if args.checkpointable else {}
    job = cls(argv=tuple(command), cwd=os.getcwd(), threads=options.cpus_per_task, **extra)
    try:
        return run_slurm(job, options, folder=args.folder, name=args.name, job_file=args.job_file,
                         poll_s=args.poll_s)
    except SlurmJobFailed as err:
        print(f"launch: {err}", file=sys.stderr)
        return 1
