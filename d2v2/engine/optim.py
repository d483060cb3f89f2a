"""Optimiser, parameter groups and the learning-rate schedule (METHOD.md#pretraining-recipes, METHOD.md#fine-tuning).

data2vec 2.0 uses AdamW with decoupled weight decay, no decay on biases, 1-D parameters and ALiBi
scales, a linear warm-up from 0 and a cosine decay (METHOD.md#pretraining-recipes). Fine-tuning adds layer-wise LR decay
(METHOD.md#fine-tuning-images) and, for speech, fairseq's tri-stage schedule (METHOD.md#fine-tuning-speech).

The schedule is a function of the *fraction of the budget consumed* (``lr_at``): with an update budget
the fraction is ``updates / max_updates`` (the paper's schedule exactly); with a time budget it is the
fraction of the time spent, so a run stopped by its clock still completes its warm-up and decay
(PROTOCOL.md#budgets).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from d2v2.config import Config

__all__ = ["OptimConfig", "param_groups", "build_optimizer", "lr_at", "set_lr", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "tristage", "constant")


class OptimConfig(Config):
    """AdamW + schedule. Defaults: data2vec 2.0 ViT-B image pretraining (METHOD.md#pretraining-recipes).

    ``warmup_fraction`` is the warm-up length as a fraction of the budget (paper: 50,040 of 375,300
    updates = 0.1333). ``clip_grad`` is the max global gradient norm; ``None`` disables clipping.
    ``hold_fraction`` and ``init_lr_scale`` are used by the tri-stage schedule only.
    """

    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine", "linear", "tristage", "constant"] = "cosine"
    warmup_fraction: float = Field(50_040 / 375_300, ge=0, le=1)
    hold_fraction: float = Field(0.0, ge=0, le=1)
    final_lr: float = Field(0.0, ge=0)
    init_lr_scale: float = Field(0.0, ge=0, le=1)
    clip_grad: float | None = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1) (got {self.betas})")
        if self.warmup_fraction + self.hold_fraction > 1.0:
            raise ValueError("warmup_fraction + hold_fraction must be <= 1")
        if self.final_lr > self.lr:
            raise ValueError(f"final_lr ({self.final_lr}) must not exceed lr ({self.lr})")
        return self

    def lr_at(self, fraction: float) -> float:
        """This config's learning rate after ``fraction`` of the budget (see :func:`lr_at`)."""
        return lr_at(fraction, self.lr, self.warmup_fraction, self.final_lr, self.schedule,
                     self.hold_fraction, self.init_lr_scale)


def _no_decay(name: str, param: nn.Parameter, names: set[str]) -> bool:
    return name.endswith(".bias") or param.ndim <= 1 or name in names or name.split(".")[-1] in names


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = (),
                 layer_decay: float | None = None, layer_id: Callable[[str], int] | None = None,
                 num_layers: int | None = None) -> list[dict]:
    """Split the trainable parameters into optimiser groups.

    No weight decay for biases, 1-D parameters (norms, ALiBi scales) and the names in
    ``no_weight_decay`` (full names, or a last name component such as ``"alibi_scale"``).
    With ``layer_decay``, parameter ``name`` gets ``lr_scale = layer_decay ** (num_layers - layer_id(name))``
    (METHOD.md#fine-tuning-images: block i of N gets LD^(N+1-i) when ``layer_id`` returns i for it and N+1 for the head).
    Each group carries ``lr_scale`` (used by :func:`set_lr`) and ``param_names``.
    """
    if layer_decay is not None and (layer_id is None or num_layers is None):
        raise ValueError("param_groups: layer_decay needs layer_id and num_layers")
    names = set(no_weight_decay)
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _no_decay(name, param, names)
        scale = 1.0 if layer_decay is None else layer_decay ** (num_layers - layer_id(name))
        group = groups.setdefault((decay, scale), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the config's betas, eps and weight decay (groups may override ``weight_decay``), in
    PyTorch's fused implementation: one kernel for all parameters, on a GPU and on a CPU (where it takes a
    quarter of the per-parameter loop's time and agrees with it to float rounding; docs/BENCHMARKS.md)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=True)


def lr_at(fraction: float, peak_lr: float, warmup_fraction: float, final_lr: float = 0.0,
          schedule: str = "cosine", hold_fraction: float = 0.0, init_lr_scale: float = 0.0) -> float:
    """Learning rate after ``fraction`` (in [0, 1]) of the budget.

    - warm-up: linear from ``init_lr_scale * peak_lr`` (0 by default, as in fairseq/MAE) to ``peak_lr``;
    - ``cosine``: half-cosine from ``peak_lr`` to ``final_lr`` (METHOD.md#pretraining-recipes);
    - ``linear``: linear decay to ``final_lr`` (fairseq ``polynomial_decay`` with power 1, METHOD.md#fine-tuning-text);
    - ``tristage``: hold ``peak_lr`` for ``hold_fraction``, then exponential decay to ``final_lr``
      (fairseq ``tri_stage``, METHOD.md#fine-tuning-speech: 10% / 40% / 50%, final = 0.05 x peak);
    - ``constant``: ``peak_lr`` after the warm-up.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}' unknown (have {', '.join(SCHEDULES)})")
    f = min(max(fraction, 0.0), 1.0)
    if f < warmup_fraction:
        start = init_lr_scale * peak_lr
        return start + (peak_lr - start) * f / warmup_fraction
    if schedule == "constant":
        return peak_lr
    hold = hold_fraction if schedule == "tristage" else 0.0
    if f < warmup_fraction + hold:
        return peak_lr
    span = 1.0 - warmup_fraction - hold
    progress = 1.0 if span <= 0 else (f - warmup_fraction - hold) / span
    if schedule == "cosine":
        return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak_lr + (final_lr - peak_lr) * progress
    if final_lr <= 0:
        raise ValueError("the tristage schedule decays exponentially: final_lr must be > 0")
    return peak_lr * (final_lr / peak_lr) ** progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
