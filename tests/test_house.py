"""The house rules that import-linter cannot see (the layer contracts themselves are `make lint`):
no private name imported across modules, no package file over 500 lines, nothing read from or cited
outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "pipelines", "render", "training", "eval", "bench")
MAX_LINES = 500  # a module longer than this is two modules (STYLE: "a file over ~600 lines is two files")


def package_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_private_name_is_imported_from_another_module():
    """`from x.y import _name` across modules couples a module to another's internals; a shared helper
    gets a public name in the one module that owns it."""
    ours = set(PACKAGES) | {"tests"}
    found = []
    for path in package_files() + sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_no_package_file_is_over_the_line_limit():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in package_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_nothing_outside_the_repository_is_read_or_cited():
    """A user's clone has none of this workplace's folders: fixtures live in tests/fixtures, contracts in docs/."""
    # the pattern is assembled from parts so that this file, which names what is forbidden, does not match it
    shared, work = "sha" + "red", "/wo" + "rk"
    outside = re.compile(rf"\.\./{shared}|{work}/{shared}|{work}/main|\b{shared}/(fixtures|evidence|paper)|"
                         r"DESIGN\.md|\bDESIGN\b")
    files = package_files() + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md"))
    files += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"] + sorted((ROOT / "configs").glob("*"))
    hits = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "references outside the repository (cite docs/CONTRACTS.md, read tests/fixtures):\n" + \
        "\n".join(hits[:40]) + (f"\n... and {len(hits) - 40} more" if len(hits) > 40 else "")
