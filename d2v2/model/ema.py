"""The EMA teacher (METHOD.md#teacher): an exponential moving average of (part of) the student.

The teacher starts as an exact copy of the student module it tracks, lives in ``eval()`` mode with
``requires_grad=False``, and after every optimiser step moves towards the student:
``theta_t <- tau * theta_t + (1 - tau) * theta_s`` over its fp32 weights (fused ``torch._foreach_*``
ops). Student tensors the teacher does not have (decoders, shared parts) are ignored; parameters that
do not train (``requires_grad=False``) and buffers are copied. When ``tau >= 1`` no step is taken.

Precision: the teacher's weights are kept in fp32 (the master copy); under ``torch.autocast`` its
forward runs in the student's compute dtype (fairseq ``ema_fp32`` + ``ema_same_dtype``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_decay", "teacher_decay", "EMATeacher"]


def ema_decay(step: float, start: float, end: float, anneal_steps: float) -> float:
    """Linear schedule ``tau(t) = end - (end - start) * (1 - t / n)`` for ``t < n``, then ``end`` (fairseq
    ``get_annealed_rate``; ``t`` and ``n`` in updates or in budget fractions alike)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return end - (end - start) * (1 - step / anneal_steps)


def teacher_decay(cfg, num_updates: int, fraction: float) -> float:
    """tau after an update, from a method config's ``ema_decay`` (tau_0), ``ema_end_decay`` (tau_e) and anneal
    length: ``ema_anneal_end_fraction`` of the budget when set (the anneal fitted to the run's budget, like the
    LR, PROTOCOL.md#budgets), else ``ema_anneal_end_step`` updates (the released configs' count)."""
    if cfg.ema_anneal_end_fraction is not None:
        return ema_decay(fraction, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_fraction)
    return ema_decay(num_updates, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)


class EMATeacher(nn.Module):
    """Holds ``model``, the EMA copy of a student module; see module doc. Submodules named in
    ``shared`` are removed from the copy (the teacher uses the student's instead, METHOD.md#teacher table)."""

    def __init__(self, student: nn.Module, shared: tuple[str, ...] = ()):
        super().__init__()
        self.model = copy.deepcopy(student).float()
        for name in shared:
            setattr(self.model, name, None)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()                  # the teacher never uses dropout / layer-drop / drop-path
        return self

    @torch.no_grad()
    def step(self, student: nn.Module, decay: float) -> None:
        """One EMA update towards ``student`` (the module the teacher was copied from)."""
        if decay >= 1.0:
            return
        teacher_params = dict(self.model.named_parameters())
        ema_t, ema_s, copy_t, copy_s = [], [], [], []
        for name, p_s in student.named_parameters():
            p_t = teacher_params.get(name)
            if p_t is None:
                continue
            (ema_t if p_s.requires_grad else copy_t).append(p_t)
            (ema_s if p_s.requires_grad else copy_s).append(p_s.detach().to(p_t.dtype))
        if ema_t:
            torch._foreach_mul_(ema_t, decay)
            torch._foreach_add_(ema_t, ema_s, alpha=1.0 - decay)
        teacher_buffers = dict(self.model.named_buffers())
        for name, b_s in student.named_buffers():
            if name in teacher_buffers:
                copy_t.append(teacher_buffers[name])
                copy_s.append(b_s.to(teacher_buffers[name].dtype))
        if copy_t:
            torch._foreach_copy_(copy_t, copy_s)
