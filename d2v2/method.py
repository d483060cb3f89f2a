"""One interface for every pretraining method, and the registry that names them.

data2vec 2.0 (`d2v2.data2vec2`) and the baselines (`baselines.*`) all implement
:class:`PretrainMethod` and register themselves with :func:`register_method` when imported (the registry
imports the modules ``pyproject.toml`` lists as entry points, :mod:`d2v2.plugins`); the engine, the
benchmarks and the workflow only ever talk to this interface, so a comparison measures the method, not
the plumbing.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from d2v2.config import Config, ConfigError, merge, renamed_modality, validate
from d2v2.model.ema import EMATeacher, teacher_decay
from d2v2.plugins import entry_points
from d2v2.presets import available_presets, method_settings

__all__ = [
    "MethodOutput", "Masker", "PretrainMethod", "register_method", "build_method", "method_config",
    "method_dataset", "available_methods", "CollapseError", "SelfDistillation",
]


@dataclass
class MethodOutput:
    """What one pretraining forward returns."""

    loss: torch.Tensor                 # scalar, normalised by ``sample_size``; call backward() on it
    sample_size: int                   # number of predicted positions the loss averages over
    logs: dict[str, Any] = field(default_factory=dict)   # detached scalar diagnostics, averaged per log interval


class CollapseError(RuntimeError):
    """A method's collapse guard fired (METHOD.md#loss, METHOD.md#collapse-guard): the run must stop and say so."""


class Masker(Protocol):
    """Picklable callable run in data-loader workers: adds masks (and corruptions) to a batch."""

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]: ...


