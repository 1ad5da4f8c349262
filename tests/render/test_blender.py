"""render/blender.py against things it did not compute: closed-form geometry, scipy blob centroids, Blender's
own object bounding boxes, and files written independently with trimesh / bpy."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")
trimesh = pytest.importorskip("trimesh")

from core.cameras import (  # noqa: E402
    look_at,
    orbit_views,
    project,
    random_views,
    spherical_position,
    unproject_depth,
)
from core.config import RenderConfig  # noqa: E402
from render import blender as rb  # noqa: E402

pytestmark = pytest.mark.blender


def gltf_to_blender(p: np.ndarray) -> np.ndarray:
    """glTF is Y-up; Blender's importer maps (x, y, z) -> (x, -z, y) (closed form, glTF spec + Z-up)."""
    p = np.asarray(p, np.float64)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], -1)


def small_cfg(**kw) -> RenderConfig:
    base = dict(resolution=64, views=4, samples=8, adaptive_threshold=0.0, threads=2)
    base.update(kw)
    return RenderConfig(**base)


def load_view(folder: Path, i: int) -> dict[str, np.ndarray]:
    return {"rgba": np.asarray(Image.open(folder / f"{i:02d}.rgba.png")),
            "depth": np.asarray(Image.open(folder / f"{i:02d}.depth.png")).astype(np.float64),
            "normal": np.asarray(Image.open(folder / f"{i:02d}.normal.png")).astype(np.float64)}


def render(tmp: Path, path: Path, cfg: RenderConfig, c2w: np.ndarray, uid: str = "asset",
           **kw) -> tuple[dict, Path]:
    dest = tmp / "out" / uid
    row = rb.render_asset({"uid": uid, "path": str(path), "source": "test", "license": "cc0"}, dest, cfg,
                          {"": c2w}, threads=cfg.threads, **kw)
    return row, dest


# ----------------------------------------------------------------------------------------------------------
# Cameras and depth against known geometry
# ----------------------------------------------------------------------------------------------------------

SPHERES = np.array([[0.0, 0.0, 0.0], [1.5, 0.2, -0.3], [-0.4, 1.2, 0.5], [0.6, -0.8, 1.1], [1.0, 1.0, 1.0],
                    [-0.5, -0.6, -0.7]])  # glTF frame, radius 0.1


def test_known_points_project_onto_rendered_blobs(tmp_path):
    from scipy import ndimage

    meshes = []
    for c in SPHERES:
        s = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
        s.apply_translation(c)
        meshes.append(s)
    path = tmp_path / "spheres.glb"
    trimesh.Scene(meshes).export(path)
    # Expected normalisation from the vertices themselves (numpy), in Blender's frame after import.
    allv = gltf_to_blender(np.concatenate([m.vertices for m in meshes]))
    lo, hi = allv.min(0), allv.max(0)
    center, scale = (lo + hi) / 2, 1 / (hi - lo).max()
    points = scale * (gltf_to_blender(SPHERES) - center)

    cfg = small_cfg(resolution=96, samples=4)
    c2w = orbit_views(6)["c2w"]
    row, dest = render(tmp_path, path, cfg, c2w)
    assert row["status"] == "ok", row
    meta = json.loads((dest / "meta.json").read_text())
    np.testing.assert_allclose(meta["normalization"]["center"], center, atol=1e-5)
    np.testing.assert_allclose(meta["normalization"]["scale"], scale, rtol=1e-5)
    cams = np.load(dest / "cameras.npz")
    assert cams["c2w"].shape == (6, 4, 4) and cams["K"].shape == (6, 3, 3) and int(cams["width"]) == 96

    matched, errors = 0, []
    for i in range(len(c2w)):
        alpha = load_view(dest, i)["rgba"][..., 3].astype(np.float64) / 255.0
        labels, n = ndimage.label(alpha > 0.05)
        uv, _ = project(points, cams["c2w"][i], cams["K"][i])
        pix = np.floor(uv).astype(int)
        for lab in range(1, n + 1):
            inside = [k for k, (u, v) in enumerate(pix) if 0 <= u < 96 and 0 <= v < 96 and labels[v, u] == lab]
            if len(inside) != 1:  # overlapping spheres merge into one blob: no single centre to compare
                continue
            ys, xs = np.nonzero(labels == lab)
            w = alpha[ys, xs]
            centroid = np.array([(xs + 0.5) @ w, (ys + 0.5) @ w]) / w.sum()
            errors.append(np.linalg.norm(centroid - uv[inside[0]]))
            matched += 1
    assert matched >= 20, matched
    # The perspective shift of a sphere's silhouette centroid is < 0.05 px at this size; 1 px is the contract.
    assert max(errors) < 1.0, errors


