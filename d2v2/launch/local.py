"""Local backend: run a command as a child process of this machine with a fixed thread budget.

Snakemake runs several jobs at once on a few cores; each job gets exactly its rule's ``threads`` (the
OpenMP/MKL pools torch sizes itself from), so concurrent runs share the CPU fairly and timings are
comparable; glibc's allocator is told to keep freed memory (:data:`ALLOCATOR_ENV`). SIGTERM/SIGINT/SIGUSR2
are forwarded, so stopping Snakemake lets a pretraining run write ``checkpoint_last`` and exit cleanly (it
resumes on the next launch).
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Mapping, Sequence

__all__ = ["job_env", "run_local", "FORWARDED_SIGNALS", "ALLOCATOR_ENV"]

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# glibc malloc: serve every block below 1 GiB from the heap and keep up to 4 GiB of freed memory there.
# By default a CPU step's large tensors are mapped fresh and returned each step, and the kernel's page
# faults on that memory are system time of the training process, which a CPU-seconds budget counts
# (docs/BENCHMARKS.md#allocator). Other allocators ignore these; a value already set wins.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def job_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every math-library pool set to ``threads`` and
    :data:`ALLOCATOR_ENV` where ``base`` does not set it.

    torch sizes its intra-op pool from ``OMP_NUM_THREADS``; ``D2V2_THREADS`` is the same number for code
    that sizes anything else (data-loader workers) from the launcher's budget.
    """
    if threads < 1:
        raise ValueError(f"threads: must be >= 1 (got {threads})")
    env = {**ALLOCATOR_ENV, **(os.environ if base is None else base)}
    env.update({name: str(threads) for name in _THREAD_VARS})
    env["D2V2_THREADS"] = str(threads)
    return env


def run_local(command: Sequence[str], threads: int = 1, cwd: str | None = None) -> int:
    """Run ``command`` with ``threads`` threads, forwarding termination signals; return its exit code."""
    if not command:
        raise ValueError("no command given (expected: launch [options] -- COMMAND ...)")
    child = subprocess.Popen(list(command), env=job_env(threads), cwd=cwd)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
