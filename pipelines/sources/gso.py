"""`SOURCE=gso:<dir>`: Google Scanned Objects, one folder per object (`<name>/meshes/model.obj`,
`<name>/meshes/model.mtl`, `<name>/materials/textures/texture.png`).

uid = the local source's hash of `<name>/meshes/model.obj`; `name` = the folder name. Each object becomes
`OUT/assets/<uid>/` holding `meshes/model.obj`, its MTL and texture in the same relative layout. The MTL of
the released archives names `texture.png` beside the mesh while the file lives in `materials/textures/`;
a reference that does not resolve is therefore also looked up there by file name and placed where the MTL
expects it, so Blender's OBJ importer finds it. License CC BY 4.0 (the dataset's license).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipelines.assets import VerifyError, is_inside, ok_row, place_folder, verify_file
from pipelines.sources.local import (
    MTL_MAP_KEYS,
    NOT_TEXT,
    dependencies,
    folder_failed,
    is_text,
    shown,
    uid_for,
    unreadable,
)

LICENSE = "by"  # CC BY 4.0, in objaverse's short names
ATTRIBUTION = "Google Scanned Objects (Downs et al., 2022), Google LLC, CC BY 4.0"
AUTHOR = "Google"
# Each object's page on Gazebo Fuel, where the collection is published; the folder name is the model's name
SOURCE_URL = "https://app.gazebosim.org/GoogleResearch/fuel/models/{name}"
MESH = "meshes/model.obj"


def candidates(root: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One candidate per object folder with `meshes/model.obj`; failed rows for folders without it."""
    rootp = Path(root)
    rows, failed = [], []
    try:
        names = sorted(e.name for e in os.scandir(rootp) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        return [], [folder_failed("./", ".", "gso", unreadable(e))]
    for name in names:
        if not is_text(name):
            failed.append(folder_failed(shown(name) + "/", shown(name), "gso", NOT_TEXT))
            continue
        rel = f"{name}/{MESH}"
        base = {"uid": uid_for(rel), "source": "gso", "name": name, "license": LICENSE,
                "attribution": f"{ATTRIBUTION}: {name}", "author": AUTHOR,
                "source_url": SOURCE_URL.format(name=quote(name)), "format": "obj", "locator": rel}
        try:
            os.listdir(rootp / name)
            has_mesh = (rootp / rel).is_file()
        except OSError as e:
            failed.append({**base, "status": "failed",
                           "reason": unreadable(e)})
            continue
        if not has_mesh:
            failed.append({**base, "status": "failed", "reason": f"not a GSO object folder: {MESH} missing"})
            continue
        rows.append(base)
    return rows, failed


def _expected_textures(mtl: Path) -> list[str]:
    """Texture names an MTL asks for (last token of each map line), relative to the MTL's folder."""
    out = []
    for raw in mtl.read_bytes().splitlines():
        key, _, rest = raw.decode("utf-8", "replace").strip().partition(" ")
        if key.lower() in MTL_MAP_KEYS and rest.split():
            out.append(rest.split()[-1].replace("\\", "/"))
    return out


def fetch(item: dict, assets_dir: str, root: str, max_bytes: int | None = None) -> dict[str, Any]:
    """Download step for GSO: verify the OBJ, copy OBJ + MTL + textures into `assets_dir/<uid>/`."""
    t0 = time.perf_counter()
    obj_dir = Path(root) / item["name"]
    if not is_inside(Path(root), obj_dir) or Path(item["name"]).name != item["name"]:
        raise VerifyError(f"object folder {item['name']!r} resolves outside the GSO folder")
    obj = obj_dir / MESH
    if not is_inside(obj_dir, obj):  # a link to a file elsewhere would be copied as if it were the object
        raise VerifyError(f"{MESH} resolves outside the object folder (a symlink); refused")
    verify_file(obj, "obj", max_bytes=max_bytes)
    files = dependencies(obj, "obj", obj_dir)  # {folder-relative name: real file}, MESH included
    textures = obj_dir / "materials" / "textures"
    for mtl in [p for p in files.values() if p.suffix.lower() == ".mtl"]:
        for ref in _expected_textures(mtl):
            target = (mtl.parent / ref)
            if target.is_file() or ref.startswith("/") or ".." in Path(ref).parts:
                continue
            found = textures / Path(ref).name
            if found.is_file() and is_inside(obj_dir, found):
                files[(mtl.parent.relative_to(obj_dir.resolve()) / ref).as_posix()] = found
    for rel, src in files.items():
        if rel != MESH and src.stat().st_size == 0:
            raise VerifyError(f"zero-byte file: {rel}")
    dst = Path(assets_dir) / item["uid"]
    place_folder(files, dst)
    return ok_row(item, dst / MESH, t0)