def box_sdf(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


@pytest.fixture(scope="module")
def box_render(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("box")
    extents = np.array([2.0, 1.0, 1.4])  # glTF frame
    box = trimesh.creation.box(extents=extents)
    box.unmerge_vertices()  # flat faces: one normal per face
    box.visual.face_colors = np.repeat(np.array([[220, 40, 40, 255], [40, 220, 40, 255], [40, 40, 220, 255],
                                                  [220, 220, 40, 255], [40, 220, 220, 255],
                                                  [220, 40, 220, 255]]), 2, axis=0)
    box.apply_translation([5.0, -2.0, 3.0])
    path = tmp / "box.glb"
    box.export(path)
    half_b = np.abs(gltf_to_blender(extents)) / 2
    half_n = half_b / (2 * half_b).max()  # normalised half extents, centred at the origin
    cfg = small_cfg(resolution=64)
    c2w = random_views("box-asset", 4)["c2w"]
    row, dest = render(tmp, path, cfg, c2w, uid="box-asset")
    return row, dest, half_n


def test_depth_backprojects_onto_known_surface(box_render):
    from scipy import ndimage

    row, dest, half = box_render
    assert row["status"] == "ok", row
    meta = json.loads((dest / "meta.json").read_text())
    cams = np.load(dest / "cameras.npz")
    errs = []
    for i in range(4):
        v = load_view(dest, i)
        depth = v["depth"] / meta["depth_scale"]
        inner = ndimage.binary_erosion(v["rgba"][..., 3] == 255, iterations=1)  # off the silhouette
        depth[~inner] = 0
        assert inner.sum() > 100
        pts = unproject_depth(depth, cams["c2w"][i], cams["K"][i])
        errs.append(np.abs(box_sdf(pts, half)))
    errs = np.concatenate(errs)
    # Contract: < 0.5 % of the object size (1.0). Depth is 16-bit (1e-4 units), Cycles takes the first
    # sample's hit (jittered within the pixel), hence a tail, but not past the bound.
    assert np.percentile(errs, 99) < 0.005, np.percentile(errs, [50, 99, 100])
    assert np.median(errs) < 0.002


def test_normals_match_the_analytic_face_normals(box_render):
    from scipy import ndimage

    row, dest, half = box_render
    meta = json.loads((dest / "meta.json").read_text())
    cams = np.load(dest / "cameras.npz")
    cos = []
    for i in range(4):
        v = load_view(dest, i)
        inner = ndimage.binary_erosion(v["rgba"][..., 3] == 255, iterations=1)
        depth = np.where(inner, v["depth"] / meta["depth_scale"], 0)
        ys, xs = np.nonzero(depth > 0)
        pts = unproject_depth(depth, cams["c2w"][i], cams["K"][i])
        axis = np.argmax(np.abs(pts) - half, axis=1)  # the face the point lies on
        face = np.full(depth.shape, -1)
        face[ys, xs] = axis
        # A pixel whose footprint straddles two faces averages their normals (antialiasing): keep pixels
        # whose 3x3 neighbourhood lies on one face.
        one_face = np.ones(len(ys), bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                one_face &= face[np.clip(ys + dy, 0, 63), np.clip(xs + dx, 0, 63)] == axis
        assert one_face.sum() > 200
        expected = np.zeros_like(pts)
        expected[np.arange(len(pts)), axis] = np.sign(pts[np.arange(len(pts)), axis])
        n = v["normal"][ys, xs] / 255.0 * 2 - 1
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        cos.append((n * expected).sum(1)[one_face])
    cos = np.concatenate(cos)
    # 8-bit encoding limits the angle error to ~0.5°.
    assert (cos > np.cos(np.radians(2))).all(), np.degrees(np.arccos(cos.min()))


# ----------------------------------------------------------------------------------------------------------
# Normalisation of multi-root and parented, scaled scenes (checked with Blender's own bounding boxes)
# ----------------------------------------------------------------------------------------------------------


def blender_world_bbox() -> tuple[np.ndarray, np.ndarray]:
    """Tight world box from Blender's own mesh data and object matrices (not the depsgraph path under test)."""
    pts = []
    for obj in bpy.context.scene.objects:
        if obj.type == "MESH":
            m = np.array(obj.matrix_world)
            co = np.array([list(v.co) for v in obj.data.vertices])
            pts.append(co @ m[:3, :3].T + m[:3, 3])
    c = np.concatenate(pts)
    return c.min(0), c.max(0)


def test_normalisation_multi_root_and_parented_scaled(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=[1, 1, 1]), node_name="root_a",
                       transform=trimesh.transformations.translation_matrix([10, 0, 0]))
    parent_tf = trimesh.transformations.scale_matrix(3.0) @ trimesh.transformations.translation_matrix([0, 4, 0])
    scene.add_geometry(trimesh.creation.box(extents=[0.5, 2, 0.5]), node_name="parent", transform=parent_tf)
    child_tf = (trimesh.transformations.rotation_matrix(np.pi / 4, [0, 0, 1])
                @ trimesh.transformations.scale_matrix(0.5))
    scene.add_geometry(trimesh.creation.icosphere(radius=1.0), node_name="child", parent_node_name="parent",
                       transform=child_tf)
    path = tmp_path / "multi.glb"
    scene.export(path)

    cfg = small_cfg()
    info = rb.prepare_scene(path, None, cfg)
    lo, hi = blender_world_bbox()
    assert len([o for o in bpy.context.scene.objects if o.parent is not None]) >= 1  # hierarchy kept
    np.testing.assert_allclose((hi - lo).max(), 1.0, atol=1e-5)
    assert (lo >= -0.5 - 1e-5).all() and (hi <= 0.5 + 1e-5).all()
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
    # The stored transform reproduces the normalised vertices from the scene trimesh flattened itself.
    flat = gltf_to_blender(scene.to_geometry().vertices)
    exp = info["scale"] * (flat - info["center"])
    np.testing.assert_allclose(exp.min(0), info["vertices"].min(0), atol=1e-5)
    np.testing.assert_allclose(exp.max(0), info["vertices"].max(0), atol=1e-5)
    rb.reset_scene()


# ----------------------------------------------------------------------------------------------------------
# Formats, textures
# ----------------------------------------------------------------------------------------------------------


def write_textured_obj(folder: Path, texture: str | None, tex_size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.obj").write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\n"
                                  "vt 0 1\nusemtl mat\nf 1/1 2/2 3/3 4/4\nv 0 0 1\nf 1/1 2/2 5/3\n")
    (folder / "m.mtl").write_text("newmtl mat\nKd 1 1 1\n" + (f"map_Kd {texture}\n" if texture else ""))
    if texture == "tex.png":
        Image.fromarray(np.full((tex_size, tex_size, 3), 200, np.uint8)).save(folder / "tex.png")
    return folder / "m.obj"


@pytest.mark.parametrize("fmt", ["ply", "stl", "obj"])
def test_formats_import_and_render(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    trimesh.creation.capsule(height=1.0, radius=0.3).export(path)
    row, dest = render(tmp_path, path, small_cfg(resolution=32, views=2), random_views("f", 2)["c2w"], uid=fmt)
    assert row["status"] == "ok", row
    assert np.asarray(Image.open(dest / "00.rgba.png"))[..., 3].max() == 255


def test_fbx_written_by_blender_imports(tmp_path):
    rb.reset_scene()
    bpy.ops.mesh.primitive_monkey_add()
    path = tmp_path / "monkey.fbx"
    bpy.ops.export_scene.fbx(filepath=str(path))
    rb.reset_scene()
    row, _ = render(tmp_path, path, small_cfg(resolution=32, views=2), random_views("m", 2)["c2w"], uid="fbx")
    assert row["status"] == "ok" and row["faces"] == 968, row  # Suzanne: 500 faces -> 968 triangles


def test_missing_texture_is_recorded_not_silent(tmp_path):
    ok = write_textured_obj(tmp_path / "ok", "tex.png")
    miss = write_textured_obj(tmp_path / "miss", "nowhere.png")
    c2w = random_views("t", 2)["c2w"]
    row_ok, dest_ok = render(tmp_path, ok, small_cfg(resolution=32, views=2), c2w, uid="ok")
    row_miss, dest_miss = render(tmp_path, miss, small_cfg(resolution=32, views=2), c2w, uid="miss")
    assert row_ok["status"] == "ok" and row_ok["missing_textures"] == 0
    assert json.loads((dest_ok / "meta.json").read_text())["missing_textures"] == []
    assert row_miss["status"] == "ok" and row_miss["missing_textures"] == 1
    assert "nowhere.png" in json.loads((dest_miss / "meta.json").read_text())["missing_textures"][0]


def _green_fraction(dest: Path) -> float:
    """Fraction of foreground pixels whose colour is clearly green (G well above R and B)."""
    px = np.asarray(Image.open(dest / "00.rgba.png")).astype(np.float64)
    fg = px[..., 3] > 200
    assert fg.sum() > 20  # the camera sees the textured quad
    rgb = px[fg][:, :3]
    return float(np.mean((rgb[:, 1] > rgb[:, 0] + 60) & (rgb[:, 1] > rgb[:, 2] + 60)))


def test_textures_outside_the_asset_folder_are_not_loaded(tmp_path):
    secret = tmp_path / "home" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(np.tile(np.array([0, 255, 0], np.uint8), (8, 8, 1))).save(secret)
    cfg = small_cfg(resolution=32, views=1)
    c2w = look_at(spherical_position(-90.0, 70.0, 2.6))[None]  # from above: the quad in z=0 fills the view
    inside = write_textured_obj(tmp_path / "inside", None)
    (inside.parent / "m.mtl").write_text("newmtl mat\nKd 1 1 1\nmap_Kd green.png\n")
    Image.open(secret).save(inside.parent / "green.png")
    row, dest = render(tmp_path, inside, cfg, c2w, uid="inside")
    assert row["status"] == "ok" and row["missing_textures"] == 0, row
    assert _green_fraction(dest) > 0.9  # control: the same texture inside the folder shows

    for uid, ref in (("absolute", str(secret)), ("relative", "../home/secret.png")):
        obj = write_textured_obj(tmp_path / uid, None)
        (obj.parent / "m.mtl").write_text(f"newmtl mat\nKd 1 1 1\nmap_Kd {ref}\n")
        assert (obj.parent / ref).resolve() == secret.resolve()  # Blender would find it
        row, dest = render(tmp_path, obj, cfg, c2w, uid=uid)
        assert row["status"] == "ok" and row["missing_textures"] == 1, row
        missing = json.loads((dest / "meta.json").read_text())["missing_textures"]
        assert len(missing) == 1 and missing[0].startswith("outside the asset folder") and "secret.png" in missing[0]
        assert _green_fraction(dest) == 0.0  # not one pixel of the outside file


def test_asset_folder_is_the_uid_folder_or_the_files_folder(tmp_path):
    assert rb.asset_folder(tmp_path / "assets" / "u1" / "meshes" / "model.obj", "u1") == (tmp_path / "assets" / "u1").resolve()
    assert rb.asset_folder(tmp_path / "assets" / "u1.glb", "u1") == (tmp_path / "assets").resolve()


def test_texture_size_comes_from_the_header_before_blender_decodes(tmp_path):
    """A PNG whose header says 200x200 but whose pixel data is garbage: the bound applies from the header
    (Blender would decode it first, or fail to and call the texture missing)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    obj = write_textured_obj(tmp_path / "hdr", None)
    (obj.parent / "m.mtl").write_text("newmtl mat\nKd 1 1 1\nmap_Kd big.png\n")
    (obj.parent / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 200, 200, 8, 2, 0, 0, 0))
                                         + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b""))
    assert Image.open(obj.parent / "big.png").size == (200, 200)  # PIL's header reader agrees
    row, dest = render(tmp_path, obj, small_cfg(resolution=32, views=1, max_texture_pixels=100 * 100),
                       random_views("h", 1)["c2w"], uid="hdr")
    assert row["status"] == "failed" and "200x200, above the 10000-pixel bound" in row["reason"], row
    assert not dest.exists()


def test_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch, capfd):
    def broken(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(rb, "setup_render", broken)
    obj = write_textured_obj(tmp_path / "t", "tex.png")
    row, dest = render(tmp_path, obj, small_cfg(resolution=32, views=1), random_views("t", 1)["c2w"], uid="tb")
    err = capfd.readouterr().err
    assert row["status"] == "failed" and row["reason"].startswith("KeyError: 'no such key'"), row
    assert "[at test_blender.py:" in row["reason"] and "in broken]" in row["reason"]
    assert "Traceback (most recent call last)" in err and "asset tb" in err and "def broken" not in row["reason"]
    assert "reset_failed" not in row and not dest.exists()


def test_failed_reset_is_signalled(tmp_path, monkeypatch, capfd):
    def no_prepare(*a, **k):
        raise rb.RenderError("refused")

    def broken_reset():
        raise RuntimeError("reset broke")

    monkeypatch.setattr(rb, "prepare_scene", no_prepare)
    monkeypatch.setattr(rb, "reset_scene", broken_reset)
    row = rb.render_asset({"uid": "r", "path": str(tmp_path / "x.glb")}, tmp_path / "out", small_cfg(),
                          {"": random_views("r", 1)["c2w"]})
    assert row["status"] == "failed" and row["reason"] == "refused"
    assert row["reset_failed"] is True and "RuntimeError: reset broke" in row["reset_reason"]
    assert "reset broke" in capfd.readouterr().err


def test_output_hash_per_mode():
    """Training folders depend on the random-view settings, eval folders on the orbit/input settings."""
    base = small_cfg()
    train, ev = rb.output_hash(base, False), rb.output_hash(base, True)
    assert train != ev
    for field, value, changes_train, changes_eval in (
            ("views", 7, True, False), ("distance_max", 3.0, True, False), ("elevation_min_deg", -10.0, True, False),
            ("eval_orbit_views", 8, False, True), ("eval_distance", 3.0, False, True),
            ("eval_input_elevation_deg", 10.0, False, True),
            ("samples", 99, True, True), ("resolution", 48, True, True), ("depth_scale", 5000.0, True, True),
            ("workers", 9, False, False), ("timeout_s", 5.0, False, False), ("threads", 1, False, False)):
        cfg = small_cfg(**{field: value})
        assert (rb.output_hash(cfg, False) != train) == changes_train, field
        assert (rb.output_hash(cfg, True) != ev) == changes_eval, field


# ----------------------------------------------------------------------------------------------------------
# Bad input: a failed row with a reason, nothing written
# ----------------------------------------------------------------------------------------------------------


def nan_glb(path: Path) -> None:
    """A GLB whose JSON is valid but whose binary position buffer holds a NaN."""
    v = np.array([[0, 0, 0], [1, 0, 0], [5, 1, 0], [0, 0, 1]], float)
    data = trimesh.Trimesh(v, [[0, 1, 2], [0, 1, 3]], process=False).export(file_type="glb")
    jlen = struct.unpack_from("<I", data, 12)[0]
    js = json.loads(data[20:20 + jlen])
    binpart = bytearray(data[20 + jlen:])
    acc = js["accessors"][js["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    off = 8 + js["bufferViews"][acc["bufferView"]].get("byteOffset", 0) + acc.get("byteOffset", 0) + 2 * 12
    assert struct.unpack_from("<f", binpart, off)[0] == 5.0
    struct.pack_into("<f", binpart, off, float("nan"))
    path.write_bytes(data[:20 + jlen] + bytes(binpart))


def blend_with_script(path: Path, marker: Path) -> None:
    rb.reset_scene()
    bpy.ops.mesh.primitive_cube_add()
    text = bpy.data.texts.new("evil.py")
    text.write(f"open({str(marker)!r}, 'w').write('ran')\n")
    text.use_module = True  # "Register": runs on load when auto-execution is on
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)
    rb.reset_scene()


def test_bad_inputs_fail_with_reasons(tmp_path):
    (tmp_path / "garbage.glb").write_bytes(b"glTF" + bytes(range(256)) * 4)
    (tmp_path / "empty.obj").write_text("v 0 0 0\nv 1 0 0\n")
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\n")
    nan_glb(tmp_path / "nan.glb")
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "big.ply")  # 320 faces
    write_textured_obj(tmp_path / "bigtex", "tex.png", tex_size=64)
    marker = tmp_path / "script-ran.txt"
    blend_with_script(tmp_path / "scripted.blend", marker)
    cases = {
        "garbage.glb": (small_cfg(), "not a plausible glTF"),  # refused by render.references, unopened
        "empty.obj": (small_cfg(), "empty scene"),
        "nan.obj": (small_cfg(), "non-finite"),
        "nan.glb": (small_cfg(), "non-finite"),
        "big.ply": (small_cfg(max_faces=100), "too many faces"),
        "bigtex/m.obj": (small_cfg(max_texture_pixels=32 * 32), "texture"),
        "scripted.blend": (small_cfg(), "text block"),
        "missing.glb": (small_cfg(), "not a regular file"),
        "huge.glb": (small_cfg(), "above the 10-byte bound"),
    }
    trimesh.creation.box().export(tmp_path / "huge.glb")
    c2w = random_views("bad", 2)["c2w"]
    for name, (cfg, reason) in cases.items():
        uid = name.split("/")[0]  # bigtex/m.obj: in a folder named by its uid, so it may read its MTL and texture
        row, dest = render(tmp_path, tmp_path / name, cfg, c2w, uid=uid, max_file_bytes=10 if name == "huge.glb" else 0)
        assert row["status"] == "failed" and reason in row["reason"], (name, row)
        assert not dest.exists(), name  # nothing half-written
    assert not marker.exists()  # the .blend's script never ran
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_blend_without_scripts_renders(tmp_path):
    rb.reset_scene()
    bpy.ops.mesh.primitive_cube_add(size=3.0, location=(1, 2, 3))
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "cube.blend"), copy=True)
    rb.reset_scene()
    row, dest = render(tmp_path, tmp_path / "cube.blend", small_cfg(resolution=32, views=2),
                       random_views("b", 2)["c2w"], uid="blend")
    assert row["status"] == "ok", row
    v = np.load(dest / "geometry.npz")["vertices"]
    np.testing.assert_allclose(v.min(0), -0.5, atol=1e-5)
    np.testing.assert_allclose(v.max(0), 0.5, atol=1e-5)


def test_reset_leaves_no_leaked_datablocks(tmp_path):
    rb.reset_scene()
    clean = rb.datablock_counts()
    path = write_textured_obj(tmp_path / "t", "tex.png")
    row, _ = render(tmp_path, path, small_cfg(resolution=32, views=2), random_views("r", 2)["c2w"], uid="r")
    assert row["status"] == "ok"
    rb.reset_scene()
    assert rb.datablock_counts() == clean
    assert bpy.context.preferences.filepaths.use_scripts_auto_execute is False
