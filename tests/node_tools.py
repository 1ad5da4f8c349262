"""Test helper: the Node tools under tools/ (the Khronos glTF validator, a headless-browser check of the HTML
report) called from pytest. `.ci/run` installs them (`npm ci` in tools/, Debian's chromium); a test that
needs one skips, saying which, only where it is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
CHROMIUM = "/usr/bin/chromium"


def missing(*packages: str, browser: bool = False) -> str:
    """Why the tools cannot run here ("" when they can): node, an npm package in tools/, chromium."""
    if shutil.which("node") is None:
        return "node is not installed"
    for p in packages:
        if not (TOOLS / "node_modules" / p / "package.json").is_file():
            return f"tools/node_modules/{p} missing (run `npm ci` in tools/)"
    if browser and not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} missing (apt-get install -y chromium)"
    return ""


def validate_gltf(*paths: str | Path) -> list[dict]:
    """The validator's summary per file (errors, warnings, hasTextures, images, messages), in order."""
    r = subprocess.run(["node", str(TOOLS / "gltf_validate.mjs"), *map(str, paths)], capture_output=True,
                       text=True, timeout=300)
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(paths), (r.stdout, r.stderr)
    return reports
