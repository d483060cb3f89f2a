"""The SLURM launcher against the real local cluster (tests/slurm/cluster.sh): submission, failures,
re-attachment and requeue. The pretraining requeue and the workflow through ``--profile slurm`` are in
tests/test_workflow.py."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from slurm import job_state, partition, require_slurm, wait_until

pytestmark = pytest.mark.slurm
LAUNCH = [sys.executable, "-m", "d2v2", "launch", "--backend", "slurm", "--mem-gb", "0.5", "--time-min", "5",
          "--poll-s", "1"]

# A program that checkpoints like the pretraining runner: on SIGUSR2/SIGTERM it saves its step and exits;
# started again it resumes from the saved step. Each run appends (job id, first step, last step, signals).
RESUMABLE = textwrap.dedent("""
    import json, os, signal, sys, time
    state, total = sys.argv[1], int(sys.argv[2])
    step = json.load(open(state))["step"] if os.path.exists(state) else 0
    first, stop = step, []
    signal.signal(signal.SIGUSR2, lambda *a: stop.append("USR2"))
    signal.signal(signal.SIGTERM, lambda *a: stop.append("TERM"))
    print("running from", step, flush=True)
    while step < total and not stop:
        time.sleep(0.05)
        step += 1
    json.dump({"step": step}, open(state + ".tmp", "w"))
    os.replace(state + ".tmp", state)
    with open(state + ".segments", "a") as f:
        f.write(json.dumps([os.environ["SLURM_JOB_ID"], first, step, sorted(set(stop))]) + "\\n")
