"""``python -m d2v2 prepare-data``: prepare the embedded datasets (idempotent, atomic, timed).

    python -m d2v2 prepare-data --root data --modalities image text speech [--config x.yaml] [key=value ...]

``--config`` is a YAML file holding a data config, or a run config with a ``data:`` section;
``key=value`` overrides address the data config (``text.vocab_size=4096``; a leading ``data.`` is
accepted). Each modality writes a manifest (counts, sha256 checksums, package versions, config) and
is skipped when its manifest still matches. Times are wall-clock seconds (``time.perf_counter``; data
preparation runs on the CPU only, so there is no device to synchronise).
"""
from __future__ import annotations

import argparse
import sys
import time

from d2v2.config import ConfigError, apply_overrides, check_modality, load_yaml, validate
from d2v2.data import MODALITIES, DataConfig, prepare
from d2v2.data.common import CorruptDataError, MissingDataError


def build_config(config: str | None, root: str | None, overrides: list[str]) -> DataConfig:
    """The validated data config from a YAML file, ``--root`` and ``key=value`` overrides."""
    data = load_yaml(config) if config else {}
    data = data.get("data", data) if isinstance(data.get("data"), dict) else data
    data = apply_overrides(data, [o.removeprefix("data.") for o in overrides])
    if root is not None:
        data["root"] = root
    return validate(DataConfig, data, where="data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 prepare-data",
                                     description="Prepare the embedded datasets (idempotent, atomic, timed).")
    parser.add_argument("--root", default=None, help="data folder (default: data.root, 'data')")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES),
                        help=f"any of {', '.join(MODALITIES)} (default: all)")
    parser.add_argument("--config", default=None, help="YAML data config or run config with a data: section")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the data config")
    args = parser.parse_args(argv)
    # `--modalities image key=value` : argparse gives the overrides to the greedy --modalities list
    overrides = [m for m in args.modalities if "=" in m] + args.overrides
    try:
        cfg = build_config(args.config, args.root, overrides)
        modalities = [check_modality(m) for m in args.modalities if "=" not in m]
    except (ConfigError, ValueError) as err:
        print(f"prepare-data: {err}", file=sys.stderr)
        return 2
    for modality in modalities:
        start = time.perf_counter()
        try:
            manifest = prepare([modality], cfg)[modality]
        except (MissingDataError, CorruptDataError, ConfigError) as err:
            print(f"prepare-data: {modality}: {err}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
        state = "up to date, nothing to do" if manifest.get("skipped") else "prepared"
        counts = manifest.get("counts", {})
        print(f"{modality}: {state} in {seconds:.1f} s (wall clock) under {cfg.root}"
              + (f"; counts: {counts}" if counts else ""), flush=True)
    return 0
