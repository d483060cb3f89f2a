"""FLOPs per update and model FLOPs utilisation (MFU).

The FLOPs of an update are counted, not estimated: :func:`count_flops` runs the real step (forward,
backward and whatever else it does) under ``torch.utils.flop_counter.FlopCounterMode``, which counts the
matrix multiplications, convolutions and attention kernels, forward and backward, as they are
dispatched. Element-wise work (norms, GELU, the EMA step, the optimiser) is not counted, as in the
usual MFU convention (PaLM, appendix B). MFU is the achieved rate ``FLOPs per update x updates /
train-only seconds`` over the device's peak: by default the dense bf16 tensor-core peak of the
device named in :data:`PEAK_FLOPS`, none on a CPU (PROTOCOL.md#timing).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_FLOPS", "count_flops", "peak_flops", "utilisation"]

# Dense bf16 tensor-core peak per device (vendor data sheets; without sparsity), matched in this order
# against torch.cuda.get_device_name.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def count_flops(step: Callable[[], object]) -> int:
    """Run ``step()`` once and return the FLOPs it dispatched (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, configured: float | None = None) -> float | None:
    """The peak FLOP/s MFU is measured against: ``configured`` when given, else the device's dense bf16
    peak from :data:`PEAK_FLOPS`; ``None`` on a CPU or an unlisted GPU (then no MFU is reported)."""
    if configured is not None:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def utilisation(flops_per_update: int | None, updates: int, train_time_s: float, peak: float | None,
                processes: int = 1) -> dict[str, float | None]:
    """``flops_per_update`` (one process), the achieved FLOP/s of one process and its MFU (or None)."""
    if not flops_per_update or train_time_s <= 0:
        return {"flops_per_update": flops_per_update, "achieved_flops_per_s": None, "peak_flops_per_s": peak,
                "mfu": None, "processes": processes}
    achieved = flops_per_update * updates / train_time_s
    return {"flops_per_update": flops_per_update, "achieved_flops_per_s": achieved, "peak_flops_per_s": peak,
            "mfu": achieved / peak if peak else None, "processes": processes}
