"""Resuming: kill -9 + restart reproduces an uninterrupted run; corrupt checkpoints are rejected and the
previous good one is used; clocks and the segment table survive restarts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from d2v2.engine.checkpoint import (CheckpointError, load_checkpoint, load_latest, previous_path,
                                    save_checkpoint)
from d2v2.engine.clock import RunClock, SegmentTable
from d2v2.engine.events import read_events
from d2v2.engine.pretrain import run
from d2v2.engine.sampler import ResumableBatchSampler
from test_engine_pretrain import data_root, run_config  # noqa: F401  (fixture re-used)

REPO = Path(__file__).resolve().parents[1]


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical model and optimiser state."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


# ---------------------------------------------------------------- checkpoint files
def test_checkpoint_roundtrip_keeps_previous(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    save_checkpoint({"step": torch.tensor(2)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(previous_path(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.prev.pt", "checkpoint_last.pt"]


def test_truncated_corrupt_and_foreign_checkpoints_are_rejected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.randn(256, 256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF                # a bit flip inside the tensor data: torch.load misses it
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{path} is corrupt: CRC mismatch"):
        load_checkpoint(path)
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a d2v2 checkpoint"):
        load_checkpoint(path)
    save_checkpoint({"w": torch.zeros(1)}, path)
    obj = load_checkpoint(path)
    torch.save({**obj, "version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_latest_falls_back_to_previous(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    path.write_bytes(path.read_bytes()[:100])
    ckpt, used, problems = load_latest(path)
    assert ckpt["step"] == 1 and used == previous_path(path)
    assert len(problems) == 1 and str(path) in problems[0]
    previous_path(path).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(path)


# ---------------------------------------------------------------- clocks, segments, sampler
def test_train_clock_pauses_and_accumulates():
    clock = RunClock(torch.device("cpu"), train_time_s=10.0, e2e_before_s=100.0)
    clock.start_train()
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.2)                           # e.g. a checkpoint write: not train time
    clock.stop_train()
    assert 10.04 < clock.train_time_s() < 10.2
    assert clock.e2e_time_s() > 100.25


def test_the_cpu_clock_counts_work_not_waiting():
    """A process that waits for the CPU (here: sleeps) spends train time but no train CPU time."""
    clock = RunClock(torch.device("cpu"), train_cpu_s=3.0)
    clock.start_train()
    time.sleep(0.3)
    idle = clock.train_cpu_s()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    clock.stop_train()
    assert 3.0 <= idle < 3.1
    assert 3.3 <= clock.train_cpu_s() < 3.45 and clock.train_time_s() >= 0.6


def test_segment_table_marks_a_dead_process_killed(tmp_path):
    path = tmp_path / "segments.csv"
    table = SegmentTable(path)
    clock = RunClock(torch.device("cpu"), e2e_before_s=5.0)
    time.sleep(0.01)
    table.begin("12", "host", clock)
    table = SegmentTable.resume(path)                     # the process died without closing its row
    assert table.rows[-1]["reason"] == "killed" and table.job_ids == ["12"]
    assert table.e2e_before_s > 5.0
    # killed after writing a checkpoint but before the heartbeat after it: the checkpoint's clock is the end
    assert SegmentTable.resume(path, checkpoint_e2e_s=1.0).e2e_before_s == table.e2e_before_s
    assert SegmentTable.resume(path, checkpoint_e2e_s=table.e2e_before_s + 2.5).e2e_before_s == \
        table.e2e_before_s + 2.5


def test_sampler_resumes_mid_epoch_and_shards():
    full = ResumableBatchSampler(20, 2, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(25)]                 # crosses two epoch boundaries (10 batches each)
    resumed = iter(ResumableBatchSampler(20, 2, seed=3, start=13))
    assert [next(resumed) for _ in range(12)] == stream[13:]
    assert sorted(i for _, i in sum(stream[:10], [])) == list(range(20))   # an epoch visits every item once
    assert stream[0] != stream[10] and stream[10][0][0] == 1
    ranks = [iter(ResumableBatchSampler(20, 1, seed=3, rank=r, world_size=2)) for r in range(2)]
    sharded = [next(ranks[0]) + next(ranks[1]) for _ in range(10)]
    assert sharded == stream[:10]                          # 2 processes x 1 == 1 process x 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, seed=0, world_size=2)


# ---------------------------------------------------------------- end to end
@pytest.mark.slow    # a subprocess start-up + two runs: ~15 s idle, >30 s on a loaded 2-core machine
def test_kill9_then_resume_reproduces_the_uninterrupted_run(tmp_path, data_root):
    """SIGKILL a real run after it wrote checkpoint_last, restart it: bit-identical final weights, the
    lost work shows in the end-to-end clock only, and the segment table has both processes."""
    changes = dict(budget={"kind": "updates", "value": 14}, checkpoint={"fractions": [1.0], "last_every_s": 0.01},
                   log_every=1)
    reference = tmp_path / "reference"
    assert run(run_config(data_root, **changes), reference) == 0

    killed = tmp_path / "killed"
    cfg = run_config(data_root, **changes, data={"num_workers": 1})   # worker count does not matter
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "d2v2", "pretrain", "--config", str(config), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        saved = [e for e in read_events(killed / "events.jsonl", "checkpoint")] if (killed / "events.jsonl").exists() else []
        if any(e["value"]["path"] == "checkpoint_last.pt" and e["value"]["updates"] >= 5 for e in saved):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = load_checkpoint(killed / "checkpoint_last.pt")
    assert 5 <= at_kill["progress"]["updates"] < 14
    first = list(__import__("csv").DictReader(open(killed / "segments.csv")))
    assert len(first) == 1 and first[0]["reason"] == "running"

    assert run(cfg, killed) == 0
    assert_same_state(load_checkpoint(killed / "checkpoint_last.pt"), load_checkpoint(reference / "checkpoint_last.pt"))
    summary = json.loads((killed / "summary.json").read_text())
    rows = summary["segments"]
    assert [r["reason"] for r in rows] == ["killed", "completed"]
    assert summary["updates"] == 14
    # train time continues from the checkpoint's; end-to-end also counts the killed process' whole life
    assert summary["train_time_s"] > at_kill["clock"]["train_time_s"]
    assert summary["e2e_time_s"] == pytest.approx(float(rows[-1]["e2e_time_s"]), abs=1e-3)
    assert summary["e2e_time_s"] > float(rows[0]["e2e_time_s"]) >= at_kill["clock"]["e2e_time_s"]


def test_a_finished_run_saves_its_last_state_once(tmp_path, data_root):
    """A periodic save due at the last update is the final save: the same state is not written twice, and
    checkpoint_last.prev.pt keeps the one before it."""
    changes = dict(budget={"kind": "updates", "value": 6}, checkpoint={"fractions": [1.0], "last_every_s": 1e-6})
    assert run(run_config(data_root, **changes), tmp_path) == 0
    saved = [e["value"]["updates"] for e in read_events(tmp_path / "events.jsonl", "checkpoint")
             if e["value"]["path"] == "checkpoint_last.pt"]
    assert saved == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(previous_path(tmp_path / "checkpoint_last.pt"))["progress"]["updates"] == 5


def test_truncated_checkpoint_last_is_reported_and_the_previous_one_used(tmp_path, data_root, signal_after_update, capsys):
    """Interrupt a run, truncate its checkpoint_last: the resume names the bad file, continues from
    checkpoint_last.prev.pt and still ends with the uninterrupted run's weights."""
    changes = dict(budget={"kind": "updates", "value": 8}, checkpoint={"fractions": [1.0], "last_every_s": 0.01})
    reference = tmp_path / "reference"
    assert run(run_config(data_root, **changes), reference) == 0

    signal_after_update(5, signal.SIGUSR2)
    out = tmp_path / "run"
    cfg = run_config(data_root, **changes)
    assert run(cfg, out) == 128 + signal.SIGUSR2
    last = out / "checkpoint_last.pt"
    assert load_checkpoint(previous_path(last))["progress"]["updates"] == 4
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    assert run(cfg, out) == 0
    err = capsys.readouterr().err
    assert f"rejected checkpoint {last} is truncated" in err and "checkpoint_last.prev.pt" in err
    assert_same_state(load_checkpoint(last), load_checkpoint(reference / "checkpoint_last.pt"))
    start = read_events(out / "events.jsonl", "run_start")[-1]
    assert start["metadata"]["resumed_from"].endswith("checkpoint_last.prev.pt") and start["metadata"]["updates"] == 4
    # the truncated file was moved aside, so no save rotated it over the good previous copy
    assert load_checkpoint(previous_path(last))["progress"]["updates"] >= 4
    assert (out / "checkpoint_last.pt.corrupt").stat().st_size == 1000
