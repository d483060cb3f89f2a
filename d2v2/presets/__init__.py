"""The presets: one YAML file per preset (``<name>.yaml`` beside this module), each the whole recipe of
that scale for every modality: the models (``encoders``: the encoder every method of a modality trains;
``method_settings``: what each method sets over its config's defaults), the run matrix and matched
budgets, the pretraining recipe (``pretrain``: batch size, optimiser, per-method changes) and the
fine-tuning recipe (``finetune``: task, optimiser, budget, regularisers). The workflow lays
``config/config.yaml`` over the file; :func:`d2v2.method.method_config` and ``python -m d2v2 finetune``
read their sections. ``base`` is the paper's (METHOD.md#pretraining-recipes,
METHOD.md#fine-tuning), ``tiny`` the embedded data on a 2-core CPU, ``gpu`` one GPU, ``smoke`` CI."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from d2v2.config import ConfigError, merge

__all__ = ["PRESETS_DIR", "MODEL_KEYS", "available_presets", "load_preset", "method_settings", "finetune_recipe"]

PRESETS_DIR = Path(__file__).resolve().parent
MODEL_KEYS = ("encoders", "method_settings")     # the sections read by method_config, not by the workflow


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


@functools.cache
def _read(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset: '{name}' unknown (have {', '.join(available_presets())})")
    return yaml.safe_load(path.read_text()) or {}


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` as a fresh dict (the caller may change it)."""
    return merge(_read(name), {})


def method_settings(name: str, modality: str, method: str) -> dict[str, Any] | None:
    """Preset ``name``'s settings of ``modality``/``method``: ``encoders.<modality>`` as its ``encoder``, with
    ``method_settings.<modality>.<method>`` over it; None if the preset has no settings for that method."""
    preset = _read(name)
    settings = preset.get("method_settings", {}).get(modality, {})
    if method not in settings:
        return None
    return merge({"encoder": preset["encoders"][modality]}, settings[method] or {})


def finetune_recipe(name: str, modality: str) -> dict[str, Any]:
    """Preset ``name``'s fine-tuning recipe for ``modality``: its ``finetune.common`` with
    ``finetune.<modality>`` over it."""
    finetune = _read(name).get("finetune", {})
    if modality not in finetune:
        have = sorted(set(finetune) - {"common"})
        raise ConfigError(f"preset: '{name}' has no fine-tuning recipe for {modality} (have {', '.join(have)})")
    return merge(finetune.get("common", {}), finetune[modality])
