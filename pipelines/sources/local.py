"""`SOURCE=local:<dir>`: any folder of meshes (.glb .gltf .obj+.mtl+textures .ply .stl .fbx).

uid = the first 32 hex digits of sha256 of the file's path relative to `<dir>` (POSIX separators), so
the same folder gives the same uids on any machine. Single-file formats are hard-linked (or copied) to
`OUT/assets/<uid>.<ext>`; an .obj or .gltf with companions becomes a folder `OUT/assets/<uid>/` holding
the main file and the files it references (MTL `mtllib` and `map_*`, glTF `buffers`/`images` URIs),
in their relative layout, found by the renderer's own resolver (`render.references`). References that
leave `<dir>` (`../../etc/passwd`, absolute paths, symlinks pointing out) are not copied; a glTF buffer or
an MTL library outside fails the row. The MTL/glTF copies still name what was not copied; the renderer
resolves every reference again, inside `OUT/assets/<uid>/` (a single-file asset: nothing but itself), and
imports from a sandbox holding only what is inside, so a reference anywhere on disk never reaches a pixel.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from core.config import DataConfig
from pipelines.assets import VerifyError, is_inside, ok_row, place_file, place_folder, verify_file
from render.references import ContainmentError, asset_files

EXTENSIONS = {".glb": "glb", ".gltf": "gltf", ".obj": "obj", ".ply": "ply", ".stl": "stl", ".fbx": "fbx"}
# MTL statements that name a texture file (lower case); gso.py reads the same ones
MTL_MAP_KEYS = ("map_kd", "map_ka", "map_ks", "map_ns", "map_d", "map_bump", "bump", "disp", "decal", "norm",
             "map_pr", "map_pm", "map_ke", "refl")


def uid_for(rel: str) -> str:
    """Stable uid of the file at relative path `rel` (32 hex digits, no dots)."""
    return hashlib.sha256(Path(rel).as_posix().encode("utf-8")).hexdigest()[:32]


def is_text(name: str) -> bool:
    """Whether a file name from the disk is UTF-8 text (os functions give undecodable bytes as surrogates,
    which no manifest column can hold)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A file name as text for a failed row: undecodable bytes as `\\xNN` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


NOT_TEXT = "file name is not UTF-8 text (rename it)"


def unreadable(e: OSError) -> str:
    """The reason of a folder that cannot be listed."""
    return f"unreadable folder: {type(e).__name__}: {e.strerror or e}"


def folder_failed(rel: str, name: str, source: str, reason: str) -> dict[str, Any]:
    """The failed candidate row of a folder (or name) a source cannot take; uid from its relative path."""
    return {"uid": uid_for(rel), "status": "failed", "name": name, "source": source, "reason": reason}


def scan(root: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Mesh files under `root` (sorted relative paths) and unreadable folders as (relative path, reason)."""
    root = Path(root)
    found: list[str] = []
    errors: list[tuple[str, str]] = []

    def onerror(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        errors.append((rel, unreadable(e)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        def rel(name: str, folder: str = dirpath) -> str:
            return Path(os.path.relpath(os.path.join(folder, name), root)).as_posix()

        for name in [d for d in dirnames if not is_text(d)] + [f for f in filenames if not is_text(f)]:
            errors.append((shown(rel(name)), NOT_TEXT))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and is_text(d))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in EXTENSIONS and not name.startswith(".") and is_text(name):
                found.append(rel(name))
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


def dependencies(main: Path, fmt: str, root: Path) -> dict[str, Path]:
    """Files an .obj / .gltf needs, as the renderer's resolver (render.references) finds them: MTL
    libraries and their textures, glTF buffers and images; {path relative to `root`: real file}, the main
    file included. A reference leaving `root` (absolute, `..`, a symlink pointing out) is not copied; a
    buffer or MTL library leaving it fails the asset (VerifyError with the reason)."""
    try:
        return asset_files(main, fmt, root).files
    except ContainmentError as e:
        raise VerifyError(str(e)) from None


def place_with_dependencies(files: dict[str, Path], main_rel: str, dst: Path) -> Path:
    """Copy `files` ({root-relative name: real file}) into folder `dst` keeping their relative layout,
    taken from the deepest folder holding all of them; return the main file's new path."""
    base = os.path.commonpath([os.path.dirname(rel) or "." for rel in files]) if files else ""
    base = "" if base in (".", "") else base
    place_folder({os.path.relpath(rel, base or "."): src for rel, src in files.items()}, dst)
    return dst / os.path.relpath(main_rel, base or ".")


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
        files = dependencies(src, fmt, root_p)
        if len(files) > 1:
            main_rel = src.resolve().relative_to(root_p.resolve()).as_posix()
            path = place_with_dependencies(files, main_rel, assets / item["uid"])
            return {**ok_row(item, path, t0), "license": license}
    path = place_file(src, assets / f"{item['uid']}.{fmt}")
    return {**ok_row(item, path, t0), "license": license}
