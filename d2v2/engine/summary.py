"""A pretraining run's ``summary.json``: what it trained, on which clocks, at what throughput and
utilisation, with which checkpoints and segments (ARCHITECTURE.md, "Pretraining runner"). Written at
every exit of the run, also when it diverged or was interrupted."""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from d2v2.engine.flops import peak_flops, utilisation

__all__ = ["run_summary", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by tensors; CPU: max resident set size of the main process."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_summary(*, status: str, identity: dict[str, Any], record: dict[str, Any], cfg, fraction_consumed: float,
                flops_per_update: int | None, data_wait_s: float, device: torch.device, world: int,
                run_dir: Path, segments, provenance: dict[str, Any]) -> dict[str, Any]:
    """The summary of a run (``cfg``: its PretrainRunConfig) from its clocks and progress (``record``, the
    metrics file's ``pretrain`` entry) and what the runner measured."""
    train_s = max(record["train_time_s"], 1e-9)
    return {
        "status": status,
        "identity": identity,
        **record,
        "budget": cfg.budget.model_dump(), "budget_fraction_consumed": fraction_consumed,
        "throughput": {"samples_per_s": record["samples"] / train_s, "tokens_per_s": record["tokens"] / train_s,
                       "clock": "train_time_s"},
        # FLOPs counted on the first update (d2v2.engine.flops); MFU on the train-only clock
        "compute": {**utilisation(flops_per_update, record["updates"], record["train_time_s"],
                                  peak_flops(device, cfg.peak_flops), world),
                    "clock": "train_time_s", "compiled": cfg.compile, "compile_mode": cfg.compile_mode,
                    "precision": cfg.precision},
        "data_wait": {"seconds": data_wait_s, "share_of_train_time": data_wait_s / train_s},
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss_main_process",
        "batch": {"per_device": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": world,
                  "effective": cfg.batch_size * cfg.grad_accum * world, "reference": cfg.reference_batch_size},
        "checkpoints": sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").glob("*.pt")),
        "segments": segments.rows,
        "provenance": {**provenance, "slurm_job_ids": [j for j in segments.job_ids if not j.startswith("local-")]},
    }
