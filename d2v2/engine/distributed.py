"""torch.distributed set-up from the launcher's environment, and small helpers.

Two launchers are supported (PROTOCOL.md#slurm-through-submitit):
- ``torchrun`` (or any launcher) exporting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``;
- a SLURM job with several tasks (one per GPU, e.g. submitit's ``tasks_per_node``): without ``RANK``,
  ``submitit.helpers.TorchDistributedEnvironment().export()`` derives them from the SLURM variables.
  Do not combine the two (submitit issue 1764).

Backend: NCCL for CUDA, gloo for CPU. A single process needs no process group at all.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main", "rank", "world_size", "barrier", "all_reduce_mean", "agree_max",
           "cleanup", "local_rank"]


def _slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> int:
    """Join the process group described by the environment (if any); return the world size.

    ``device_type`` is ``"cpu"`` or ``"cuda"`` and picks the backend. Under SLURM with several tasks and
    no ``RANK``, submitit's ``TorchDistributedEnvironment`` exports the torchrun variables first (it also
    restricts ``CUDA_VISIBLE_DEVICES`` to the task's GPU).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "RANK" not in os.environ and _slurm_multi_task():
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() if torch.cuda.device_count() > 1 else 0)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on the process that writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (in place; returned for convenience)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def agree_max(values: list[float], group) -> list[float]:
    """The element-wise maximum of every process' ``values``: one all-reduce in ``group`` (a CPU group, so
    that agreeing costs no device sync); ``values`` as they are when ``group`` is None (one process)."""
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def cleanup() -> None:
    if _active():
        dist.destroy_process_group()
