"""Evaluate a saved fine-tuned model on one or more splits of its task.

``python -m d2v2 evaluate --checkpoint FT_CKPT [--splits valid test ...] [--out SCORES.json] [key=value ...]``

``FT_CKPT`` is written by ``python -m d2v2 finetune ... --save FT_CKPT``: it holds the resolved fine-tuning
config, the encoder architecture and the fine-tuned weights, so the model is rebuilt without the
pretraining checkpoint. ``key=value`` overrides change the stored config (e.g. ``data.root=/elsewhere``,
``device=cuda``); the metrics are those of the task (:func:`d2v2.data.task_info`), named
``<split>_<metric>`` as in the fine-tuning metrics file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from d2v2 import data as D
from d2v2.config import ConfigError, apply_overrides
from d2v2.atomic import atomic_write_json
from d2v2.engine.checkpoint import CheckpointError, load_checkpoint
from d2v2.engine.errors import EXIT_USER_ERROR, USER_ERRORS
from d2v2.engine.finetune import Pretrained, build_encoder, build_model, evaluate, make_loader, resolve_device
from d2v2.engine.ftconfig import finetune_config
from d2v2.engine.provenance import provenance

__all__ = ["load_finetuned", "evaluate_checkpoint", "main"]


def load_finetuned(path: str | Path, overrides: list[str] = ()):
    """``(config, task info, model)`` from a fine-tuned checkpoint, with config overrides applied."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "finetuned":
        raise CheckpointError(f"{path} is not a fine-tuned model (write one with `d2v2 finetune --save`)")
    cfg = finetune_config(apply_overrides(ckpt["config"], list(overrides)))
    pre = ckpt["pretrained"]
    encoder = build_encoder(Pretrained(pre["modality"], pre["method"], pre["encoder_config"], None), cfg)
    model = build_model(cfg, ckpt["task_info"], encoder)
    model.load_state_dict(ckpt["model"])
    return cfg, ckpt["task_info"], model


def evaluate_checkpoint(path: str | Path, splits: list[str] | None = None,
                        overrides: list[str] = ()) -> dict[str, Any]:
    """Scores of the fine-tuned model at ``path`` on ``splits`` (default: every split but train)."""
    cfg, info, model = load_finetuned(path, overrides)
    device = resolve_device(cfg.device)
    datasets = D.finetune_datasets(cfg.modality, cfg.data, cfg.task)
    splits = splits or [s for s in datasets if s != "train"]
    unknown = [s for s in splits if s not in datasets]
    if unknown:
        raise ConfigError(f"splits: {unknown} not in task '{cfg.task}' (have {sorted(datasets)})")
    model.to(device)
    metrics = {}
    for split in splits:
        loader = make_loader(datasets[split], cfg, cfg.eval_batch_size, False, device)
        metrics.update({f"{split}_{k}": v for k, v in evaluate(model, cfg, info, loader, device).items()})
    return {"checkpoint": str(path), "task": cfg.task, "metrics": metrics,
            "primary_metric": f"test_{info['primary_metric']}", "higher_is_better": info["higher_is_better"],
            "provenance": provenance(cfg.preset, device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fine-tuned model written by `finetune --save`")
    parser.add_argument("--splits", nargs="+", help="splits to score (default: all but train)")
    parser.add_argument("--out", help="write the scores here as JSON (atomically)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the stored config")
    args = parser.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.splits, args.overrides)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result["metrics"], indent=1))
    return 0
