"""`SOURCE=local:<dir>`: any folder of meshes (.glb .gltf .obj+.mtl+textures .ply .stl .fbx).

uid = the first 32 hex digits of sha256 of the file's path relative to `<dir>` (POSIX separators), so
the same folder gives the same uids on any machine. Single-file formats are hard-linked (or copied) to
`OUT/assets/<uid>.<ext>`; an .obj or .gltf with companions becomes a folder `OUT/assets/<uid>/` holding
the main file and the files it references (MTL `mtllib` and `map_*`, glTF `buffers`/`images` URIs),
in their relative layout. References that leave `<dir>` (`../../etc/passwd`, absolute paths) are not
copied, but the MTL/glTF still names them; what keeps them unread is the renderer: `render.blender`
resolves every texture Blender would load and drops (records in `missing_textures`, removes before
rendering) any outside the asset's folder (`OUT/assets/<uid>/`, or the file's own folder for a
single-file asset), so a reference anywhere on disk never reaches a pixel.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

from core.config import DataConfig
from pipelines.assets import VerifyError, is_inside, ok_row, place_file, place_folder, verify_file

EXTENSIONS = {".glb": "glb", ".gltf": "gltf", ".obj": "obj", ".ply": "ply", ".stl": "stl", ".fbx": "fbx"}
# MTL statements that name a texture file (lower case); gso.py reads the same ones
MTL_MAP_KEYS = ("map_kd", "map_ka", "map_ks", "map_ns", "map_d", "map_bump", "bump", "disp", "decal", "norm",
             "map_pr", "map_pm", "map_ke", "refl")


def uid_for(rel: str) -> str:
    """Stable uid of the file at relative path `rel` (32 hex digits, no dots)."""
    return hashlib.sha256(Path(rel).as_posix().encode("utf-8")).hexdigest()[:32]


def scan(root: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Mesh files under `root` (sorted relative paths) and unreadable folders as (relative path, reason)."""
    root = Path(root)
    found: list[str] = []
    errors: list[tuple[str, str]] = []

    def onerror(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        errors.append((rel, f"unreadable folder: {type(e).__name__}: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in EXTENSIONS and not name.startswith("."):
                found.append(Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix())
    return sorted(found), errors


def candidates(root: str, cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Candidate rows for every mesh file under `root`; failed rows for folders that cannot be read."""
    files, errors = scan(root)
    # license None: the allow-list judges licenses a source knows; a local folder's is declared by the
    # user (data.local_license) and written into download.parquet by `fetch`
    rows = [{"uid": uid_for(rel), "source": "local", "name": Path(rel).stem, "license": None,
             "attribution": cfg.local_attribution or rel, "author": cfg.local_attribution, "source_url": "",
             "format": EXTENSIONS[Path(rel).suffix.lower()],
             "locator": rel} for rel in files]
    failed = [{"uid": uid_for(rel + "/"), "status": "failed", "reason": reason, "source": "local", "name": rel,
               "locator": rel} for rel, reason in errors]
    return rows, failed


def _ref_path(base: Path, text: str) -> Path | None:
    """A referenced file, if `text` names one relative to `base` (absolute paths are refused)."""
    text = text.strip().strip('"').replace("\\", "/")
    if not text or text.startswith("/") or ":" in text.split("/")[0]:
        return None
    return base / text


def obj_dependencies(obj: Path) -> list[Path]:
    """Files an .obj needs: its MTL libraries and the textures they name (only those that exist)."""
    deps: list[Path] = []
    base = obj.parent
    with open(obj, "rb") as f:
        for raw in f:
            if raw.startswith(b"mtllib"):
                line = raw.decode("utf-8", "replace")[6:].strip()
                # names may contain spaces: prefer the whole rest of the line, else each token
                cands = [line] + line.split()
                for c in cands:
                    p = _ref_path(base, c)
                    if p is not None and p.is_file():
                        deps.append(p)
                        break
    for mtl in list(deps):
        with open(mtl, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").strip()
                key, _, rest = line.partition(" ")
                if key.lower() not in MTL_MAP_KEYS or not rest:
                    continue
                tokens = rest.split()
                # options (-s 1 1 1, -bm 0.5 ...) come before the file name: try the longest tails first
                for i in range(len(tokens)):
                    p = _ref_path(mtl.parent, " ".join(tokens[i:]))
                    if p is not None and p.is_file():
                        deps.append(p)
                        break
    return deps


def gltf_dependencies(gltf: Path) -> list[Path]:
    """Files a .gltf references by relative URI (buffers and images; data: URIs need none)."""
    doc = json.loads(gltf.read_bytes())
    deps = []
    for entry in list(doc.get("buffers", [])) + list(doc.get("images", [])):
        uri = entry.get("uri") if isinstance(entry, dict) else None
        if not uri or uri.startswith("data:"):
            continue
        p = _ref_path(gltf.parent, urllib.parse.unquote(uri))
        if p is not None and p.is_file():
            deps.append(p)
    return deps


def place_with_dependencies(root: Path, main: Path, deps: list[Path], dst: Path) -> Path:
    """Copy `main` and its `deps` into folder `dst` keeping their layout; return the main file's new path.

    The layout is taken relative to the deepest folder holding all of them, never above `root`; a
    dependency outside `root` is dropped (it stays data: nothing outside the source folder is copied).
    """
    deps = [d for d in deps if is_inside(root, d)]
    files = [main.resolve()] + [d.resolve() for d in deps]
    base = Path(os.path.commonpath([str(p.parent) for p in files]))
    place_folder({p.relative_to(base).as_posix(): p for p in files}, dst)
    return dst / main.resolve().relative_to(base)


def fetch(item: dict, assets_dir: str, root: str, max_bytes: int | None = None,
          license: str = "unknown") -> dict[str, Any]:
    """Download step for local files: verify, then link/copy into `assets_dir`."""
    t0 = time.perf_counter()
    item = {**item, "license": license}
    root_p = Path(root)
    src = root_p / item["locator"]
    if not is_inside(root_p, src):
        raise VerifyError(f"file resolves outside the source folder: {item['locator']}")
    fmt = item["format"]
    verify_file(src, fmt, max_bytes=max_bytes)
    assets = Path(assets_dir)
    if fmt in ("obj", "gltf"):
        deps = obj_dependencies(src) if fmt == "obj" else gltf_dependencies(src)
        if deps:
            path = place_with_dependencies(root_p, src, deps, assets / item["uid"])
            return {**ok_row(item, path, t0), "license": license}
    path = place_file(src, assets / f"{item['uid']}.{fmt}")
    return {**ok_row(item, path, t0), "license": license}
