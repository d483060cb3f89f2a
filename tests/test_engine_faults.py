"""Faults during pretraining: a failed save or a full disk stops the run promptly and loses nothing, Ctrl-C
checkpoints like SIGTERM, stale temporary files are cleaned, the EMA step never repeats an update count."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from d2v2.engine.checkpoint import load_checkpoint
from d2v2.engine.events import read_events
from d2v2.engine.pretrain import main, run
from test_engine_pretrain import data_root, run_config  # noqa: F401  (fixture re-used)
from test_engine_resume import assert_same_state

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _start(config: Path, out: Path, **kwargs) -> subprocess.Popen:
    """A pretraining subprocess in its own process group (as a shell job: Ctrl-C reaches every member)."""
    return subprocess.Popen([sys.executable, "-m", "d2v2", "pretrain", "--config", str(config), "--out", str(out)],
                            env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _wait_for_checkpoint_last(proc: subprocess.Popen, out: Path, updates: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        events = read_events(out / "events.jsonl", "checkpoint") if (out / "events.jsonl").exists() else []
        if any(e["value"]["path"] == "checkpoint_last.pt" and e["value"]["updates"] >= updates for e in events):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint_last after {updates} updates (exit {proc.poll()}): "
                         f"{proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def _mount_tmpfs(path: Path, size: int) -> bool:
    """A real filesystem of ``size`` bytes at ``path`` (root only); False where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


LONG_RUN = dict(budget={"kind": "updates", "value": 400}, checkpoint={"fractions": [1.0], "last_every_s": 0.01},
                log_every=1, data={"num_workers": 1})


