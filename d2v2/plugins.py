"""What other packages add to d2v2: pretraining methods and commands, as Python entry points.

``d2v2`` never imports ``baselines`` (ARCHITECTURE.md#packages): the distribution's ``pyproject.toml`` names
the modules that register methods (group ``d2v2.methods``, each module calls
:func:`d2v2.method.register_method` on import) and those that add a ``python -m d2v2`` command (group
``d2v2.commands``, each module has ``main(argv) -> int``). Another installed package adds its own methods
the same way. Run from a source checkout, the checkout's ``pyproject.toml`` is read as well, so a method
listed there needs no reinstall.
"""
from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

__all__ = ["entry_points"]

_CHECKOUT_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def entry_points(group: str) -> dict[str, str]:
    """``name -> module`` of every entry point in ``group``: installed distributions', then this checkout's."""
    found = {ep.name: ep.module for ep in importlib.metadata.entry_points(group=group)}
    if _CHECKOUT_PYPROJECT.is_file():
        project = tomllib.loads(_CHECKOUT_PYPROJECT.read_text())["project"]
        found.update(project.get("entry-points", {}).get(group, {}))
    return found
