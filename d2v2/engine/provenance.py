"""Where a result came from: code version, software, hardware, host and jobs (PROTOCOL.md#aggregation-and-claims:
benchopt's provenance columns)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from d2v2.launch.local import ALLOCATOR_ENV

__all__ = ["provenance", "job_id", "device_name"]

_PACKAGES = ("torch", "torchvision", "torchaudio", "numpy", "pydantic", "snakemake", "submitit", "d2v2-harness")
_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def job_id() -> str:
    """The SLURM job id (``<array job>_<task>`` for arrays), else ``local-<pid>``."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID", f"local-{os.getpid()}")


def device_name(device: torch.device | str | None = None) -> str:
    """GPU model name on CUDA, else the CPU model (from ``/proc/cpuinfo`` when available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(preset: str | None = None, device: torch.device | str | None = None,
               device_count: int | None = None) -> dict:
    """A JSON-able record of code, software, hardware and job ids.

    ``device_count`` is the number of devices the run used (its world size); by default the visible
    GPUs on CUDA, else 1.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    versions = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    if device_count is None:
        device_count = torch.cuda.device_count() if device.type == "cuda" else 1
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "device": device.type,
        "device_name": device_name(device),
        "device_count": device_count,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # None: the allocator's default; a CPU-seconds budget buys more training under the launcher's settings
        "allocator": {name: os.environ.get(name) for name in ALLOCATOR_ENV},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "slurm_job_ids": [job_id()] if "SLURM_JOB_ID" in os.environ else [],
        "preset": preset,
        "argv": sys.argv,
    }
