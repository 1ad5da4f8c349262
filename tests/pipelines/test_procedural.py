"""The procedural world (pipelines/procedural/): determinism across processes, diversity over 500 assets,
geometry and UVs checked through trimesh's own glTF reader (watertightness, components, genus by Euler
characteristic, UV stretch against the cube-projection bound, no mirrored texture), boolean fallbacks,
the texture family, the held-out split and `make data` with its description table."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import manifold3d as m3d
import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from core.config import load_config
from core.layout import UID_RE
from pipelines import evalset as E
from pipelines.data import main as data_main
from pipelines.executor import run_item
from pipelines.procedural import textures as T
from pipelines.procedural.recipe import AUGMENTATIONS, PRIMITIVES, Cut, make_recipe
from pipelines.procedural.solid import ProceduralError, build, solid_part
from pipelines.procedural.world import atlas_tiles, make_world_asset, uid_for
from pipelines.sources import candidates
from pipelines.sources.procedural import fetch

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["data.executor=local", "data.procedural_sheet_assets=0"]


def load_parts(path: Path) -> list[trimesh.Trimesh]:
    """The glb's primitives as trimesh meshes (trimesh's glTF reader: one geometry per primitive)."""
    scene = trimesh.load(path)
    return list(scene.geometry.values())


def welded(path: Path) -> trimesh.Trimesh:
    """All primitives as one mesh with corners at the same position merged (UV and normal seams ignored)."""
    verts, faces, offset = [], [], 0
    for p in load_parts(path):
        verts.append(p.vertices)
        faces.append(p.faces + offset)
        offset += len(p.vertices)
    mesh = trimesh.Trimesh(np.concatenate(verts), np.concatenate(faces), process=False)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_the_same_bytes_in_any_process(tmp_path):
    a = make_world_asset(3, 17, 1.0, tmp_path / "a.glb", 64)
    b = make_world_asset(3, 17, 1.0, tmp_path / "b.glb", 64)
    assert (tmp_path / "a.glb").read_bytes() == (tmp_path / "b.glb").read_bytes()
    assert a["description"] == b["description"]
    code = ("import sys; from pipelines.procedural.world import make_world_asset; "
            "make_world_asset(3, 17, 1.0, sys.argv[1], 64)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}  # another set/dict hash order
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.glb")], check=True, env=env, cwd=ROOT)
    assert (tmp_path / "c.glb").read_bytes() == (tmp_path / "a.glb").read_bytes()
    make_world_asset(4, 17, 1.0, tmp_path / "d.glb", 64)  # another seed: another asset
    make_world_asset(3, 18, 1.0, tmp_path / "e.glb", 64)
    digests = {hashlib.sha256((tmp_path / f"{n}.glb").read_bytes()).hexdigest() for n in "ade"}
    assert len(digests) == 3


def test_uids_are_webdataset_safe_and_name_their_settings():
    assert uid_for(0, 42, 0.5) == "procedural-w50-s0-000042"
    assert uid_for(7, 123456, 1.0) == "procedural-w100-s7-123456"
    assert uid_for(0, 1_000_000, 0.0) == "procedural-w0-s0-1000000"
    assert all(UID_RE.fullmatch(u) for u in (uid_for(2**63 - 1, 10**9, 0.37), "procedural-0042"))
    with pytest.raises(ValueError, match="procedural_difficulty"):
        uid_for(0, 1, 1.5)


# ---------------------------------------------------------------------------------------------- diversity


@pytest.fixture(scope="module")
def world500(tmp_path_factory) -> list[dict]:
    """500 assets of the default world (difficulty 0.5), with 16² textures: the geometry is what is measured."""
    root = tmp_path_factory.mktemp("world500")
    return [make_world_asset(0, i, 0.5, root / f"{i}.glb", 16) for i in range(500)]


def test_diversity_over_500_assets(world500):
    descs = [a["description"] for a in world500]
    kinds = {k for d in descs for k in d["kinds"]}
    assert kinds == set(PRIMITIVES), set(PRIMITIVES) - kinds
    augs = {a for d in descs for a in d["augmentations"]}
    assert augs == set(AUGMENTATIONS), set(AUGMENTATIONS) - augs
    tex = {t for d in descs for t in d["textures"]}
    assert tex == set(T.TEXTURE_KINDS), set(T.TEXTURE_KINDS) - tex
    parts = np.array([d["parts"] for d in descs])
    assert set(parts) == {1, 2, 3, 4, 5}  # difficulty 0.5: up to 1 + 8 * 0.5 parts
    assert min(np.bincount(parts)[1:]) > 50  # each count well represented
    faces = np.array([d["faces"] for d in descs])
    assert np.percentile(faces, 90) > 8 * np.percentile(faces, 10)  # from a dozen triangles to thousands
    assert sum(d["components"] > 1 for d in descs) > 25  # multi-component
    assert sum(d["genus"] > 0 for d in descs) > 50  # holes, tori, tubes, wire-frames
    assert sum(d["materials"] > 1 for d in descs) > 50
    assert sum(d["watertight"] for d in descs) >= 495  # the rest: coincident float32 vertices, recorded
    assert len({hashlib.sha256(Path(a["path"]).read_bytes()).hexdigest() for a in world500}) == 500


def test_difficulty_scales_the_distribution():
    easy = [make_recipe(0, i, 0.0) for i in range(200)]
    wild = [make_recipe(0, i, 1.0) for i in range(200)]
    assert all(len(r.parts) == 1 and not r.augmentations() and len(r.materials) == 1 for r in easy)
    assert max(len(r.parts) for r in wild) == 9
    assert sum(len(r.augmentations()) for r in wild) > 300
    hard = set(T.HARD_KINDS)
    share = [np.mean([m.texture in hard for r in rs for m in r.materials]) for rs in (easy, wild)]
    assert share[0] < 0.35 < 0.45 < share[1]


def test_watertight_components_and_genus_agree_with_trimesh(world500):
    for a in world500[:60]:
        d, mesh = a["description"], welded(Path(a["path"]))
        assert mesh.is_watertight == d["watertight"], a["uid"]
        bodies = mesh.split(only_watertight=False)
        assert len(bodies) == d["components"], a["uid"]
        genus = sum((2 - b.euler_number) // 2 for b in bodies)  # closed orientable: chi = 2 - 2g
        assert genus == d["genus"], a["uid"]
        assert len(mesh.faces) == d["faces"]


def test_uvs_are_unstretched_unmirrored_and_inside_their_tile(world500):
    for a in world500[:80]:
        d = a["description"]
        tiles = atlas_tiles(len(make_recipe(0, d["index"], 0.5).materials))
        for part in load_parts(Path(a["path"])):
            k = int(part.visual.material.name.rsplit("_", 1)[1])
            u0, v0, side = tiles[k]
            uv = part.visual.uv  # trimesh's reader flips glTF's v: (u, v up)
            assert uv[:, 0].min() >= u0 - 1e-6 and uv[:, 0].max() <= u0 + side + 1e-6
            assert (1 - uv[:, 1]).min() >= v0 - 1e-6 and (1 - uv[:, 1]).max() <= v0 + side + 1e-6
            tri, tuv = part.vertices[part.faces], uv[part.faces]
            e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
            n = np.cross(e1, e2)
            area = np.linalg.norm(n, axis=1)
            keep = area > 1e-6 * area.max()
            t1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
            t2 = np.cross(n / area[:, None].clip(1e-30), t1)
            X = np.stack([np.stack([(e1 * t1).sum(1), (e1 * t2).sum(1)], 1),
                          np.stack([(e2 * t1).sum(1), (e2 * t2).sum(1)], 1)], 1)  # [F, 2 edges, 2]
            U = np.stack([tuv[:, 1] - tuv[:, 0], tuv[:, 2] - tuv[:, 0]], 1)  # [F, 2 edges, 2]
            J = np.linalg.solve(X[keep], U[keep])  # tangent plane -> uv
            s = np.linalg.svd(J, compute_uv=False)
            # a cube projection onto the dominant axis stretches by 1/cos <= sqrt(3) in one direction only
            assert (s[:, 0] / s[:, 1]).max() <= np.sqrt(3) * 1.01, a["uid"]
            assert (np.linalg.det(J) > 0).all(), a["uid"]  # seen from outside, never mirrored


# ---------------------------------------------------------------------------------------------- the file


def test_glb_is_valid_gltf_with_one_jpeg_atlas(tmp_path):
    info = make_world_asset(0, 4, 1.0, tmp_path / "a.glb", 128)
    data = (tmp_path / "a.glb").read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert (magic, version, length) == (b"glTF", 2, len(data))
    n_json = struct.unpack("<I", data[12:16])[0]
    doc = json.loads(data[20:20 + n_json])
    assert len(doc["images"]) == 1 and doc["images"][0]["mimeType"] == "image/jpeg"
    assert len(doc["meshes"][0]["primitives"]) == info["description"]["materials"]
    for m in doc["materials"]:
        pbr = m["pbrMetallicRoughness"]
        assert 0.35 <= pbr["roughnessFactor"] <= 1.0 and 0.0 <= pbr["metallicFactor"] <= 0.6
    parts = load_parts(tmp_path / "a.glb")
    img = parts[0].visual.material.baseColorTexture
    assert img.size == (128, 128)
    v = np.concatenate([p.vertices for p in parts])
    ext = v.max(0) - v.min(0)
    assert abs(ext.max() - 1.0) < 1e-5 and np.abs(v.max(0) + v.min(0)).max() < 1e-5  # centred, largest side 1
    for p in parts:
        assert np.allclose(np.linalg.norm(p.vertex_normals, axis=1), 1.0, atol=1e-3)
    assert info["bytes"] == len(data) < 1_000_000


# ---------------------------------------------------------------------------------------------- fallbacks


def _single(kind: str = "box", **part_changes) -> object:
    r = make_recipe(0, 0, 0.0)
    part = dataclasses.replace(r.parts[0], kind=kind, size=(1.0, 0.8, 0.6), **part_changes)
    return dataclasses.replace(r, parts=(part,))


def test_a_cut_that_leaves_too_little_is_undone_with_a_reason():
    eye = tuple(np.eye(3).ravel())
    swallow = Cut(kind="box", through=False, size=(3.0, 3.0, 3.0), rotation=eye, offset=(0.2, 0.0, 0.0))
    g = build(_single(cut=swallow), atlas_tiles(1))
    assert len(g.faces) == 12 and g.watertight  # the whole box, uncut
    assert any("kept uncut" in f for f in g.fallbacks) and (0, "cut") in g.undone
    bite = Cut(kind="box", through=False, size=(0.4, 0.4, 0.4), rotation=eye, offset=(0.5, 0.4, 0.3))
    g = build(_single(cut=bite), atlas_tiles(1))
    assert len(g.faces) > 12 and not g.fallbacks  # a corner notch: more faces, nothing undone


def _open_box(*_args) -> m3d.Manifold:
    box = trimesh.creation.box()
    mesh = m3d.Mesh(vert_properties=box.vertices.astype(np.float32),
                    tri_verts=box.faces[:-1].astype(np.uint32))  # one triangle missing: not closed
    return m3d.Manifold(mesh)


def test_a_part_that_is_no_solid_is_kept_as_a_shell():
    recipe = make_recipe(0, 3, 0.5)
    assert not recipe.parts[0].wire and len(recipe.parts) > 1

    def part_fn(part, rng, log, i):
        return _open_box() if i == 0 else solid_part(part, rng, log, i)

    g = build(recipe, atlas_tiles(len(recipe.materials)), part_fn=part_fn)
    assert not g.watertight and (0, "solid") in g.undone
    assert any("not a closed 2-manifold (NotManifold)" in f for f in g.fallbacks)
    full = build(recipe, atlas_tiles(len(recipe.materials)))
    assert full.watertight and not full.fallbacks and len(g.faces) != len(full.faces)


def test_nothing_buildable_fails_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr("pipelines.procedural.solid.primitive", lambda *a: m3d.Manifold())  # every part empty
    with pytest.raises(ProceduralError, match="no part could be built"):
        build(_single(), atlas_tiles(1))
    row = run_item(fetch, {"uid": "x", "locator": "0"},
                   {"assets_dir": str(tmp_path), "texture_size": 16, "preset": "world", "difficulty": 0.0})
    assert row["status"] == "failed" and row["reason"].startswith("no part could be built"), row
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------- textures


@pytest.mark.parametrize("kind", T.TEXTURE_KINDS)
def test_every_texture_kind_is_deterministic_and_sized(kind):
    a = np.asarray(T.make_texture(kind, 64, (1, 2), 0.5))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(T.make_texture(kind, 64, (1, 2), 0.5)))


def test_texture_kinds_have_their_look():
    solid = np.asarray(T.make_texture("solid", 128, (0,), 0.5))
    assert len(np.unique(solid.reshape(-1, 3), axis=0)) == 1
    grad = np.asarray(T.make_texture("gradient", 256, (0,), 0.5)).astype(float)
    assert np.abs(np.diff(grad, axis=1)).max() <= 8 and np.ptp(grad) > 20  # smooth, yet not flat

    def edges(img: np.ndarray) -> float:  # share of pixels that differ from their right neighbour
        return float((np.abs(np.diff(img.astype(int), axis=1)).sum(-1) > 0).mean())

    coarse = np.mean([edges(np.asarray(T.make_texture("checker", 256, (s,), 0.0))) for s in range(8)])
    fine = np.mean([edges(np.asarray(T.make_texture("checker", 256, (s,), 1.0))) for s in range(8)])
    assert fine > 2 * coarse  # detail shrinks the cells
    def cells(detail: float) -> float:  # distinct colours: one per cell (+ the border colour)
        return np.mean([len(np.unique(np.asarray(T.make_texture("voronoi", 256, (s,), detail)).reshape(-1, 3),
                                      axis=0)) for s in range(6)])

    assert cells(0.0) >= 6 and cells(1.0) > 2 * cells(0.0)
    txt = np.asarray(T.make_texture("text", 256, (5,), 0.5).convert("L")).astype(float)
    bg = np.median(txt)
    assert 0.02 < (np.abs(txt - bg) > 60).mean() < 0.5  # ink on a plain background


# ---------------------------------------------------------------------------------------------- the source


def test_held_out_indices_follow_training_and_never_share_a_uid(tmp_path):
    cfg = load_config(None, [f"out={tmp_path}", "data.procedural_count=100", "eval.max_assets=50"])
    assert cfg.data.procedural_preset == "world"
    ecfg = E.eval_config(cfg, "procedural", "", tmp_path / "evalsets" / "procedural-heldout")
    train = candidates(cfg)[0].to_pylist()
    held = candidates(ecfg)[0].to_pylist()
    assert [int(r["locator"]) for r in held] == list(range(100, 150))
    assert not {r["uid"] for r in train} & {r["uid"] for r in held}
    assert all(UID_RE.fullmatch(r["uid"]) for r in train + held)
    basic = load_config(None, ["data.procedural_preset=basic", "data.procedural_count=3"])
    assert [r["uid"] for r in candidates(basic)[0].to_pylist()] == ["procedural-0000", "procedural-0001",
                                                                    "procedural-0002"]


def test_make_data_writes_descriptions_and_histograms(tmp_path):
    out = tmp_path / "out"
    rc = data_main(["--source", "procedural", "--out", str(out), "data.procedural_count=12", "data.max_assets=4",
                    "data.procedural_texture_size=32", "data.procedural_difficulty=1.0", *QUIET])
    assert rc == 0
    down = pq.read_table(out / "manifest" / "download.parquet").to_pylist()
    assert len(down) == 12  # procedural_count is the selection: max_assets does not sample it
    table = {r["uid"]: r for r in pq.read_table(out / "procedural" / "assets.parquet").to_pylist()}
    for r in down:
        desc = json.loads(r["description"])
        assert r["uid"] == uid_for(0, desc["index"], 1.0) and r["status"] == "ok"
        assert r["sha256"] == hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
        t = table[r["uid"]]
        assert (t["parts"], t["kinds"], t["augmentations"], t["textures"], t["faces"]) == \
            (desc["parts"], desc["kinds"], desc["augmentations"], desc["textures"], desc["faces"])
        assert r["name"].startswith(f"{desc['parts']} part") and r["name"].endswith(f"#{desc['index']}")
    assert len({r["sha256"] for r in down}) == 12
    img = Image.open(out / "procedural" / "histograms.png")
    assert img.size[0] > 600 and np.asarray(img).std() > 10
    assert not (out / "procedural" / "sheet.png").exists()


def test_bad_procedural_settings_exit_2(tmp_path, capsys):
    for bad, msg in [("data.procedural_preset=zeroverse", "unknown data.procedural_preset"),
                     ("data.procedural_difficulty=1.5", "procedural_difficulty must be in [0, 1]"),
                     ("data.procedural_seed=-1", "procedural_seed must be >= 0")]:
        assert data_main(["--source", "procedural", "--out", str(tmp_path / "o"), bad, *QUIET]) == 2
        assert msg in capsys.readouterr().err


def test_basic_preset_is_todays_8_by_4(tmp_path):
    rc = data_main(["--source", "procedural", "--out", str(tmp_path / "o"), "data.procedural_preset=basic",
                    "data.procedural_count=3", "data.procedural_texture_size=16", *QUIET])
    assert rc == 0
    rows = pq.read_table(tmp_path / "o" / "manifest" / "download.parquet").to_pylist()
    assert [r["uid"] for r in rows] == ["procedural-0000", "procedural-0001", "procedural-0002"]
    assert [json.loads(r["description"])["kinds"] for r in rows] == [["box"], ["sphere"], ["cylinder"]]
