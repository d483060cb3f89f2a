"""The pretraining run config: which method, on which data, with which optimiser, for how long.

A run is one (modality, method, preset + overrides, seed) trained for one *budget*: a number of updates
or epochs (the paper's way), or a train-time / device-hours budget (the efficiency comparison,
METHOD.md#paper-results). The LR schedule is defined on the fraction of the budget consumed, so every kind of budget gets a
complete warm-up and decay (d2v2.engine.optim). Checkpoints are written at the configured budget
fractions: those are the points of the accuracy-versus-time curves.

``load_run_config`` validates everything, including the method's own config, before any compute;
every problem is a :class:`d2v2.config.ConfigError` naming the dotted key.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from d2v2.config import Config, Modality, apply_overrides, load_yaml, upgrade_modality_names, validate
from d2v2.data.config import DataConfig
from d2v2.engine.compile import CompileMode, CompileScope
from d2v2.engine.optim import OptimConfig
from d2v2.engine.precision import LossScaling
from d2v2.method import method_config

__all__ = ["MethodSpec", "Budget", "CheckpointConfig", "PretrainRunConfig", "load_run_config",
           "resolve_run_config", "config_differences", "EXECUTION_KEYS"]


class MethodSpec(Config):
    """Which method to pretrain: registry key, preset and field overrides (d2v2.method)."""

    modality: Modality
    name: str
    preset: str = "tiny"
    overrides: dict[str, Any] = {}


class Budget(Config):
    """How much training: ``updates``, ``epochs`` (full passes of the sampler), ``train_seconds`` (train-only
    clock), ``device_hours`` (train-only seconds x processes / 3600) or ``cpu_seconds`` (the training
    process's CPU time in the train-only intervals: the same training on a busy CPU as on an idle one)."""

    kind: Literal["updates", "epochs", "train_seconds", "device_hours", "cpu_seconds"]
    value: float = Field(gt=0)

    @property
    def timed(self) -> bool:
        """Whether the budget is spent on a clock (the loop then reads it, with a device sync near the end)."""
        return self.kind in ("train_seconds", "device_hours", "cpu_seconds")

    @model_validator(mode="after")
    def _integral_updates(self) -> "Budget":
        if self.kind == "updates" and self.value != int(self.value):
            raise ValueError(f"an updates budget must be a whole number (got {self.value})")
        return self


class CheckpointConfig(Config):
    """``fractions``: budget fractions in (0, 1] that get a kept checkpoint ``checkpoints/checkpoint_f{f:.3f}.pt``;
    ``last_every_s``: end-to-end seconds between ``checkpoint_last.pt`` writes (also written at the end and on
    SIGTERM/SIGUSR2/SIGINT); ``keep_previous``: keep the replaced ``checkpoint_last.prev.pt`` as a fallback."""

    fractions: list[float] = [0.25, 0.5, 1.0]
    last_every_s: float = Field(300.0, gt=0)
    keep_previous: bool = True

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"budget fractions must be in (0, 1] (got {bad})")
        return sorted(set(value))


class PretrainRunConfig(Config):
    """Everything one pretraining run needs (see docs/ARCHITECTURE.md "Run directory").

    ``batch_size`` is per process (distinct samples before multi-mask cloning); the effective batch is
    ``batch_size x grad_accum x processes``. ``reference_batch_size`` is the paper's effective batch for
    this setting (METHOD.md#pretraining-recipes): when set, the run logs how far its own batch is from it (a smaller batch
    changes results, METHOD.md#small-batch-gap). ``precision``: ``fp16`` uses fairseq's dynamic loss scaling (the paper's
    setting on GPUs, METHOD.md#mixed-precision; on a CPU it runs, for tests, far slower than fp32) as
    ``loss_scaling`` sets it, ``bf16`` autocast without scaling, ``fp32`` none.
    ``ddp_find_unused_parameters``: needed when some parameters get no gradient in a step (layer-drop);
    ``None`` turns it on exactly when the encoder uses layer-drop. ``compile``: ``torch.compile`` every
    Transformer block (``blocks``; ``true`` means the same) or the method's whole forward and backward
    (``model``), in ``compile_mode`` (``reduce-overhead``: CUDA graphs on a GPU); opt-in, d2v2.engine.compile and
    docs/BENCHMARKS.md#the-gpu-path. ``peak_flops``: the FLOP/s per device that
    MFU is measured against (default: the device's dense bf16 peak, d2v2.engine.flops). ``input_costs``: JSON
    files holding the clocks of what made this run's inputs (HuBERT: its label files' ``labels.json`` and its
    first iteration's ``summary.json``); their sum is recorded beside the run's own clocks (PROTOCOL.md#input-costs).
    """

    method: MethodSpec
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(1, ge=1)
    reference_batch_size: int | None = Field(None, gt=0)
    budget: Budget
    checkpoint: CheckpointConfig = CheckpointConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scaling: LossScaling = LossScaling()
    seed: int = 0
    log_every: int = Field(10, ge=1)
    progress: Literal["auto"] | bool = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    ddp_find_unused_parameters: bool | None = None
    compile: CompileScope = "off"
    compile_mode: CompileMode = "default"
    peak_flops: float | None = Field(None, gt=0)
    input_costs: list[str] = []

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_flag(cls, value: Any) -> Any:
        """``compile: true / false`` (configs written before the scopes) mean ``blocks`` / ``off``."""
        return {True: "blocks", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Keys that change how a run executes, not what it computes: they may differ when a run is resumed.
EXECUTION_KEYS = ("progress", "log_every", "threads", "device", "compile", "compile_mode", "peak_flops",
                  "checkpoint.last_every_s", "data.num_workers", "data.pin_memory", "data.prefetch_factor",
                  "data.persistent_workers")


def resolve_run_config(data: Mapping[str, Any]) -> PretrainRunConfig:
    """Validate a run config and its method config; the result holds the *complete* method config in
    ``method.overrides`` so that the saved ``config.yaml`` reproduces the run even if presets change."""
    cfg = validate(PretrainRunConfig, data)
    m = cfg.method
    method_cfg = method_config(m.modality, m.name, m.preset, m.overrides)
    return cfg.model_copy(update={"method": m.model_copy(update={"overrides": method_cfg.model_dump(mode="json")})})


def load_run_config(path: str | None, overrides: list[str] = ()) -> PretrainRunConfig:
    """Read ``path`` (YAML; may be None), apply ``key=value`` overrides and resolve (see above)."""
    data = load_yaml(path) if path else {}
    return resolve_run_config(apply_overrides(data, list(overrides)))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a saved config (``old``) and a new one, ignoring
    :data:`EXECUTION_KEYS`. A key one side lacks equals an empty value (``None``, ``[]``, ``{}``) on the
    other: a field added later with an empty default does not make an older run directory another run;
    nor does a modality's old name (:func:`~d2v2.config.upgrade_modality_names`)."""
    if not prefix:
        old = upgrade_modality_names(old)
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        dotted = f"{prefix}{key}"
        if dotted in EXECUTION_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, dotted + ".")
        elif a != b and not (_empty(a) and _empty(b)):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict)) and not value)
