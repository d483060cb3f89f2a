"""The run's event log: JSON lines with MLPerf-logging-style keys.

Each line is ``{"time_ms": <unix ms>, "key": ..., "value": ..., "metadata": {...}}`` and is flushed
as it is written, so a killed run's log is complete up to its last line. Keys used by the runner:
``run_start``, ``seed``, ``global_batch_size``, ``train_progress`` (one line per logging interval; its
value holds ``updates``, ``train_samples``, ``epoch``, ``train_time_s``, ``e2e_time_s``, ``loss``, ``lr``,
``diagnostics`` and ``throughput``), ``checkpoint``, ``warning`` and ``run_stop`` (metadata ``status``:
``success``, ``interrupted``, ``diverged`` or ``aborted``). Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "read_events"]


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
        self._file = open(self.path, "a", buffering=1) if enabled else None

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


def read_events(path: str | Path, key: str | None = None) -> list[dict]:
    """Parse an event log (optionally only one key); a torn last line (crash mid-write) is skipped."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key is None or event.get("key") == key:
            events.append(event)
    return events
