"""The package installs as described and its two dependency lists agree."""
import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from d2v2 import MOVED

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", line)
        assert m, f"not an exact pin: {line!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == wanted


def test_core_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1"} <= set(deps)


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "d2v2", "--help"], capture_output=True, text=True, check=True)
    assert "pretrain" in out.stdout and "finetune" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "d2v2", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


@pytest.mark.parametrize("program", [True, False])
def test_the_program_freezes_what_its_command_imported(program):
    """``python -m d2v2 <command>`` imports the command with the cyclic collector off and freezes what the
    import left, so that the collector's passes skip it (docs/BENCHMARKS.md#process-start); ``main(argv)``
    called from other code (tests, scripts) leaves the collector alone."""
    call = "cli.main()" if program else "cli.main(['finetune', '--help'])"
    probe = ("import gc, sys\nfrom d2v2 import cli\nsys.argv = ['d2v2', 'finetune', '--help']\n"
             f"try:\n    {call}\nexcept SystemExit:\n    pass\nprint(gc.isenabled(), gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    out = out.splitlines()[-1].split()                                   # after the command's --help
    assert out[0] == "True"
    assert (int(out[1]) > 100_000) if program else (int(out[1]) == 0)      # torch alone leaves ~200,000


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_names_its_new_path(old):
    with pytest.raises(ModuleNotFoundError, match=f"{old} moved to {MOVED[old]}"):
        importlib.import_module(old)
    importlib.import_module(MOVED[old])   # and the new path imports


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (at any depth in the file): ``from a.b import c`` is ``a.b.c``
    when that is a module, else ``a.b``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names}
    return out & modules


def test_no_upward_import_and_no_import_circle():
    """``d2v2`` never imports ``baselines`` (the registry is filled through entry points, d2v2/plugins.py)
    and no module imports itself through others (ARCHITECTURE.md#packages)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("d2v2", "baselines") for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("d2v2")
                    for d in deps if d.startswith("baselines"))
    assert not upward, upward

    def circle(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return path
                if dep not in seen and not (dep == node.rpartition(".")[0] or node.startswith(dep + ".")):
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    circles = {" -> ".join(c) for m in graph if (c := circle(m))}
    assert not circles, sorted(circles)