@pytest.mark.slow    # two subprocess runs: ~20 s
def test_a_full_disk_stops_the_run_promptly_naming_the_file_and_keeps_the_last_checkpoint(tmp_path, data_root):
    """With a data worker, a save that fails on a full filesystem used to hang the process forever."""
    cfg = run_config(data_root, **LONG_RUN)
    config = _write_config(tmp_path, cfg)
    first = tmp_path / "first"
    proc = _start(config, first)
    _wait_for_checkpoint_last(proc, first, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    proc.stderr.close()
    size = (first / "checkpoint_last.pt").stat().st_size

    disk = tmp_path / "disk"
    disk.mkdir()
    room = -(-(_disk_bytes(first) + size // 2) // 4096) * 4096      # the next checkpoint cannot fit
    mounted = _mount_tmpfs(disk, room)
    try:
        if mounted:
            out, limit = disk / "run", None
            shutil.copytree(first, out)
        else:       # no tmpfs here: the same failure from a per-process file size limit (EFBIG)
            out = first
            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
        before = (out / "checkpoint_last.pt").read_bytes()
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "d2v2", "pretrain", "--config", str(config), "--out", str(out)],
                              env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=limit)
        elapsed = time.time() - start
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"could not write checkpoint {out / 'checkpoint_last.pt'}" in done.stderr
        assert "the previous checkpoint is unchanged" in done.stderr
        if mounted:
            assert "no space left on device" in done.stderr
        assert "Traceback" not in done.stderr
        assert (out / "checkpoint_last.pt").read_bytes() == before
        assert not [p.name for p in out.rglob(".*.tmp*")]
        assert elapsed < 60
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_failing_save_is_a_clean_error_with_exit_2(tmp_path, data_root, monkeypatch, capsys):
    """ENOSPC in the middle of writing a checkpoint (simulated in torch.save): exit 2 with one line that
    names the file and the cause, ``run_stop`` says so, the last good checkpoint and no temporary remain,
    and the data worker is gone."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("progress", {}).get("updates", 0) >= 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    config = _write_config(tmp_path, run_config(data_root, **LONG_RUN))
    assert main(["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: could not write checkpoint {out / 'checkpoint_last.pt'}: no space left on device" in err
    stop = read_events(out / "events.jsonl", "run_stop")[-1]
    assert stop["metadata"] == {"status": "aborted", "exit_code": 2}
    assert load_checkpoint(out / "checkpoint_last.pt")["progress"]["updates"] == 2
    assert not [p.name for p in out.rglob(".*.tmp*")]
    assert multiprocessing.active_children() == []


@pytest.mark.slow    # a subprocess start-up + two runs: ~15 s
def test_ctrl_c_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, data_root):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does; the data worker gets it too)."""
    changes = dict(LONG_RUN, budget={"kind": "updates", "value": 40})
    reference = tmp_path / "reference"
    assert run(run_config(data_root, **changes), reference) == 0
    cfg = run_config(data_root, **changes)
    out = tmp_path / "run"
    proc = _start(_write_config(tmp_path, cfg), out)
    _wait_for_checkpoint_last(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, proc.stderr.read()[-2000:]
    proc.stderr.close()
    stopped_at = load_checkpoint(out / "checkpoint_last.pt")["progress"]["updates"]
    assert 3 <= stopped_at < 40
    assert read_events(out / "events.jsonl", "run_stop")[-1]["metadata"]["status"] == "interrupted"
    assert run(cfg, out) == 0
    assert_same_state(load_checkpoint(out / "checkpoint_last.pt"), load_checkpoint(reference / "checkpoint_last.pt"))
    assert "signal:SIGINT" in (out / "segments.csv").read_text()


def test_the_ema_step_never_sees_a_repeated_update_count(tmp_path, data_root, monkeypatch):
    """fairseq skips the EMA step when the update count does not advance (its resume path); ours must
    never call ``after_step`` twice with one count, across an interruption and a resume."""
    from d2v2.data2vec2 import Data2Vec2

    after_step, seen = Data2Vec2.after_step, []

    def recording(self, num_updates, fraction):
        after_step(self, num_updates, fraction)
        seen.append(num_updates)
        if num_updates == 4 and seen.count(4) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Data2Vec2, "after_step", recording)
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": "updates", "value": 8})
    assert run(cfg, out) == 128 + signal.SIGINT
    assert run(cfg, out) == 0
    assert seen == list(range(1, 9))


def test_stale_temporary_checkpoints_are_removed_at_start_and_at_the_end(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / ".checkpoint_last.pt.k3j2.tmp", out / ".checkpoint_last.pt.k3j2.tmp.prev",
             out / "checkpoints" / ".checkpoint_f0.500.pt.x9.tmp"]
    for path in stale:
        path.write_bytes(b"left by a SIGKILL mid-write")
    assert run(run_config(data_root), out) == 0
    assert not any(p.exists() for p in stale)
    assert str(stale[0]) in capsys.readouterr().err
    assert (out / "DONE").exists() and load_checkpoint(out / "checkpoint_last.pt")


def test_a_missing_data_root_leaves_no_run_directory(tmp_path, data_root, capsys):
    out = tmp_path / "never"
    config = _write_config(tmp_path, run_config(data_root))
    assert main(["--config", str(config), "--out", str(out), f"data.root={tmp_path / 'nodata'}"]) == 2
    assert "data.root: not found" in capsys.readouterr().err
    assert not out.exists()


def test_a_torn_event_line_is_cut_on_resume_and_collect_reads_the_log(tmp_path, data_root, signal_after_update):
    """Interrupted run, its log torn as by a kill mid-write, resumed: the log is valid JSON lines again."""
    from d2v2.analysis.collect import collect_progress

    signal_after_update(3)
    out = tmp_path / "run"
    cfg = run_config(data_root, log_every=1)
    assert run(cfg, out) == 128 + signal.SIGTERM
    log = out / "events.jsonl"
    with open(log, "a") as f:
        f.write('{"time_ms": 1, "key": "train_progress", "value": {"upd')
    assert run(cfg, out) == 0
    text = log.read_text()
    assert all(json.loads(line) for line in text.splitlines())
    assert "removed a torn last line" in text
    assert collect_progress([out])["updates"].max() == 6
