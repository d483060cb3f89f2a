"""Command line: ``python -m d2v2 <command> ...`` (also installed as ``d2v2``).

Each command lives in the module that owns it and exposes ``main(argv) -> int``; this file only
dispatches, so importing the CLI stays cheap. Other packages add commands as entry points
(``d2v2.commands``, :mod:`d2v2.plugins`): the baselines add ``hubert-labels``.
"""
from __future__ import annotations

import gc
import importlib
import sys

COMMANDS = {
    "prepare-data": ("d2v2.data.prepare_cli", "prepare the embedded datasets (idempotent, atomic)"),
    "pretrain": ("d2v2.engine.pretrain", "pretrain one method under a budget"),
    "finetune": ("d2v2.engine.finetune", "fine-tune a pretraining checkpoint and write metrics"),
    "evaluate": ("d2v2.engine.evaluate", "evaluate a fine-tuned checkpoint"),
    "convert": ("d2v2.interop.fairseq", "convert an official fairseq data2vec 2.0 checkpoint"),
    "prepare-run": ("d2v2.workflow.jobs", "ready a pretraining run's folder for its config (used by the workflow)"),
    "launch": ("d2v2.launch", "run a command locally or as a SLURM job (used by the workflow)"),
    "collect": ("d2v2.analysis.collect", "collect metrics into tidy tables"),
    "report": ("d2v2.analysis.report", "render figures and the report"),
}


def _commands() -> dict[str, str]:
    """``name -> module`` of every command: this package's, then the entry points'."""
    from d2v2.plugins import entry_points

    return {**{name: module for name, (module, _) in COMMANDS.items()}, **entry_points("d2v2.commands")}


def _help(name: str) -> str:
    """A command's line in the usage: an added command's module says it in ``COMMAND_HELP``."""
    if name in COMMANDS:
        return COMMANDS[name][1]
    return getattr(importlib.import_module(_commands()[name]), "COMMAND_HELP", "")


def usage() -> str:
    lines = ["usage: python -m d2v2 <command> [args...]", "", "commands:"]
    lines += [f"  {name:<13} {_help(name)}" for name in _commands()]
    return "\n".join(lines)


def _import_for_the_process(module: str):
    """Import a command's module as the program does: the commands bring torch and its companions, about
    250,000 long-lived objects and no garbage, so the cyclic collector sits out the import and those objects
    are frozen after it; its later passes, and the one at exit, skip them (docs/BENCHMARKS.md#process-start).
    Only for the program itself (``argv`` from the command line): a frozen object is never collected."""
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        gc.enable()
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    # this package's commands need no look at the entry points (milliseconds at every job's start)
    module = COMMANDS[name][0] if name in COMMANDS else _commands().get(name)
    if module is None:
        print(f"unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = _import_for_the_process(module) if program else importlib.import_module(module)
    return int(module.main(rest) or 0)
