"""SLURM backend: run a command as a SLURM job through submitit, wait for it, surface its errors.

- Every sbatch setting (partition, account, qos, constraint, nodes, GPUs, CPUs, memory, time limit,
  signal delay, setup lines, extra sbatch parameters) is a :class:`SlurmOptions` field; nothing about a
  cluster is hard-coded (PROTOCOL.md#slurm-through-submitit).
- Pretraining jobs are :class:`CheckpointableCommand`: on the pre-timeout signal (USR2, sent
  ``signal_delay_s`` before the limit) or a preemption, submitit calls ``checkpoint()``, which asks the
  running command to stop (the pretraining runner writes ``checkpoint_last`` on SIGUSR2 and exits) and
  resubmits *the same immutable command*; the requeued job simply re-runs it and the runner resumes from
  ``checkpoint_last``. Nothing mutable is pickled, so a requeue can never carry a stale resume path.
- The job id is recorded in a job file (``RUN/slurm_job.json``); launching the same command again while
  that job is still queued or running re-attaches to it instead of submitting a duplicate (a restarted
  Snakemake).
- A failed job raises :class:`SlurmJobFailed` whose message ends with the tail of the job's stderr, so the
  cause (an OOM, a Python traceback) appears in the Snakemake log, not only in submitit's folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import pydantic
import submitit

from d2v2.atomic import atomic_write_json
from d2v2.config import Config, ConfigError, merge, validate
from d2v2.launch.local import job_env

__all__ = ["SlurmOptions", "Command", "CheckpointableCommand", "SlurmJobFailed", "submit_or_attach",
           "run_slurm", "ACTIVE_STATES"]

# sacct states of a job that will still run (a requeued job goes REQUEUED -> PENDING -> RUNNING).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT"}


class SlurmOptions(Config):
    """sbatch settings of one job (``slurm.*`` in the workflow config; ``--partition`` etc. on the CLI)."""

    partition: str = pydantic.Field(min_length=1)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = pydantic.Field(1, ge=1)
    gpus_per_node: int = pydantic.Field(0, ge=0)
    cpus_per_task: int = pydantic.Field(1, ge=1)
    mem_gb: float = pydantic.Field(4.0, gt=0)
    time_min: int = pydantic.Field(60, ge=1)
    signal_delay_s: int = pydantic.Field(120, ge=0)
    max_timeouts: int = pydantic.Field(3, ge=0)
    setup: list[str] = []
    sbatch: dict[str, Any] = {}   # extra sbatch parameters, e.g. {"exclusive": True, "reservation": "x"}

    @classmethod
    def for_job(cls, slurm: Mapping[str, Any], kind: str, threads: int) -> "SlurmOptions":
        """The options of one ``kind`` of workflow job (``pretrain``, ``finetune``) from the workflow config's
        ``slurm`` section: the shared settings, then ``slurm.<kind>``'s resources over them (its ``setup``
        lines after the shared ones, its ``sbatch`` merged into theirs); ``threads`` is the default
        ``cpus_per_task``. Raises :class:`~d2v2.config.ConfigError` naming the key."""
        shared = {k: v for k, v in slurm.items() if k not in ("pretrain", "finetune") and v is not None}
        resources = {k: v for k, v in (slurm.get(kind) or {}).items() if v is not None}
        data = {"cpus_per_task": threads, **shared, **resources,
                "setup": list(shared.get("setup", [])) + list(resources.get("setup", [])),
                "sbatch": merge(shared.get("sbatch", {}), resources.get("sbatch", {}))}
        if not data.get("partition"):
            raise ConfigError("slurm.partition: required when launcher.backend is slurm "
                              "(set it in the slurm profile or with --config slurm='{partition: NAME}')")
        return validate(cls, data, where=f"slurm.{kind}")

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU (each task is one DDP rank); one task on a CPU-only node."""
        return max(1, self.gpus_per_node)

    def executor_parameters(self) -> dict[str, Any]:
        """Keyword arguments of submitit's ``AutoExecutor.update_parameters``."""
        params: dict[str, Any] = dict(
            timeout_min=self.time_min, nodes=self.nodes, tasks_per_node=self.tasks_per_node,
            cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb, slurm_partition=self.partition,
            slurm_signal_delay_s=self.signal_delay_s, slurm_setup=list(self.setup),
            slurm_additional_parameters=dict(self.sbatch),
        )
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params


class SlurmJobFailed(RuntimeError):
    """A SLURM job ended without success; the message carries the tail of its stderr."""


# The process running the command inside this job (one per task). Module state, not object state: the
# callable itself stays immutable, so what checkpoint() resubmits is exactly what was first submitted.
_child: subprocess.Popen | None = None


