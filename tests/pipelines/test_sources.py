"""Sources: procedural assets (deterministic, real textured GLBs), local folders (uids, formats, OBJ
companions, bad files, unreadable folders) and the GSO layout, through `python -m pipelines.data`."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from pipelines.data import main as data_main
from pipelines.procedural.basic import SHAPES, TEXTURES, describe, make_procedural_asset
from pipelines.sources import SourceError, parse_source
from pipelines.sources.local import candidates as local_candidates

LOCAL = ["data.executor=local", "data.max_assets=0", "data.procedural_sheet_assets=0"]  # no Blender sheet here


def rows_of(out: Path, stage: str) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(out / "manifest" / f"{stage}.parquet").to_pylist()}


# ---------------------------------------------------------------------------------------------- procedural


def test_procedural_is_deterministic_real_and_textured(tmp_path):
    a = make_procedural_asset(3, tmp_path / "a.glb", 64)
    b = make_procedural_asset(3, tmp_path / "b.glb", 64)
    assert a["bytes"] == b["bytes"]
    assert (tmp_path / "a.glb").read_bytes() == (tmp_path / "b.glb").read_bytes()
    assert a["license"] == "cc0" and a["attribution"] == "GTR toolkit procedural"
    scene = trimesh.load(tmp_path / "a.glb")  # trimesh's own glTF reader, not our writer
    (mesh,) = scene.geometry.values()
    assert len(mesh.faces) == a["faces"] > 0
    img = mesh.visual.material.baseColorTexture
    assert img.size == (64, 64)
    uv = mesh.visual.uv
    assert uv.shape == (len(mesh.vertices), 2) and uv.min() >= 0 and uv.max() <= 1
    ext = mesh.bounds[1] - mesh.bounds[0]
    assert ext.max() > 0.3


def test_procedural_variety_and_hard_textures(tmp_path):
    combos = {describe(i) for i in range(32)}
    assert combos == {(s, t) for s in SHAPES for t in TEXTURES}  # every shape meets every texture
    for i in range(8):
        info = make_procedural_asset(i, tmp_path / f"{i}.glb", 128)
        (mesh,) = trimesh.load(info["path"]).geometry.values()
        tex = np.asarray(mesh.visual.material.baseColorTexture.convert("L"), dtype=np.float32)
        # hard textures have strong pixel-to-pixel changes: mean |horizontal gradient| well above a smooth image's
        assert np.abs(np.diff(tex, axis=1)).mean() > 3.0, info["texture"]
    # text: ink (dark) on a light background, in several sizes -> both tones present
    (mesh,) = trimesh.load(tmp_path / "0.glb").geometry.values()
    assert describe(0)[1] == "text"
    gray = np.asarray(mesh.visual.material.baseColorTexture.convert("L"))
    assert (gray < 100).mean() > 0.01 and (gray > 190).mean() > 0.3


def test_data_procedural_end_to_end(tmp_path):
    out = tmp_path / "out"
    rc = data_main(["--source", "procedural", "--out", str(out), "data.procedural_count=3",
                    "data.procedural_texture_size=32", *LOCAL])
    assert rc == 0
    rows = rows_of(out, "download")
    assert len(rows) == 3
    for uid, r in rows.items():
        assert r["status"] == "ok" and Path(r["path"]).name == f"{uid}.glb"
        assert r["sha256"] == hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
        assert (r["license"], r["format"], r["source"]) == ("cc0", "glb", "procedural")
    assert (out / "configs" / "data.yaml").exists()


def test_parse_source_errors(tmp_path):
    assert parse_source("procedural") == ("procedural", "")
    assert parse_source(f"local:{tmp_path}") == ("local", str(tmp_path.resolve()))
    for bad, msg in [("s3:x", "unknown source"), ("local:", "needs a folder"),
                     (f"gso:{tmp_path / 'nope'}", "not found"), ("objaverse:x", "takes no argument")]:
        with pytest.raises(SourceError, match=msg):
            parse_source(bad)
    assert data_main(["--source", "local:/definitely/not/here", "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------------------------- local


def build_local(root: Path) -> None:
    make_procedural_asset(0, root / "a" / "box.glb", 32)
    sub = root / "objs" / "chair"
    sub.mkdir(parents=True)
    trimesh.creation.box().export(sub / "chair.obj")
    (sub / "chair.obj").write_text("mtllib chair.mtl\nusemtl wood\n" + (sub / "chair.obj").read_text())
    (sub / "tex").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(sub / "tex" / "wood.png")
    (root.parent / "secret.png").write_bytes(b"\x89PNG outside the source folder: not to be copied")
    (sub / "chair.mtl").write_text("newmtl wood\nmap_Kd -s 1 1 1 tex/wood.png\nmap_Bump ../../../secret.png\n")
    trimesh.creation.icosphere().export(root / "ball.ply")
    trimesh.creation.cone(0.5, 1.0).export(root / "cone.stl")
    (root / "empty.stl").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    (root / "picture.glb").write_bytes(buf.getvalue())  # a PNG pretending to be a glb
    (root / "notes.txt").write_text("ignored: not a mesh extension")


def test_local_folder(tmp_path):
    root, out = tmp_path / "meshes", tmp_path / "out"
    build_local(root)
    rc = data_main(["--source", f"local:{root}", "--out", str(out), *LOCAL])
    assert rc == 3  # finished, some failed
    rows = rows_of(out, "download")
    by_rel = {rel: rows[hashlib.sha256(rel.encode()).hexdigest()[:32]]
              for rel in ["a/box.glb", "objs/chair/chair.obj", "ball.ply", "cone.stl", "empty.stl", "picture.glb"]}
    assert len(rows) == 6
    assert by_rel["empty.stl"]["status"] == "failed" and by_rel["empty.stl"]["reason"] == "zero-byte file"
    assert by_rel["picture.glb"]["status"] == "failed"
    assert "not a glb: no glTF magic (looks like png)" in by_rel["picture.glb"]["reason"]
    for rel in ["a/box.glb", "ball.ply", "cone.stl"]:
        r = by_rel[rel]
        assert r["status"] == "ok" and Path(r["path"]).suffix == Path(rel).suffix
        assert Path(r["path"]).read_bytes() == (root / rel).read_bytes()
        assert r["license"] == "unknown" and r["attribution"] == rel
    chair = by_rel["objs/chair/chair.obj"]
    folder = out / "assets" / chair["uid"]
    assert chair["status"] == "ok" and Path(chair["path"]) == folder / "chair.obj"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        ["chair.mtl", "chair.obj", "tex/wood.png"]  # the texture outside the source folder stays out
    assert len(trimesh.load(chair["path"], force="mesh").faces) == 12
    # a rerun keeps the ok ones (same inode: not redone) and retries the failures
    ino = os.stat(by_rel["ball.ply"]["path"]).st_ino
    (root / "empty.stl").write_bytes((root / "cone.stl").read_bytes())
    assert data_main(["--source", f"local:{root}", "--out", str(out), *LOCAL]) == 3
    rows2 = rows_of(out, "download")
    assert rows2[by_rel["empty.stl"]["uid"]]["status"] == "ok"
    assert os.stat(by_rel["ball.ply"]["path"]).st_ino == ino


def test_unreadable_folder_is_a_failed_row(tmp_path, monkeypatch):
    root = tmp_path / "m"
    make_procedural_asset(1, root / "ok" / "x.glb", 16)
    (root / "locked").mkdir()
    make_procedural_asset(2, root / "locked" / "y.glb", 16)
    os.chmod(root / "locked", 0)
    try:
        if os.access(root / "locked", os.R_OK):  # root ignores permissions: make the OS call fail instead
            real = os.scandir

            def scandir(path="."):
                if Path(path).name == "locked":
                    raise PermissionError(13, "Permission denied", str(path))
                return real(path)

            monkeypatch.setattr(os, "scandir", scandir)
        rows, failed = local_candidates(str(root), type("D", (), {"local_license": "x", "local_attribution": ""})())
    finally:
        os.chmod(root / "locked", 0o755)
    assert [r["locator"] for r in rows] == ["ok/x.glb"]
    assert len(failed) == 1 and failed[0]["status"] == "failed"
    assert failed[0]["reason"].startswith("unreadable folder: PermissionError") and failed[0]["name"] == "locked"


# ---------------------------------------------------------------------------------------------- gso


def build_gso(root: Path) -> None:
    for name, colour in [("Toy_Car", (10, 200, 10)), ("Mug_Blue", (10, 10, 200))]:
        meshes, tex = root / name / "meshes", root / name / "materials" / "textures"
        meshes.mkdir(parents=True)
        tex.mkdir(parents=True)
        trimesh.creation.box().export(meshes / "model.obj")
        (meshes / "model.obj").write_text("mtllib model.mtl\nusemtl material_0\n" + (meshes / "model.obj").read_text())
        # as in the released archives: the MTL names texture.png beside the mesh, the file is in materials/
        (meshes / "model.mtl").write_text("newmtl material_0\nmap_Kd texture.png\n")
        Image.new("RGB", (8, 8), colour).save(tex / "texture.png")
        (root / name / "metadata.pbtxt").write_text(f'name: "{name}"\n')
    (root / "Broken" / "thumbnails").mkdir(parents=True)


def test_gso_layout(tmp_path):
    root, out = tmp_path / "gso", tmp_path / "out"
    build_gso(root)
    assert data_main(["--source", f"gso:{root}", "--out", str(out), *LOCAL]) == 3
    rows = {r["name"]: r for r in rows_of(out, "download").values()}
    frows = {r["name"]: r for r in rows_of(out, "filter").values()}
    assert frows["Broken"]["status"] == "failed" and "meshes/model.obj missing" in frows["Broken"]["reason"]
    assert set(rows) == {"Toy_Car", "Mug_Blue"}
    car = rows["Toy_Car"]
    assert car["status"] == "ok" and car["license"] == "by" and "Google Scanned Objects" in car["attribution"]
    folder = Path(car["path"]).parents[1]
    assert Path(car["path"]) == folder / "meshes" / "model.obj"
    placed = folder / "meshes" / "texture.png"  # where the MTL looks for it
    assert np.asarray(Image.open(placed))[0, 0].tolist() == [10, 200, 10]
    assert car["uid"] == hashlib.sha256(b"Toy_Car/meshes/model.obj").hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- containment


def test_gso_object_whose_mesh_links_elsewhere_is_refused(tmp_path):
    """A GSO folder whose meshes/model.obj (or whose texture) is a symlink to a file outside the object
    folder: the link is never followed into OUT/assets."""
    root, out = tmp_path / "gso", tmp_path / "out"
    build_gso(root)
    secret = tmp_path / "secret.obj"
    secret.write_text("# secret\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (root / "Toy_Car" / "meshes" / "model.obj").unlink()
    (root / "Toy_Car" / "meshes" / "model.obj").symlink_to(secret)
    tex = root / "Mug_Blue" / "materials" / "textures" / "texture.png"
    tex.unlink()
    tex.symlink_to(secret)
    assert data_main(["--source", f"gso:{root}", "--out", str(out), *LOCAL]) == 3
    rows = {r["name"]: r for r in rows_of(out, "download").values()}
    assert rows["Toy_Car"]["status"] == "failed" and "symlink" in rows["Toy_Car"]["reason"]
    for p in (out / "assets").rglob("*"):
        assert not (p.is_file() and b"# secret" in p.read_bytes()), p


def test_local_gltf_buffer_outside_is_a_failed_row_and_nothing_outside_is_copied(tmp_path):
    root, out = tmp_path / "meshes", tmp_path / "out"
    (root / "g").mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET" * 10)
    doc = {"asset": {"version": "2.0"}, "buffers": [{"uri": "../../secret.bin", "byteLength": 60}]}
    (root / "g" / "bad.gltf").write_text(json.dumps(doc))
    Image.new("RGB", (4, 4)).save(root / "g" / "ok.png")
    (root / "g" / "link.png").symlink_to(secret)
    doc = {"asset": {"version": "2.0"}, "images": [{"uri": "ok.png"}, {"uri": "link.png"}, {"uri": str(secret)}]}
    (root / "g" / "good.gltf").write_text(json.dumps(doc))
    assert data_main(["--source", f"local:{root}", "--out", str(out), *LOCAL]) == 3
    rows = {Path(r["name"]).name: r for r in rows_of(out, "download").values()}
    assert rows["bad"]["status"] == "failed" and "buffer 0 outside the asset folder" in rows["bad"]["reason"]
    good = Path(rows["good"]["path"]).parent
    assert rows["good"]["status"] == "ok" and sorted(p.name for p in good.iterdir()) == ["good.gltf", "ok.png"]
    for p in (out / "assets").rglob("*"):
        assert not (p.is_file() and b"SECRET" in p.read_bytes()), p


# ---------------------------------------------------------------------------------------------- omniobject3d


def build_omniobject3d(root: Path) -> Path:
    """The layout OmniObject3D publishes (its README "Dataset format"), as `odl get` unpacks it:
    raw/raw_scans/<category>/<object_id>/Scan/{Scan.obj, Scan.mtl, Scan.jpg}; one object without its scan."""
    scans = root / "raw" / "raw_scans"
    for cat, obj, colour in [("apple", "apple_001", (200, 20, 20)), ("apple", "apple_002", (20, 200, 20)),
                             ("toy_car", "toy_car_003", (20, 20, 200))]:
        scan = scans / cat / obj / "Scan"
        scan.mkdir(parents=True)
        trimesh.creation.box().export(scan / "Scan.obj")
        (scan / "Scan.obj").write_text("mtllib Scan.mtl\nusemtl material_0\n" + (scan / "Scan.obj").read_text())
        (scan / "Scan.mtl").write_text("newmtl material_0\nmap_Kd Scan.jpg\n")
        Image.new("RGB", (8, 8), colour).save(scan / "Scan.jpg")
    (scans / "toy_car" / "toy_car_004" / "images").mkdir(parents=True)
    return root


def test_omniobject3d_layout(tmp_path):
    root, out = build_omniobject3d(tmp_path / "omni"), tmp_path / "out"
    assert parse_source(f"omniobject3d:{root}") == ("omniobject3d", str(root.resolve()))
    assert data_main(["--source", f"omniobject3d:{root}", "--out", str(out), *LOCAL]) == 3  # one broken folder
    rows = {r["name"]: r for r in rows_of(out, "download").values()}
    frows = {r["name"]: r for r in rows_of(out, "filter").values()}
    assert frows["toy_car_004"]["status"] == "failed" and "Scan/Scan.obj missing" in frows["toy_car_004"]["reason"]
    assert set(rows) == {"apple_001", "apple_002", "toy_car_003"}
    car = rows["toy_car_003"]
    assert car["status"] == "ok" and car["license"] == "by" and "OmniObject3D" in car["attribution"]
    assert car["uid"] == hashlib.sha256(b"toy_car/toy_car_003/Scan/Scan.obj").hexdigest()[:32]
    placed = Path(car["path"])
    assert placed.name == "Scan.obj" and (placed.parent / "Scan.mtl").is_file()
    src = root / "raw" / "raw_scans" / "toy_car" / "toy_car_003" / "Scan"
    assert (placed.parent / "Scan.jpg").read_bytes() == (src / "Scan.jpg").read_bytes()  # the texture, unchanged
    # the raw_scans folder itself names the same objects, with the same uids
    out2 = tmp_path / "out2"
    data_main(["--source", f"omniobject3d:{root / 'raw' / 'raw_scans'}", "--out", str(out2), *LOCAL])
    assert {r["uid"] for r in rows_of(out2, "download").values()} == {r["uid"] for r in rows.values()}


def test_omniobject3d_scan_linked_elsewhere_is_refused(tmp_path):
    """A Scan.obj (or its texture) that is a symlink to a file outside the object folder is never copied."""
    root, out = build_omniobject3d(tmp_path / "omni"), tmp_path / "out"
    secret = tmp_path / "secret.obj"
    secret.write_text("# secret\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    scan = root / "raw" / "raw_scans" / "apple" / "apple_001" / "Scan"
    (scan / "Scan.obj").unlink()
    (scan / "Scan.obj").symlink_to(secret)
    tex = root / "raw" / "raw_scans" / "apple" / "apple_002" / "Scan" / "Scan.jpg"
    tex.unlink()
    tex.symlink_to(secret)
    data_main(["--source", f"omniobject3d:{root}", "--out", str(out), *LOCAL])
    rows = {r["name"]: r for r in rows_of(out, "download").values()}
    assert rows["apple_001"]["status"] == "failed" and "symlink" in rows["apple_001"]["reason"]
    for p in (out / "assets").rglob("*"):
        assert not (p.is_file() and b"# secret" in p.read_bytes()), p
