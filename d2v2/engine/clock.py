"""The run's clocks and its segment table (PROTOCOL.md#timing).

- **train time** (``train_time_s``): seconds spent in the training loop (data loading and steps),
  excluding evaluation, checkpoint writing and data preparation. Cumulative across restarts: it is
  stored in every checkpoint and restored from it, so it is the training time *behind those weights*.
- **train CPU time** (``train_cpu_s``): the CPU seconds the training process (all its threads, not its
  data workers) spent in those same intervals. Time spent waiting for a CPU that other work holds is not
  counted, so on a shared machine a single-threaded run spends it at the idle rate: a budget on this
  clock buys the same training on a busy machine as on an idle one (PROTOCOL.md#budgets).
- **end-to-end time** (``e2e_time_s``): every second the run's processes were alive since the first
  start, including start-up, checkpoint writing and work lost to a crash (queue waits between restarts
  are not counted). Cumulative through the segment table.

Durations come from ``time.perf_counter`` (monotonic); the device is synchronised before every stamp, so
queued GPU work is counted where it was issued (benchopt issue 581). Segment boundaries are wall-clock
UTC timestamps. The segment table ``segments.csv`` has one row per process lifetime (job id, start, end,
reason, cumulative clocks at its end); it is rewritten atomically at every logging interval, so a
process killed with SIGKILL leaves a row ending at its last heartbeat, marked ``killed`` on restart.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from d2v2.atomic import atomic_write
from d2v2.config import ConfigError

if TYPE_CHECKING:       # torch only for the annotations: collect and report read CLOCKS without importing it
    import torch

__all__ = ["synchronize", "process_start_time", "RunClock", "SegmentTable", "CLOCKS", "input_costs"]

# The clocks a run's time is counted on (PROTOCOL.md#timing): a pretraining run's summary.json has them, and
# so must any other file that records what made a run's inputs (HuBERT's labels.json).
CLOCKS = ("train_time_s", "e2e_time_s", "train_cpu_s", "device_hours")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        import torch            # already loaded by whoever made ``device``

        torch.cuda.synchronize(device)


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` seconds) at which this process started (Linux ``/proc``)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class RunClock:
    """Cumulative train-only and end-to-end clocks of one run (see module docstring).

    ``train_time_s``/``e2e_before_s`` are the totals of earlier segments (from the checkpoint and the
    segment table); this segment's end-to-end time counts from ``start_wall`` (a ``time.time()`` value:
    the CLI passes :func:`process_start_time`, so interpreter start-up and imports count; default: now).
    """

    def __init__(self, device: torch.device, train_time_s: float = 0.0, e2e_before_s: float = 0.0,
                 start_wall: float | None = None, train_cpu_s: float = 0.0):
        self.device = device
        self._train = float(train_time_s)
        self._train_since: float | None = None
        self._cpu = float(train_cpu_s)
        self._cpu_since = 0.0
        self._e2e_before = float(e2e_before_s)
        self.start_wall = min(time.time() if start_wall is None else start_wall, time.time())
        self._t0 = time.perf_counter()
        self._t0_age = time.time() - self.start_wall

    @property
    def running(self) -> bool:
        return self._train_since is not None

    def start_train(self) -> None:
        synchronize(self.device)
        self._train_since = time.perf_counter()
        self._cpu_since = time.process_time()

    def stop_train(self) -> None:
        synchronize(self.device)
        if self._train_since is not None:
            self._train += time.perf_counter() - self._train_since
            self._cpu += time.process_time() - self._cpu_since
            self._train_since = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude the enclosed work (checkpoint writing, evaluation) from the train clock."""
        was_running = self.running
        if was_running:
            self.stop_train()
        try:
            yield
        finally:
            if was_running:
                self.start_train()

    def train_time_s(self, sync: bool = True) -> float:
        """Cumulative train time; ``sync=False`` skips the device sync (a lower bound on GPU)."""
        if sync:
            synchronize(self.device)
        running = time.perf_counter() - self._train_since if self._train_since is not None else 0.0
        return self._train + running

    def train_cpu_s(self, sync: bool = True) -> float:
        """Cumulative CPU seconds of the training process inside the train clock's intervals."""
        if sync:
            synchronize(self.device)
        running = time.process_time() - self._cpu_since if self._train_since is not None else 0.0
        return self._cpu + running

    def e2e_time_s(self, sync: bool = True) -> float:
        """Cumulative end-to-end time, this process counted from its start."""
        if sync:
            synchronize(self.device)
        return self._e2e_before + self._t0_age + time.perf_counter() - self._t0


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds")


