"""Mixed precision (METHOD.md#mixed-precision), for pretraining, fine-tuning and the benchmarks: autocast to
the run's dtype and, in fp16, fairseq's dynamic loss scaling through ``torch.amp.GradScaler``."""
from __future__ import annotations

import torch
from pydantic import Field

from d2v2.config import Config

__all__ = ["LossScaling", "autocast", "loss_scaler"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaling(Config):
    """fairseq's fp16 loss scaling, with its defaults: ``init_scale`` (``fp16_init_scale``), ``scale_window``
    (``fp16_scale_window``: updates without an overflow before the scale doubles; ``None``: 2^14 /
    (processes x accumulation steps)) and ``min_scale`` (``min_loss_scale``: below it the run has diverged)."""

    init_scale: float = Field(2.0 ** 7, gt=0)
    scale_window: int | None = Field(None, ge=1)
    min_scale: float = Field(1e-4, gt=0)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast on ``device`` to ``precision``'s dtype (``bf16``, ``fp16``); off for ``fp32``."""
    dtype = _DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def loss_scaler(device: torch.device, precision: str, scaling: LossScaling = LossScaling(), processes: int = 1,
                accumulation: int = 1) -> torch.amp.GradScaler:
    """The fp16 loss scaler (disabled for other precisions): the scale halves on an overflow, whose step
    ``GradScaler.step`` skips, and doubles after ``scaling.scale_window`` updates without one."""
    window = scaling.scale_window or max(1, 2 ** 14 // (processes * accumulation))
    return torch.amp.GradScaler(device.type, init_scale=scaling.init_scale, growth_interval=window,
                                enabled=precision == "fp16")
