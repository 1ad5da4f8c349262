"""Procedural world assets through Blender: every augmentation imports, renders with a non-empty mask, and has
the triangle count Blender's own glTF importer reads; the contact sheet of `make data` renders and is reused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")

from core.cameras import orbit_views  # noqa: E402
from core.config import RenderConfig, load_config  # noqa: E402
from pipelines.data import main as data_main  # noqa: E402
from pipelines.procedural.recipe import AUGMENTATIONS, make_recipe  # noqa: E402
from pipelines.procedural.world import make_world_asset  # noqa: E402
from pipelines.procedural_sheet import current, make_sheet  # noqa: E402
from render.blender import render_asset  # noqa: E402

pytestmark = pytest.mark.blender


def one_of_each() -> list[int]:
    """The first small (<= 3 parts) difficulty-1 asset showing each augmentation, and one with 3-4 materials."""
    picks: list[int] = []
    recipes = [make_recipe(0, i, 1.0) for i in range(200)]
    for aug in AUGMENTATIONS:
        picks.append(next(i for i, r in enumerate(recipes) if aug in r.augmentations() and len(r.parts) <= 3))
    picks.append(next(i for i, r in enumerate(recipes) if len(r.materials) >= 3))
    return sorted(set(picks))


def test_every_augmentation_imports_and_renders_with_a_mask(tmp_path):
    cfg = RenderConfig(resolution=32, samples=4, adaptive_threshold=0.0, threads=2)
    views = orbit_views(2, 2.6)["c2w"]
    seen = set()
    for i in one_of_each():
        info = make_world_asset(0, i, 1.0, tmp_path / f"{i}.glb", 64)
        seen |= set(info["description"]["augmentations"])
        job = {"uid": info["uid"], "path": info["path"], "format": "glb", "source": "procedural", "license": "cc0"}
        row = render_asset(job, tmp_path / "r" / info["uid"], cfg, {"": views}, threads=2)
        assert row["status"] == "ok", (info["name"], row["reason"])
        assert row["faces"] == info["description"]["faces"], info["name"]  # Blender's importer counts the same
        assert row["missing_textures"] == 0
        for v in range(len(views)):
            alpha = np.asarray(Image.open(tmp_path / "r" / info["uid"] / f"{v:02d}.rgba.png"))[..., 3]
            assert (alpha > 128).mean() > 0.01, (info["name"], v)  # the object is in the picture
    assert seen == set(AUGMENTATIONS)


def test_make_data_renders_a_contact_sheet_once(tmp_path):
    out = tmp_path / "out"
    args = ["--source", "procedural", "--out", str(out), "data.procedural_count=5", "data.executor=local",
            "data.procedural_texture_size=32", "data.procedural_sheet_assets=3", "render.resolution=32",
            "render.samples=4", "render.threads=2"]
    assert data_main(args) == 0
    sheet = np.asarray(Image.open(out / "procedural" / "sheet.png").convert("L"))
    stamp = json.loads((out / "procedural" / "sheet.json").read_text())
    assert len(stamp["uids"]) == 3 and stamp["rendered"] == sorted(stamp["uids"])
    assert (sheet < 200).mean() > 0.005  # objects (and captions) on white
    assert not (out / "procedural" / "sheet_run").exists()  # the scratch render root is gone
    cfg = load_config("configs/demo.yaml", [f"out={out}", "data.procedural_sheet_assets=3",
                                            "render.resolution=32", "render.samples=4"])
    chosen, _, done = current(cfg)
    assert done and [r["uid"] for r in chosen] == stamp["uids"]
    mtime = (out / "procedural" / "sheet.png").stat().st_mtime_ns
    assert make_sheet(cfg) == out / "procedural" / "sheet.png"
    assert (out / "procedural" / "sheet.png").stat().st_mtime_ns == mtime  # same files: not rendered again
    table = pq.read_table(out / "procedural" / "assets.parquet").to_pylist()
    assert {r["uid"] for r in table} >= set(stamp["uids"])
