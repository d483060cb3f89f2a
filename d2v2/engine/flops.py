"""FLOPs per update and model FLOPs utilisation (MFU).

The FLOPs of an update are counted, not estimated: :func:`count_flops` runs the real step (forward,
backward and whatever else it does) under ``torch.utils.flop_counter.FlopCounterMode``, which counts the
matrix multiplications, convolutions and attention kernels, forward and backward, as they are
dispatched. Element-wise work (norms, GELU, the EMA step, the optimiser) is not counted, as in the
usual MFU convention (PaLM, appendix B). MFU is the achieved rate ``FLOPs per update x updates /
train-only seconds`` over the device's peak: by default the dense bf16 tensor-core peak of the
device named in :data:`PEAK_FLOPS`, none on a CPU (PROTOCOL.md#timing).

:func:`count_step` also counts the ATen kernels the step dispatched (views excluded): about one launch each on
a GPU, where a step of many small kernels is bound by the host issuing them rather than by its FLOPs; the step
time per kernel tells which (docs/BENCHMARKS.md#the-gpu-path).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_FLOPS", "count_flops", "count_kernels", "count_step", "peak_flops", "utilisation"]

# Dense bf16 tensor-core peak per device (vendor data sheets; without sparsity), matched in this order
# against torch.cuda.get_device_name.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


class _KernelCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched below autograd that are not views (a view launches nothing)."""

    def __init__(self):
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def count_step(step: Callable[[], object]) -> tuple[int, int]:
    """Run ``step()`` once and return ``(FLOPs, kernels)``: the FLOPs it dispatched (forward and backward)
    and how many ATen kernels, views excluded."""
    with FlopCounterMode(display=False) as flops, _KernelCounter() as kernels:
        step()
    return int(flops.get_total_flops()), kernels.kernels


def count_kernels(step: Callable[[], object]) -> int:
    """Run ``step()`` once and return how many ATen kernels it dispatched, views excluded (no FLOP counter: it
    also counts code whose modules ``FlopCounterMode``'s module tracker cannot follow)."""
    with _KernelCounter() as kernels:
        step()
    return kernels.kernels


def count_flops(step: Callable[[], object]) -> int:
    """Run ``step()`` once and return the FLOPs it dispatched (forward and backward)."""
    return count_step(step)[0]


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
