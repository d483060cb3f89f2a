"""Command line: ``python -m d2v2 <command> ...`` (also installed as ``d2v2``).

Each command lives in the module that owns it and exposes ``main(argv) -> int``; this file only
dispatches, so importing the CLI stays cheap.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare-data": ("d2v2.data.prepare_cli", "prepare the embedded datasets (idempotent, atomic)"),
    "pretrain": ("d2v2.engine.pretrain", "pretrain one method under a budget"),
    "finetune": ("d2v2.engine.finetune", "fine-tune a pretraining checkpoint and write metrics"),
    "evaluate": ("d2v2.engine.evaluate", "evaluate a fine-tuned checkpoint"),
    "convert": ("d2v2.convert", "convert an official fairseq data2vec 2.0 checkpoint"),
    "hubert-labels": ("baselines.hubert_labels", "make HuBERT's k-means labels of the speech pretraining split"),
    "launch": ("d2v2.launch", "run a command locally or as a SLURM job (used by the workflow)"),
    "collect": ("d2v2.analysis.collect", "collect metrics into tidy tables"),
    "report": ("d2v2.analysis.report", "render figures and the report"),
}


def usage() -> str:
    lines = ["usage: python -m d2v2 <command> [args...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
