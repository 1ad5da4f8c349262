"""The `world` preset: a Zeroverse-class procedural asset (LRM-Zero, Xie et al. 2024), written as one .glb.

`make_world_asset(seed, index, difficulty, path, texture_size)` draws the recipe
(`pipelines.procedural.recipe`), builds and unions the parts (`solid`), renders each material's texture
(`textures`) into one atlas (1 tile, or 2 x 2 tiles for 2-4 materials), encodes it as JPEG and writes the
.glb (`glb`) atomically. It returns the asset's description: the columns evaluation splits by (parts,
primitive kinds, augmentations actually applied, texture kinds), what it measures (faces, components,
genus, watertight) and any fallback taken, with the reason.

Deterministic: the same (seed, index, difficulty, texture_size) give the same bytes on the same software
stack (every draw comes from generators seeded by them; manifold3d's booleans were checked to repeat).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.io import atomic_write_bytes
from pipelines.procedural.glb import GlbMaterial, write_glb
from pipelines.procedural.recipe import AUGMENTATIONS, Recipe, make_recipe, quantise_difficulty
from pipelines.procedural.solid import Geometry, Tile, build
from pipelines.procedural.textures import make_texture

PRESET = "world"
JPEG_QUALITY = 90  # 4:4:4 chroma: fine coloured stripes and small text keep their colour edges
Z_UP_TO_GLTF = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float32)  # Blender's importer undoes it


def uid_for(seed: int, index: int, difficulty: float) -> str:
    """`procedural-w50-s0-000123`: preset, difficulty x 100 and seed are in the uid, so that assets made with
    other settings never take each other's place on a resumed run (WebDataset-safe: no dots)."""
    return f"procedural-w{round(quantise_difficulty(difficulty) * 100)}-s{int(seed)}-{int(index):06d}"


def atlas_tiles(materials: int) -> list[Tile]:
    """UV squares of `materials` textures: the whole image for one, quarters (row-major) for 2-4."""
    if materials == 1:
        return [(0.0, 0.0, 1.0)]
    return [((k % 2) * 0.5, (k // 2) * 0.5, 0.5) for k in range(materials)]


def atlas(recipe: Recipe, size: int) -> Image.Image:
    """The base-colour atlas of `recipe` ([size, size] RGB): material k's texture in its tile."""
    tiles = atlas_tiles(len(recipe.materials))
    img = Image.new("RGB", (size, size), (128, 128, 128))
    for k, (mat, (u0, v0, side)) in enumerate(zip(recipe.materials, tiles)):
        px = int(round(side * size))
        tex = make_texture(mat.texture, px, (recipe.seed, recipe.index, 3, k), mat.detail)
        img.paste(tex, (int(round(u0 * size)), int(round(v0 * size))))
    return img


def applied_augmentations(recipe: Recipe, geom: Geometry) -> list[str]:
    """The recipe's augmentations that made it into the geometry (a fallback removes its own), in order."""
    used = set()
    for i, p in enumerate(recipe.parts):
        if (i, "solid") in geom.undone:
            continue
        for aug in (p.displacement, ("hole" if p.cut.through else "cut") if p.cut else "",
                    "wire" if p.wire else "", "separate" if p.separate else ""):
            if aug and (i, aug) not in geom.undone:
                used.add(aug)
    return [a for a in AUGMENTATIONS if a in used]


def describe(recipe: Recipe, geom: Geometry, texture_size: int) -> dict[str, Any]:
    """The description columns of one asset (JSON-safe, fixed key order)."""
    used = sorted({int(m) for m in np.unique(geom.face_material)})
    return {
        "preset": PRESET, "seed": recipe.seed, "index": recipe.index, "difficulty": recipe.difficulty,
        "parts": len(recipe.parts), "kinds": [p.kind for p in recipe.parts],
        "augmentations": applied_augmentations(recipe, geom),
        "textures": [recipe.materials[k].texture for k in used], "materials": len(used),
        "roughness": [round(recipe.materials[k].roughness, 3) for k in used],
        "metallic": [round(recipe.materials[k].metallic, 3) for k in used],
        "texture_size": int(texture_size), "faces": int(len(geom.faces)), "vertices": int(len(geom.positions)),
        "components": geom.components, "genus": geom.genus, "watertight": geom.watertight,
        "fallbacks": list(geom.fallbacks),
    }


def asset_name(desc: dict[str, Any]) -> str:
    """A readable one-line name: `3 parts (box, torus, cone); cut, wire; text, voronoi #123`."""
    kinds = ", ".join(dict.fromkeys(desc["kinds"]))
    augs = ", ".join(desc["augmentations"]) or "plain"
    n = desc["parts"]
    return f"{n} part{'s' if n > 1 else ''} ({kinds}); {augs}; {', '.join(desc['textures'])} #{desc['index']}"


def make_world_asset(seed: int, index: int, difficulty: float, path: str | Path, texture_size: int = 512,
                     timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Write world asset (seed, index, difficulty) as a .glb at `path` (atomically); return its description
    (plus uid, name, bytes and path). `timings`, when given, accumulates seconds per step (bench.procedural)."""
    if texture_size < 16:
        raise ValueError(f"procedural texture_size must be >= 16, got {texture_size}")
    clock = _Clock(timings)
    recipe = make_recipe(seed, index, difficulty)
    clock("recipe")
    geom = build(recipe, atlas_tiles(len(recipe.materials)))
    clock("geometry")
    image = atlas(recipe, texture_size)
    clock("textures")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    clock("jpeg")
    mats = [GlbMaterial(f"{m.texture}_{k}", m.roughness, m.metallic) for k, m in enumerate(recipe.materials)]
    data = write_glb(geom.positions @ Z_UP_TO_GLTF.T, geom.normals @ Z_UP_TO_GLTF.T, geom.uvs, geom.faces,
                     geom.face_material, mats, buf.getvalue(), "image/jpeg")
    clock("glb")
    path = Path(path)
    atomic_write_bytes(path, data)
    clock("write")
    desc = describe(recipe, geom, texture_size)
    return {"uid": uid_for(seed, index, difficulty), "name": asset_name(desc), "description": desc,
            "bytes": len(data), "path": str(path)}


class _Clock:
    """Adds the seconds since the previous call to `timings[step]` (nothing when `timings` is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def __call__(self, step: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[step] = self.timings.get(step, 0.0) + now - self.t
            self.t = now


def description_json(desc: dict[str, Any]) -> str:
    """The manifest's `description` column: compact JSON in the description's own key order."""
    return json.dumps(desc, separators=(",", ":"))