@dataclass(frozen=True)
class Command:
    """The job's callable: run ``argv`` in ``cwd`` with ``threads`` math threads per task."""

    argv: tuple[str, ...]
    cwd: str
    threads: int = 1

    def __call__(self) -> int:
        global _child
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # one DDP rank per task: torchrun-style env
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        _child = subprocess.Popen(list(self.argv), cwd=self.cwd, env=job_env(self.threads))
        while (code := _child.poll()) is None:  # poll, never wait(): checkpoint() polls from a signal handler
            time.sleep(0.5)
        if code != 0:
            raise SlurmJobFailed(f"command exited with code {code}: {' '.join(self.argv)}")
        return code


@dataclass(frozen=True)
class CheckpointableCommand(Command, submitit.helpers.Checkpointable):
    """A :class:`Command` whose program checkpoints itself on SIGUSR2 and resumes when re-run."""

    grace_s: float = 60.0   # how long checkpoint() waits for the program to write its checkpoint and exit

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        if _child is not None and _child.poll() is None:
            _child.send_signal(signal.SIGUSR2)   # idempotent if SLURM already signalled the whole step
            deadline = time.monotonic() + self.grace_s
            while _child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return super().checkpoint(*args, **kwargs)   # the same immutable command, re-run after requeue


def _attach(job_file: Path, command: Command) -> submitit.SlurmJob | None:
    """The recorded job if it is still queued or running (None if it ended or was never recorded).

    A recorded job that still runs a *different* command is an error: two jobs would write one run.
    """
    try:
        record = json.loads(job_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    job_id = str(record["job_id"])
    # squeue asks slurmctld itself: sacct may not list a job submitted a moment ago.
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if (queue.stdout.strip() if queue.returncode == 0 else "") not in ACTIVE_STATES:
        return None
    if record.get("argv") != list(command.argv) or record.get("cwd") != command.cwd:
        raise SlurmJobFailed(f"{job_file}: SLURM job {job_id} is still running a different command "
                             f"({' '.join(record.get('argv', []))}); cancel it (scancel {job_id}) or wait for it")
    return submitit.SlurmJob(folder=record["folder"], job_id=job_id)


def submit_or_attach(command: Command, options: SlurmOptions, folder: str | Path, name: str,
                     job_file: str | Path | None = None) -> tuple[submitit.Job, bool]:
    """Submit ``command`` (or re-attach to its recorded running job); return ``(job, attached)``."""
    job_file = Path(job_file) if job_file else None
    if job_file is not None and (job := _attach(job_file, command)) is not None:
        return job, True
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                     slurm_max_num_timeout=options.max_timeouts)
    executor.update_parameters(name=name, **options.executor_parameters())
    job = executor.submit(command)
    if job_file is not None:
        atomic_write_json(job_file, {"job_id": job.job_id, "folder": str(folder), "name": name,
                                     "argv": list(command.argv), "cwd": command.cwd,
                                     "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return job, False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no stderr file at {path})"


def _final_state(job: submitit.Job, timeout_s: float = 15.0) -> str:
    """The job's sacct state once accounting has caught up (a job that just ended can still read PENDING
    or RUNNING for a moment); the last state read if it has not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if state.split()[0] not in ACTIVE_STATES or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def wait(job: submitit.Job, poll_s: float = 5.0) -> None:
    """Block until ``job`` ends; raise :class:`SlurmJobFailed` with its stderr tail unless it succeeded.

    Polls the result file every second and sacct every ``poll_s`` (submitit's own back-off can leave a
    killed job unnoticed for minutes).
    """
    last_sacct = 0.0
    while not job.paths.result_pickle.exists():
        now = time.monotonic()
        if now - last_sacct >= poll_s:
            last_sacct = now
            if job.done(force_check=True):
                break
        time.sleep(1.0)
    try:
        job.result()
    except Exception as err:  # submitit raises FailedJobError / UncompletedJobError with its own details
        state = _final_state(job)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlurmJobFailed(
            f"SLURM job {job.job_id} failed (state {state}): {first_line}\n"
            f"--- tail of {job.paths.stderr} ---\n{_tail(job.paths.stderr)}") from None


def run_slurm(command: Command, options: SlurmOptions, folder: str | Path, name: str,
              job_file: str | Path | None = None, poll_s: float = 5.0) -> int:
    """Submit (or re-attach), wait, and return 0; failures raise :class:`SlurmJobFailed`."""
    job, attached = submit_or_attach(command, options, folder, name, job_file)   # may raise SlurmJobFailed
    print(f"launch: {'re-attached to' if attached else 'submitted'} SLURM job {job.job_id} "
          f"({name}; logs: {job.paths.stdout.parent})", flush=True)
    wait(job, poll_s)
    print(f"launch: SLURM job {job.job_id} completed", flush=True)
    return 0
