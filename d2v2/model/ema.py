"""The EMA teacher (METHOD.md#teacher): an exponential moving average of (part of) the student.

The teacher starts as an exact copy of the student module it tracks, lives in ``eval()`` mode with
``requires_grad=False``, and after every optimiser step moves towards the student:
``theta_t <- tau * theta_t + (1 - tau) * theta_s`` over its fp32 weights (fused ``torch._foreach_*``
ops). Student tensors the teacher does not have (decoders, shared parts) are ignored; parameters that
do not train (``requires_grad=False``) and buffers are copied. When ``tau >= 1`` no step is taken.

Precision: the teacher's weights are kept in fp32 (the master copy); under ``torch.autocast`` its
forward runs in the student's compute dtype (fairseq ``ema_fp32`` + ``ema_same_dtype``). Autocast would cast
every Linear and convolution weight of the teacher to that dtype at every forward, a kernel each on a GPU,
whose steps are bound by issuing kernels (docs/BENCHMARKS.md#the-gpu-path); so, as fairseq keeps an fp16
model beside its fp32 EMA weights, :attr:`EMATeacher.compute` runs a copy whose Linear and convolution
weights are already in the autocast dtype, refreshed in one ``torch._foreach_copy_`` whenever the fp32
weights have changed (memory: half the teacher's Linear and convolution weights again). Autocast rounds the same
way, so the outputs are identical.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ema_decay", "teacher_decay", "EMATeacher", "disable_autocast_copies"]


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
    ``shared`` are removed from the copy (the teacher uses the student's instead, METHOD.md#teacher table);
    tensors whose names start with one of ``copied`` are copied from the student at every step instead of
    averaged (fairseq's ``skip_keys``)."""

    def __init__(self, student: nn.Module, shared: tuple[str, ...] = (), copied: tuple[str, ...] = ()):
        super().__init__()
        self.model = copy.deepcopy(student).float()
        for name in shared:
            setattr(self.model, name, None)
        self.copied = copied
        self.model.requires_grad_(False)
        self.model.eval()
        self._low: _AutocastCopy | None = None      # `compute`'s copy (not a submodule: neither saved nor moved)
        self._pairs: _Pairs | None = None           # `step`'s tensors, matched with the student's once
        self.autocast_copy = True           # off where the model is compiled (:meth:`disable_autocast_copy`)

    @property
    def compute(self) -> nn.Module:
        """The module to run: :attr:`model`, or under bf16/fp16 autocast (eager) its copy with the Linear and
        convolution weights in the autocast dtype, refreshed if the fp32 weights changed (module doc)."""
        if not self.autocast_copy or torch.compiler.is_compiling():
            return self.model
        weight = next(self.model.parameters(), None)
        if weight is None or not torch.is_autocast_enabled(weight.device.type):
            return self.model
        dtype = torch.get_autocast_dtype(weight.device.type)
        if self._low is None or (self._low.dtype, self._low.device) != (dtype, weight.device):
            self._low = _AutocastCopy.of(self.model, dtype, weight.device)
        self._low.refresh()
        return self._low.module

    def disable_autocast_copy(self) -> None:
        """Run the fp32 weights under autocast too (a compiled model: the casts are fused into the kernels that
        read them, and the copy's modules would not be compiled)."""
        self.autocast_copy, self._low = False, None

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()                  # the teacher never uses dropout / layer-drop / drop-path
        return self

    @torch.no_grad()
    def step(self, student: nn.Module, decay: float) -> None:
        """One EMA update towards ``student`` (the module the teacher was copied from)."""
        if decay >= 1.0:
            return
        pairs = self._paired(student)
        if pairs.ema_t:
            torch._foreach_mul_(pairs.ema_t, decay)
            torch._foreach_add_(pairs.ema_t, pairs.ema_s, alpha=1.0 - decay)
        if pairs.copy_t:
            torch._foreach_copy_(pairs.copy_t, pairs.copy_s)

    def _paired(self, student: nn.Module) -> "_Pairs":
        """The teacher's tensors matched by name with ``student``'s once, not at every update (host work a step
        bound by issuing kernels pays: docs/BENCHMARKS.md#the-ema-steps-bookkeeping). Matched again for another
        student, after a move or cast (``_apply``: buffers are new tensors then) or when a parameter's
        ``requires_grad`` changed."""
        pairs = self._pairs
        if (pairs is None or pairs.student is not student
                or any(p.requires_grad != trains for p, trains in zip(pairs.params, pairs.trains))):
            self._pairs = pairs = _Pairs.of(self.model, student, self.copied)
        return pairs

    def _apply(self, fn, *args, **kwargs):
        self._pairs = None
        return super()._apply(fn, *args, **kwargs)


@dataclass
class _Pairs:
    """What :meth:`EMATeacher.step` updates: the teacher's tensors whose student parameters train (``ema_t``,
    averaged towards ``ema_s``) and the rest it has (frozen parameters, buffers and the names under ``copied``:
    ``copy_t`` copied from ``copy_s``)."""

    student: nn.Module
    params: list[torch.Tensor]             # the student's matched parameters, and whether each trained
    trains: list[bool]
    ema_t: list[torch.Tensor]
    ema_s: list[torch.Tensor]
    copy_t: list[torch.Tensor]
    copy_s: list[torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, student: nn.Module, copied: tuple[str, ...] = ()) -> "_Pairs":
        pairs = cls(student, [], [], [], [], [], [])
        teacher_params = dict(model.named_parameters())
        for name, p_s in student.named_parameters():
            if (p_t := teacher_params.get(name)) is not None:
                pairs.params.append(p_s)
                pairs.trains.append(p_s.requires_grad)
                averaged = p_s.requires_grad and not name.startswith(copied)
                (pairs.ema_t if averaged else pairs.copy_t).append(p_t)
                (pairs.ema_s if averaged else pairs.copy_s).append(p_s)
        teacher_buffers = dict(model.named_buffers())
        for name, b_s in student.named_buffers():
            if (b_t := teacher_buffers.get(name)) is not None:
                pairs.copy_t.append(b_t)
                pairs.copy_s.append(b_s)
        return pairs


@dataclass
class _AutocastCopy:
    """A copy of a teacher's ``model`` sharing every tensor except the Linear and convolution weights and
    biases (what autocast would cast), which it holds in ``dtype`` as ``low``, copies of the fp32 ``master``
    tensors as of their ``versions``."""

    dtype: torch.dtype
    device: torch.device
    module: nn.Module
    low: list[torch.Tensor]
    master: list[torch.Tensor]
    versions: list[int] | None = None            # None: never filled

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype, device: torch.device) -> "_AutocastCopy":
        tensors = [*model.parameters(), *model.buffers()]
        module = copy.deepcopy(model, memo={id(t): t for t in tensors})
        low, master = [], []
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                for name, p in list(sub.named_parameters(recurse=False)):
                    setattr(sub, name, nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False))
                    low.append(getattr(sub, name))
                    master.append(p)
        return cls(dtype, device, module, low, master)

    def refresh(self) -> None:
        """Copy the fp32 tensors in, in one ``_foreach_copy_``, if any changed (EMA step, load) since the last time."""
        now = [t._version for t in self.master]
        if self.low and now != self.versions:
            torch._foreach_copy_(self.low, self.master)
            self.versions = now


def disable_autocast_copies(model: nn.Module) -> int:
    """:meth:`EMATeacher.disable_autocast_copy` for every EMA teacher in ``model``; returns how many there are."""
    teachers = [module for module in model.modules() if isinstance(module, EMATeacher)]
    for teacher in teachers:
        teacher.disable_autocast_copy()
    return len(teachers)
