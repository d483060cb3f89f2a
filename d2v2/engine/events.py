"""The run's event log: JSON lines with MLPerf-logging-style keys.

Each line is ``{"time_ms": <unix ms>, "key": ..., "value": ..., "metadata": {...}}`` and is flushed
as it is written, so a killed run's log is complete up to its last line. Keys used by the runner:
``run_start``, ``seed``, ``global_batch_size``, ``train_progress`` (one line per logging interval; its
value holds ``updates``, ``train_samples``, ``epoch``, ``train_time_s``, ``e2e_time_s``, ``loss``, ``lr``,
``diagnostics`` and ``throughput``), ``checkpoint``, ``warning`` and ``run_stop`` (metadata ``status``:
``success``, ``interrupted``, ``diverged`` or ``aborted``). Only rank 0 writes.

A process killed mid-write leaves a torn last line. The writer cuts it off when the log is reopened (and
logs a ``warning`` saying so); the reader skips a torn last line, and recovers the event that an older
writer appended onto a torn line. Both say what they did (:class:`EventLogWarning`).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

__all__ = ["EventLog", "EventLogWarning", "iter_events", "read_events"]

_START = '{"time_ms"'          # how every line this module writes begins


class EventLogWarning(UserWarning):
    """An event log had a torn line (a process killed mid-write); the message says what was done."""


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become strings, so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class EventLog:
    """Append-only JSONL log; a no-op when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        torn = self._cut_torn_line() if enabled else 0
        self._file = open(self.path, "a", buffering=1) if enabled else None
        if torn:
            self.log("warning", f"{self.path.name}: removed a torn last line ({torn} bytes) left by a killed "
                                "process")

    def _cut_torn_line(self) -> int:
        """Truncate an unterminated last line, so that the next event starts a line of its own."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return 0
            f.seek(0)
            keep = f.read().rfind(b"\n") + 1
            f.truncate(keep)
        return size - keep

    def log(self, key: str, value: Any = None, **metadata: Any) -> None:
        if self._file is None:
            return
        line = {"time_ms": int(time.time() * 1000), "key": key, "value": _jsonable(value)}
        if metadata:
            line["metadata"] = _jsonable(metadata)
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def iter_events(path: str | Path) -> Iterator[dict]:
    """The events of a log in order. A torn last line is skipped and a torn line followed by an event is
    repaired, each with an :class:`EventLogWarning`; any other line that is not JSON is a ``ValueError``
    naming the file and the line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
            continue
        except json.JSONDecodeError:
            pass
        start = line.rfind(_START)
        if start > 0:
            try:
                event = json.loads(line[start:])
            except json.JSONDecodeError:
                pass
            else:
                warnings.warn(f"{path}:{i}: dropped a torn event before the one on this line", EventLogWarning)
                yield event
                continue
        if i == len(lines):
            warnings.warn(f"{path}:{i}: skipped a torn last line (a process killed mid-write)", EventLogWarning)
            return
        raise ValueError(f"{path}:{i}: not valid JSON")


def read_events(path: str | Path, key: str | None = None) -> list[dict]:
    """All events of a log (optionally only those with ``key``); see :func:`iter_events`."""
    return [e for e in iter_events(path) if key is None or e.get("key") == key]
