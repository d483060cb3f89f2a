"""The SLURM launcher against the real local cluster (tests/slurm/cluster.sh): submission, failures,
re-attachment and requeue. The pretraining requeue and the workflow through ``--profile slurm`` are in
tests/test_workflow.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

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
