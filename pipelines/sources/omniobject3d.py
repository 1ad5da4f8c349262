"""`SOURCE=omniobject3d:<dir>`: OmniObject3D raw scans as the dataset publishes them
(github.com/omniobject3d/OmniObject3D, "Dataset format"):

    <root>/raw_scans/<category>/<object_id>/Scan/Scan.obj   (+ Scan.mtl, Scan.jpg beside it)

`<dir>` may be the data root (holding `raw_scans/`, or `raw/raw_scans/` as `odl get` lays it out) or the
`raw_scans/` folder itself. uid = the local source's hash of `<category>/<object_id>/Scan/Scan.obj`
(relative to `raw_scans/`); `name` = the object id (e.g. `apple_001`). Each object becomes
`OUT/assets/<uid>/Scan/` with the OBJ and the MTL and textures it names. License CC BY 4.0 (the dataset's).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipelines.assets import VerifyError, is_inside, ok_row, place_folder, verify_file
from pipelines.sources.local import NOT_TEXT, dependencies, folder_failed, is_text, shown, uid_for, unreadable

SOURCE = "omniobject3d"
LICENSE = "by"  # CC BY 4.0, in objaverse's short names
ATTRIBUTION = "OmniObject3D (Wu et al., CVPR 2023), CC BY 4.0"
MESH = "Scan/Scan.obj"


def scans_root(root: str | Path) -> Path:
    """The `raw_scans/` folder of a data root given as the root, `raw/`'s parent, or raw_scans itself."""
    root = Path(root)
    for cand in (root / "raw_scans", root / "raw" / "raw_scans"):
        if cand.is_dir():
            return cand
    return root


def _dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def candidates(root: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One candidate per `<category>/<object_id>/Scan/Scan.obj`; failed rows for object folders without it."""
    scans = scans_root(root)
    rows, failed = [], []
    try:
        categories = _dirs(scans)
    except OSError as e:
        return [], [folder_failed("./", ".", SOURCE, unreadable(e))]
    for cat in categories:
        if not is_text(cat):
            failed.append(folder_failed(shown(cat) + "/", shown(cat), SOURCE, NOT_TEXT))
            continue
        try:
            objects = _dirs(scans / cat)
        except OSError as e:
            failed.append(folder_failed(f"{cat}/", cat, SOURCE, unreadable(e)))
            continue
        for obj in objects:
            if not is_text(obj):
                failed.append(folder_failed(f"{cat}/{shown(obj)}/", shown(obj), SOURCE, NOT_TEXT))
                continue
            rel = f"{cat}/{obj}/{MESH}"
            base = {"uid": uid_for(rel), "source": SOURCE, "name": obj, "license": LICENSE,
                    "attribution": f"{ATTRIBUTION}: {cat}/{obj}", "format": "obj", "locator": rel}
            if not (scans / rel).is_file():
                failed.append({**base, "status": "failed", "reason": f"not an OmniObject3D scan folder: {MESH} missing"})
                continue
            rows.append(base)
    return rows, failed


def fetch(item: dict, assets_dir: str, root: str, max_bytes: int | None = None) -> dict[str, Any]:
    """Download step: verify the OBJ, copy it with the MTL and textures it names into `assets_dir/<uid>/Scan/`."""
    t0 = time.perf_counter()
    obj = scans_root(root) / item["locator"]
    object_dir = obj.parent.parent  # <category>/<object_id>/: the folder MESH is relative to
    if not is_inside(scans_root(root), object_dir) or not is_inside(object_dir, obj):
        raise VerifyError(f"{MESH} resolves outside the object folder (a symlink); refused")
    verify_file(obj, "obj", max_bytes=max_bytes)
    files = dependencies(obj, "obj", object_dir)  # {folder-relative name: real file}, MESH included
    for rel, src in files.items():
        if rel != MESH and src.stat().st_size == 0:
            raise VerifyError(f"zero-byte file: {rel}")
    dst = Path(assets_dir) / item["uid"]
    place_folder(files, dst)
    return ok_row(item, dst / MESH, t0)