class PretrainMethod(nn.Module):
    """Base class of every pretraining method (see docs/ARCHITECTURE.md)."""

    modality: str
    cfg: Config

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def masker(self) -> Masker:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, num_updates: int, fraction: float) -> None:
        """Bookkeeping after the optimiser step (the EMA teacher update); ``fraction`` is the share of the
        budget consumed by the ``num_updates`` updates so far. Default: nothing."""

    def check_health(self, logs: dict[str, Any]) -> None:
        """Called by the engine at each logging interval with the last update's ``logs`` (read on the host
        then, not inside the step); raise :class:`CollapseError` to stop the run. Default: nothing."""

    def stand_in_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` plus random stand-ins for what the data pipeline adds for this method alone (HuBERT's
        k-means labels), for benchmarks and tests on synthetic batches. Default: ``batch`` as it is."""
        return batch

    @classmethod
    def pretrain_dataset(cls, cfg: Config, data_cfg, split: str = "train"):
        """The items this method pretrains on: the modality's (:func:`d2v2.data.pretrain_dataset`) unless a
        method builds its own instances from the prepared data (BERT: sentence pairs)."""
        from d2v2 import data

        return data.pretrain_dataset(cfg.encoder.modality, data_cfg, split)

    def log_snapshot(self) -> dict[str, Any]:
        """Diagnostics read once per logging interval, not every step (e.g. weight norms); default: none."""
        return {}

    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay beyond biases and 1-D tensors; default: the
        encoder's (:meth:`~d2v2.model.encoder.Encoder.no_weight_decay`)."""
        return self.encoder().no_weight_decay()


class SelfDistillation(PretrainMethod):
    """What data2vec 2.0 and 1.0 share: a ``student`` encoder whose EMA ``teacher`` (:class:`EMATeacher`) takes a
    step after every update at the scheduled tau (``current_decay``, read at logging intervals), and fairseq's
    optional collapse guard on the logged target and prediction stds (METHOD.md#collapse-guard): once past
    ``cfg.collapse_check_after`` updates, a std below ``cfg.min_target_var`` / ``cfg.min_pred_var`` (0: off)
    stops the run. fairseq checks in every forward; the engine calls :meth:`check_health` at each logging
    interval, where it reads the diagnostics anyway: a check in the step would make the host wait for the
    device at every update."""

    label: str                         # the method as messages name it
    student: nn.Module
    teacher: EMATeacher

    def __init__(self) -> None:
        super().__init__()
        self.num_updates = 0

    def encoder(self) -> nn.Module:
        return self.student

    def after_step(self, num_updates: int, fraction: float) -> None:
        """EMA step of the teacher with tau at this point of the run (skipped when tau >= 1)."""
        self.num_updates = num_updates
        self.current_decay = teacher_decay(self.cfg, num_updates, fraction)
        self.teacher.step(self.student, self.current_decay)

    def check_health(self, logs: dict[str, Any]) -> None:
        if self.num_updates <= self.cfg.collapse_check_after:
            return
        guards = (("min_target_var", "target_var", "target"), ("min_pred_var", "pred_var", "prediction"))
        for name, stat, what in guards:
            threshold, value = getattr(self.cfg, name), float(logs[stat])
            if threshold > 0 and value < threshold:
                raise CollapseError(f"{self.label} collapse guard: {what} std {value:.4f} < {name} {threshold} after "
                                    f"{self.num_updates} updates (representation collapse; try a lower LR, check the "
                                    f"EMA schedule, or set {name}=0 to disable)")


@dataclass(frozen=True)
class _Entry:
    config_cls: type[Config]
    presets: Mapping[str, Mapping[str, Any]]       # a method of another package: its own settings per preset
    builder: Callable[[Config], PretrainMethod]


_REGISTRY: dict[tuple[str, str], _Entry] = {}


def register_method(modality: str, name: str, config_cls: type[Config],
                    presets: Mapping[str, Mapping[str, Any]] | None = None):
    """Decorator registering ``builder(cfg) -> PretrainMethod`` under ``(modality, name)``. The method's
    settings per preset are in the preset files (``method_settings`` in ``d2v2/presets/<preset>.yaml``); a
    method of another package, which those files do not name, may bring its own (``presets``)."""

    def deco(builder: Callable[[Config], PretrainMethod]):
        _REGISTRY[(modality, name)] = _Entry(config_cls, presets or {}, builder)
        return builder

    return deco


@functools.cache
def _load_providers() -> None:
    """Import the modules that register methods (entry points ``d2v2.methods``, :mod:`d2v2.plugins`), once,
    on first use, so that ``d2v2.config`` users stay light (reading the entry points takes milliseconds)."""
    for module in entry_points("d2v2.methods").values():
        importlib.import_module(module)


def available_methods() -> list[tuple[str, str]]:
    """Every registered ``(modality, method)`` pair."""
    _load_providers()
    return sorted(_REGISTRY)


def _entry(modality: str, name: str) -> _Entry:
    _load_providers()
    if (message := renamed_modality(modality)) is not None:
        raise ConfigError(f"method: {message}")
    if (modality, name) not in _REGISTRY:
        options = ", ".join(f"{m}/{n}" for m, n in sorted(_REGISTRY))
        raise ConfigError(f"method: '{name}' is not available for modality '{modality}' (available: {options})")
    return _REGISTRY[(modality, name)]


def method_config(modality: str, name: str, preset: str = "tiny",
                  overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config of a method: its settings in ``preset`` (:func:`d2v2.presets.method_settings`),
    then ``overrides`` on top."""
    entry = _entry(modality, name)
    settings = method_settings(preset, modality, name)
    if settings is None:
        settings = entry.presets.get(preset)
    if settings is None:
        have = [p for p in available_presets() if method_settings(p, modality, name) is not None] + list(entry.presets)
        raise ConfigError(f"preset: '{preset}' has no settings for {modality}/{name} (presets with them: "
                          f"{', '.join(sorted(have)) or 'none'})")
    return validate(entry.config_cls, merge(settings, overrides), where="method")


def build_method(modality: str, name: str, preset: str = "tiny",
                 overrides: Mapping[str, Any] | None = None) -> PretrainMethod:
    """Build a method from its preset and overrides."""
    cfg = method_config(modality, name, preset, overrides)
    return _entry(modality, name).builder(cfg)


def method_dataset(modality: str, name: str, preset: str, overrides: Mapping[str, Any] | None, data_cfg,
                   split: str = "train"):
    """The pretraining dataset of a method (:meth:`PretrainMethod.pretrain_dataset`), without building it."""
    return _entry(modality, name).builder.pretrain_dataset(method_config(modality, name, preset, overrides),
                                                           data_cfg, split)
