"""The repository stands alone: nothing points outside it, and every pointer into its docs resolves.

A clone has only its tracked files, so no file may cite material that lives elsewhere, and every
``<file>.md#<anchor>`` reference in code, configs or docs must name a heading of that Markdown file
(GitHub's anchor rules).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself.
FORBIDDEN = ["../" + "shared", "shared/" + "spec", "D2V2" + "_SPEC", "HARNESS" + "_NOTES", "DATA" + "_SOURCES",
             "spec " + "§"]
REFERENCE = re.compile(r"\b([A-Z][A-Za-z_]*\.md)#([a-z0-9][a-z0-9_-]*)")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Baseline data2vec1") == "baseline-data2vec1"
    assert slug("Paper versus released configs") == "paper-versus-released-configs"
    assert slug("Fine-tuning `tiny` (CPU)") == "fine-tuning-tiny-cpu"
    assert anchors("# A\n## B c\n```\n# not a heading\n```\n## B c\n") == {"a", "b-c", "b-c-1"}


def test_nothing_points_outside_the_repository():
    hits = []
    for path in tracked_files():
        if path == Path(__file__).resolve():
            continue
        text = text_of(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{lineno}: {word}" for word in FORBIDDEN if word in line]
    assert not hits, "references to material outside the repository:\n" + "\n".join(hits)


def test_every_doc_reference_names_an_existing_heading():
    docs = {p.name: p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    known = {name: anchors(p.read_text(encoding="utf-8")) for name, p in docs.items()}
    bad, count = [], 0
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for name, anchor in REFERENCE.findall(line):
                count += 1
                if name not in known:
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {name} is not a file in docs/ or README.md")
                elif anchor not in known[name]:
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {name} has no heading '#{anchor}'")
    assert count > 50, "expected the code to cite docs/METHOD.md by heading"
    assert not bad, "broken doc references:\n" + "\n".join(bad)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail to docs/"