""")


@pytest.fixture(autouse=True)
def _cluster():
    require_slurm()


def launch(tmp_path, *args, **kw):
    cmd = LAUNCH + ["--partition", partition(), "--folder", str(tmp_path / "slurm" / "%j"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120, **kw)


def test_job_runs_with_its_cpu_budget(tmp_path):
    r = launch(tmp_path, "--cpus-per-task", "1", "--job-file", "job.json", "--", sys.executable, "-c",
               "import os; print('ENV', os.environ['SLURM_JOB_ID'], os.environ['OMP_NUM_THREADS'])")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "job.json").read_text())
    out = (tmp_path / "slurm" / record["job_id"] / f"{record['job_id']}_0_log.out").read_text()
    assert f"ENV {record['job_id']} 1" in out
    wait_until(lambda: job_state(record["job_id"]) == "COMPLETED", 10, "sacct to record the job")


def test_failed_job_shows_the_tail_of_its_stderr(tmp_path):
    r = launch(tmp_path, "--", sys.executable, "-c",
               "import sys; print('the real cause: out of memory', file=sys.stderr); sys.exit(3)")
    assert r.returncode == 1
    assert "failed (state FAILED)" in r.stderr
    assert "the real cause: out of memory" in r.stderr and "exited with code 3" in r.stderr


def test_restarted_launch_reattaches_instead_of_submitting_twice(tmp_path):
    cmd = ["--job-file", "job.json", "--", sys.executable, "-c", "import time; time.sleep(6)"]
    first = subprocess.Popen(LAUNCH + ["--partition", partition(), "--folder", str(tmp_path / "slurm" / "%j"), *cmd],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = wait_until(lambda: (tmp_path / "job.json").exists() and
                        json.loads((tmp_path / "job.json").read_text())["job_id"], 30, "the job file")
    first.kill()   # Snakemake died; the job keeps running on the cluster
    first.wait()
    other = launch(tmp_path, "--job-file", "job.json", "--", sys.executable, "-c", "pass")
    assert other.returncode == 1 and f"SLURM job {job_id} is still running a different command" in other.stderr
    second = launch(tmp_path, *cmd)
    assert second.returncode == 0, second.stderr
    assert f"re-attached to SLURM job {job_id}" in second.stdout
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] == job_id
    # a finished job is not re-attached: launching again submits a new one
    third = launch(tmp_path, *cmd)
    assert third.returncode == 0 and "submitted SLURM job" in third.stdout
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] != job_id


def test_usr2_requeues_and_the_command_resumes(tmp_path):
    (tmp_path / "prog.py").write_text(RESUMABLE)
    state = tmp_path / "state.json"
    proc = subprocess.Popen(LAUNCH + ["--partition", partition(), "--folder", str(tmp_path / "slurm" / "%j"),
                                      "--checkpointable", "--job-file", "job.json", "--",
                                      sys.executable, str(tmp_path / "prog.py"), str(state), "200"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = wait_until(lambda: (tmp_path / "job.json").exists() and
                        json.loads((tmp_path / "job.json").read_text())["job_id"], 30, "the job file")
    log = tmp_path / "slurm" / job_id / f"{job_id}_0_log.out"
    wait_until(lambda: log.exists() and "running from 0" in log.read_text(), 30, "the job to start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    segments = [json.loads(line) for line in (tmp_path / "state.json.segments").read_text().splitlines()]
    assert len(segments) == 2, segments
    (job1, first1, last1, sig1), (job2, first2, last2, sig2) = segments
    assert job1 == job2 == job_id and first1 == 0 and sig1 == ["USR2"]
    assert 0 < last1 < 200 and first2 == last1 and last2 == 200 and sig2 == []   # resumed, not restarted
    assert json.loads(state.read_text())["step"] == 200


# ------------------------------------------------------------------ the workflow and the runner on SLURM
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.mark.slow
def test_smoke_workflow_through_the_slurm_profile(tmp_path):
    """`snakemake --profile slurm results/figures/`: every training job is a SLURM job (image smoke runs)."""
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "-d", str(tmp_path), "results/figures/",
           "--config", "preset=smoke", f"data={{root: {DATA}}}", "modalities=[image]",
           f"slurm={{partition: {partition()}}}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert list((tmp_path / "results" / "figures").glob("curves_image_*.png"))
    in_flight = max(int(n) for n in re.findall(r"Execute (\d+) jobs", r.stdout + r.stderr))
    assert in_flight >= 3    # SLURM jobs take no local cores: more than the profile's 2 cores in flight
    for method in ("data2vec2", "mae"):
        run = tmp_path / "runs" / "image" / method / "default" / "seed0"
        record = json.loads((run / "slurm_job.json").read_text())
        wait_until(lambda: job_state(record["job_id"]) == "COMPLETED", 10, "sacct")
        segments = (run / "segments.csv").read_text().splitlines()
        assert len(segments) == 2 and f",{record['job_id']}," in segments[1]   # the run knows its SLURM job
    assert len(list((tmp_path / "results" / "metrics").rglob("*.json"))) == 3 * 2   # smoke's 3 image methods


def _pretrain_config(path: Path) -> Path:
    config = {"method": {"modality": "image", "name": "data2vec2", "preset": "smoke"},
              "data": {"root": str(DATA), "num_workers": 0}, "batch_size": 8, "log_every": 5,
              "optim": {"lr": 1e-3, "warmup_fraction": 0.1}, "budget": {"kind": "updates", "value": 400},
              "checkpoint": {"fractions": [0.5, 1.0]}, "device": "cpu"}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_requeued_pretraining_matches_an_uninterrupted_run(tmp_path):
    """USR2 mid-run: checkpoint_last, requeue, resume; same final weights, continuous clocks, 2 segments."""
    from d2v2.data import DataConfig, prepare
    from d2v2.engine.checkpoint import load_checkpoint

    prepare(["image"], DataConfig(root=str(DATA)))
    config = _pretrain_config(tmp_path / "run.yaml")
    pretrain = [sys.executable, "-m", "d2v2", "pretrain", "--config", str(config), "--out"]
    reference = tmp_path / "reference"
    subprocess.run(pretrain + [str(reference)], check=True, capture_output=True, timeout=900,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})

    run = tmp_path / "requeued"
    proc = subprocess.Popen(LAUNCH + ["--partition", partition(), "--folder", str(run / "slurm" / "%j"),
                                      "--checkpointable", "--job-file", str(run / "slurm_job.json"),
                                      "--", *pretrain, str(run)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = run / "events.jsonl"
    wait_until(lambda: events.exists() and '"loss"' in events.read_text(), 300, "training to start")
    job_id = json.loads((run / "slurm_job.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err

    segments = list(csv.DictReader((run / "segments.csv").open()))
    assert len(segments) == 2 and {s["job_id"] for s in segments} == {job_id}
    assert segments[0]["reason"] != "completed" and segments[1]["reason"] == "completed"
    final, ref = (load_checkpoint(d / "checkpoints" / "checkpoint_f1.000.pt") for d in (run, reference))
    assert final["model"].keys() == ref["model"].keys()
    for name, tensor in ref["model"].items():
        assert torch.equal(final["model"][name], tensor), name    # bit-identical on CPU (updates budget)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert summary["updates"] == ref_summary["updates"] == 400
    # the train-only clock continues across the requeue: about the uninterrupted run's, not reset
    assert float(segments[1]["train_time_s"]) > float(segments[0]["train_time_s"]) > 0
    assert 0.5 * ref_summary["train_time_s"] < summary["train_time_s"] < 2.0 * ref_summary["train_time_s"] + 5
