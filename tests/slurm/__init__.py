"""Test helpers for the local SLURM cluster (``tests/slurm/cluster.sh``).

Tests that need SLURM call :func:`require_slurm`: it skips with a visible reason when the cluster is not
running, except under ``D2V2_REQUIRE_SLURM=1`` (CI), where a missing cluster is a failure.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
REPO = CLUSTER_SH.parents[2]


def slurm_running() -> bool:
    try:
        return subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_slurm() -> None:
    if slurm_running():
        return
    reason = "local SLURM cluster not running (start it: bash tests/slurm/cluster.sh start)"
    if os.environ.get("D2V2_REQUIRE_SLURM") == "1":
        pytest.fail(f"D2V2_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def partition() -> str:
    """The test cluster's partition (cluster.sh's D2V2_SLURM_PARTITION)."""
    return os.environ.get("D2V2_SLURM_PARTITION", "debug")


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-j", str(job_id), "-o", "State%30"],
                         capture_output=True, text=True).stdout.split()
    return out[-1] if out else "UNKNOWN"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