class SegmentTable:
    """One row per process lifetime of a run: ``segments.csv`` (see module docstring)."""

    FIELDS = ("segment", "job_id", "host", "pid", "start", "end", "reason", "train_time_s", "e2e_time_s")

    def __init__(self, path: str | Path, rows: list[dict] | None = None):
        self.path = Path(path)
        self.rows: list[dict] = [dict(r) for r in rows or []]

    @classmethod
    def resume(cls, path: str | Path, fallback: list[dict] | None = None,
               checkpoint_e2e_s: float | None = None) -> "SegmentTable":
        """Read the table written by earlier processes (else ``fallback``, the checkpoint's copy).

        A last row still marked ``running`` belongs to a process that died without closing it
        (SIGKILL, node failure): it becomes ``killed``. The checkpoint resumed from proves that process
        lived at least until ``checkpoint_e2e_s``: a row ending earlier (killed between writing the
        checkpoint and the heartbeat that follows it) is extended to it.
        """
        path = Path(path)
        rows = fallback or []
        if path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        table = cls(path, rows)
        if table.rows and table.rows[-1]["reason"] == "running":
            table.rows[-1]["reason"] = "killed"
            if checkpoint_e2e_s is not None and float(table.rows[-1]["e2e_time_s"] or 0) < checkpoint_e2e_s:
                table.rows[-1]["e2e_time_s"] = checkpoint_e2e_s
        return table

    @property
    def e2e_before_s(self) -> float:
        """End-to-end seconds of the earlier segments (cumulative value at the last row's end)."""
        return float(self.rows[-1]["e2e_time_s"]) if self.rows else 0.0

    @property
    def job_ids(self) -> list[str]:
        return list(dict.fromkeys(str(r["job_id"]) for r in self.rows))

    def begin(self, job_id: str, host: str, clock: RunClock) -> None:
        self.rows.append({"segment": len(self.rows), "job_id": job_id, "host": host, "pid": os.getpid(),
                          "start": _iso(clock.start_wall), "end": "", "reason": "running",
                          "train_time_s": "", "e2e_time_s": ""})
        self.update(clock)

    def update(self, clock: RunClock, reason: str = "running", train_time_s: float | None = None,
               e2e_time_s: float | None = None) -> None:
        """Record the current segment's end (now), reason and clocks (read from ``clock`` unless given),
        and rewrite the file atomically."""
        row = self.rows[-1]
        row.update(end=_iso(time.time()), reason=reason,
                   train_time_s=round(clock.train_time_s(sync=False) if train_time_s is None else train_time_s, 6),
                   e2e_time_s=round(clock.e2e_time_s(sync=False) if e2e_time_s is None else e2e_time_s, 6))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_write(self.path, "w") as f:
            f.write(buf.getvalue())


def input_costs(paths: list[str]) -> dict | None:
    """The summed :data:`CLOCKS` of the JSON files ``paths`` and the files themselves (``sources``), or
    None without files. A missing file or clock is an error naming it."""
    if not paths:
        return None
    total = dict.fromkeys(CLOCKS, 0.0)
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"input_costs: cannot read {path} ({err})") from None
        missing = [c for c in CLOCKS if not isinstance(record.get(c), (int, float))]
        if missing:
            raise ConfigError(f"input_costs: {path} has no {', '.join(missing)}")
        for c in CLOCKS:
            total[c] += float(record[c])
    return {**total, "sources": list(paths)}
