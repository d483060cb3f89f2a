"""Typed, validated configuration.

Every config in the project is a pydantic model deriving from :class:`Config`: unknown keys, wrong
types and impossible values fail early with a :class:`ConfigError` whose message names the dotted key.
Presets are plain nested dicts; :func:`merge` lays user values over them and :func:`apply_overrides`
applies command-line ``key.sub=value`` strings (values parsed as YAML).
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar, get_args

import pydantic
import yaml

__all__ = ["Config", "ConfigError", "merge", "get_dotted", "apply_overrides", "load_yaml", "validate", "Modality",
           "MODALITIES", "RENAMED_MODALITIES", "renamed_modality", "check_modality", "upgrade_modality_names"]

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# The paper's three modalities, one name each everywhere (config keys, run paths, data, models).
_MODALITY_NAMES = Literal["image", "speech", "text"]
MODALITIES: tuple[str, ...] = get_args(_MODALITY_NAMES)
RENAMED_MODALITIES = {"audio": "speech"}     # old name -> name; "audio" was the methods' name until 2026-12-05


def renamed_modality(name: Any) -> str | None:
    """The message for a modality given by its old name (None if it is not one)."""
    if name in RENAMED_MODALITIES:
        return (f"the modality '{name}' is now called '{RENAMED_MODALITIES[name]}' (one name per modality, "
                f"the paper's): write '{RENAMED_MODALITIES[name]}'")
    return None


def check_modality(name: Any) -> str:
    """``name`` if it is a modality; a :class:`ConfigError` that names the new name for an old one."""
    if name not in MODALITIES:
        raise ConfigError(renamed_modality(name) or f"unknown modality {name!r} (have {', '.join(MODALITIES)})")
    return name


def _refuse_old_name(value: Any) -> Any:
    if (message := renamed_modality(value)) is not None:
        raise ValueError(message)
    return value


Modality = Annotated[_MODALITY_NAMES, pydantic.BeforeValidator(_refuse_old_name)]


def upgrade_modality_names(data: Any) -> Any:
    """A config or checkpoint written before the rename, with today's names: every ``modality: audio``
    becomes ``speech`` and every ``audio:`` key (the encoder's modality section) ``speech:``. Applied to
    what was *saved* (checkpoints, a run dir's ``config.yaml``), never to what a user writes now."""
    if isinstance(data, Mapping):
        return {RENAMED_MODALITIES.get(k, k): (RENAMED_MODALITIES.get(v, v) if k == "modality" and isinstance(v, str)
                                              else upgrade_modality_names(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [upgrade_modality_names(v) for v in data]
    return data


class Config(pydantic.BaseModel):
    """Base class: strict about keys, validates on assignment, immutable defaults are copied."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _fields_at(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` inside ``model`` (used to suggest a fix for a typo)."""
    cls: Any = model
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}).keys())


def validate(cls: type[C], data: Mapping[str, Any] | None, where: str = "") -> C:
    """Build ``cls`` from ``data``; raise :class:`ConfigError` naming every bad key."""
    try:
        return cls.model_validate(dict(data or {}))
    except pydantic.ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(e["loc"])
            key = ".".join(str(p) for p in (where.split(".") if where else []) + list(loc))
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                options = _fields_at(cls, loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), options, n=1)
                msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
                if options:
                    msg += f"; valid keys: {', '.join(sorted(options))}"
            elif "input" in e and e["type"] != "missing":
                msg += f" (got {e['input']!r})"
            lines.append(f"{key or cls.__name__}: {msg}")
        raise ConfigError("; ".join(lines)) from None


def merge(base: Mapping[str, Any], update: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested dicts are merged, everything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in (update or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_dotted(data: Any, key: str, default: Any = None) -> Any:
    """``data["a"]["b"]`` for ``key`` ``"a.b"``; ``default`` where a part is missing or not a mapping."""
    for part in key.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return default
        data = data[part]
    return data


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (``3`` -> int, ``[1,2]`` -> list)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a ConfigError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
