"""Untrusted assets stay data, end to end through Blender: a secret file outside the asset folder (a pure green
texture, a vertex buffer of marker coordinates) is named by every kind of reference a glTF / glb / OBJ+MTL /
FBX can hold; no pixel of it reaches a render and no byte of it any output file. And bounds apply before the
work they bound: an import that must not happen is proven not to happen (a spy on Blender's import)."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")

from core.cameras import look_at, spherical_position  # noqa: E402
from core.config import RenderConfig  # noqa: E402
from render import blender as rb  # noqa: E402
from render import scene as rs  # noqa: E402

pytestmark = pytest.mark.blender

GREEN = (0, 255, 0)
TOP = look_at(spherical_position(-90.0, 70.0, 2.6))[None]  # from above: a quad in the z=0 plane fills the view
MARKER = np.array([[0.123456, 7.654321, -3.141592], [2.718281, 0.577215, 1.414213], [-1.732050, 0.693147, 4.669201]],
                  np.float32)  # the secret geometry: coordinates no render of ours would hold


def cfg(**kw) -> RenderConfig:
    return RenderConfig(**{"resolution": 32, "views": 1, "samples": 8, "adaptive_threshold": 0.0, "threads": 2, **kw})


def green_png(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.array(GREEN, np.uint8), (size, size, 1))).save(path)
    return path


def quad_buffer() -> bytes:
    """A unit quad in glTF's y=0 plane (Blender's z=0 after import), UVs, two triangles: positions, uvs, indices."""
    pos = np.array([[-1, 0, 1], [1, 0, 1], [1, 0, -1], [-1, 0, -1]], np.float32)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    idx = np.array([0, 1, 2, 0, 2, 3], np.uint16)
    return pos.tobytes() + uv.tobytes() + idx.tobytes()


def quad_doc(image_uri: str | None, buffer_uri: str | None = None, n_textures: int = 1) -> dict:
    data = quad_buffer()
    doc = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "buffers": [{"byteLength": len(data),
                     "uri": buffer_uri or "data:application/octet-stream;base64," + base64.b64encode(data).decode()}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": 48}, {"buffer": 0, "byteOffset": 48, "byteLength": 32},
                        {"buffer": 0, "byteOffset": 80, "byteLength": 12}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 4, "type": "VEC3", "min": [-1, 0, -1],
                       "max": [1, 0, 1]},
                      {"bufferView": 1, "componentType": 5126, "count": 4, "type": "VEC2"},
                      {"bufferView": 2, "componentType": 5123, "count": 6, "type": "SCALAR"}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "TEXCOORD_0": 1}, "indices": 2, "material": 0}]}],
        "materials": [{"doubleSided": True, "pbrMetallicRoughness": {"baseColorTexture": {"index": 0},
                                                                     "metallicFactor": 0.0}}],
        "textures": [{"source": i} for i in range(n_textures)], "images": [],
    }
    if image_uri is not None:
        doc["images"] = [{"uri": image_uri} for _ in range(n_textures)]
    return doc


def render(out: Path, path: Path, uid: str, c: RenderConfig | None = None) -> tuple[dict, Path]:
    dest = out / "renders" / uid
    row = rb.render_asset({"uid": uid, "path": str(path), "source": "test", "license": "cc0"}, dest, c or cfg(),
                          {"": TOP}, threads=2)
    return row, dest


def green_fraction(dest: Path) -> float:
    px = np.asarray(Image.open(dest / "00.rgba.png")).astype(np.float64)
    fg = px[..., 3] > 200
    assert fg.sum() > 20, "the camera must see the quad"
    rgb = px[fg][:, :3]
    return float(np.mean((rgb[:, 1] > rgb[:, 0] + 60) & (rgb[:, 1] > rgb[:, 2] + 60)))


def assert_nothing_of(secret: bytes, out: Path) -> None:
    """No output file under `out` holds the secret's bytes; no .tmp-* (sandbox) is left."""
    for p in out.rglob("*"):
        if p.is_file():
            assert secret not in p.read_bytes(), p
    assert not list(out.rglob(".tmp-*"))


@pytest.fixture
def world(tmp_path: Path) -> dict:
    secret = green_png(tmp_path / "home" / "secret.png")
    return {"secret": secret, "out": tmp_path / "out", "assets": tmp_path / "out" / "assets", "tmp": tmp_path}


def test_control_a_texture_inside_the_folder_shows(world):
    folder = world["assets"] / "inside"
    green_png(folder / "green.png")
    (folder / "m.gltf").write_text(json.dumps(quad_doc("green.png")))
    row, dest = render(world["out"], folder / "m.gltf", "inside")
    assert row["status"] == "ok" and row["missing_textures"] == 0, row
    assert green_fraction(dest) > 0.9  # the test can see green: the checks below can fail


@pytest.mark.parametrize("how", ["absolute", "relative", "percent", "symlink"])
def test_gltf_image_naming_a_host_file_shows_nothing_of_it(world, how):
    folder = world["assets"] / how
    folder.mkdir(parents=True)
    secret = world["secret"]
    uri = {"absolute": str(secret), "relative": "../../../home/secret.png",
           "percent": "%2e%2e/%2e%2e/%2e%2e/home/secret.png", "symlink": "green.png"}[how]
    if how == "symlink":
        (folder / "green.png").symlink_to(secret)
    (folder / "m.gltf").write_text(json.dumps(quad_doc(uri)))
    row, dest = render(world["out"], folder / "m.gltf", how)
    assert row["status"] == "ok" and row["missing_textures"] == 1, row
    assert json.loads((dest / "meta.json").read_text())["missing_textures"][0].startswith("outside the asset folder")
    assert green_fraction(dest) == 0.0
    assert_nothing_of(secret.read_bytes(), world["out"] / "renders")


def test_glb_naming_an_external_image_fails(world):
    doc = quad_doc(str(world["secret"]))
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    glb = b"glTF" + struct.pack("<II", 2, 20 + len(js)) + struct.pack("<II", len(js), 0x4E4F534A) + js
    path = world["assets"] / "u1.glb"
    path.parent.mkdir(parents=True)
    path.write_bytes(glb)
    row, dest = render(world["out"], path, "u1")
    assert row["status"] == "failed" and "only embedded data: image 0" in row["reason"], row
    assert not dest.exists()


def test_gltf_buffer_naming_a_host_file_fails_and_its_bytes_go_nowhere(world):
    secret = world["tmp"] / "home" / "secret.bin"
    data = bytearray(quad_buffer())
    data[:36] = MARKER.tobytes()  # the first three vertices: the marker
    secret.write_bytes(bytes(data))
    for uid, uri in (("absolute", str(secret)), ("relative", "../../../home/secret.bin")):
        folder = world["assets"] / uid
        folder.mkdir(parents=True)
        (folder / "m.gltf").write_text(json.dumps(quad_doc(None, buffer_uri=uri)))
        row, dest = render(world["out"], folder / "m.gltf", uid)
        assert row["status"] == "failed" and "buffer 0 outside the asset folder" in row["reason"], row
        assert not dest.exists()
    assert_nothing_of(MARKER.tobytes(), world["out"] / "renders")


def test_obj_whose_mtllib_is_a_host_file_fails(world):
    outside = world["tmp"] / "home" / "evil.mtl"
    outside.write_text(f"newmtl mat\nKd 1 1 1\nmap_Kd {world['secret']}\n")
    folder = world["assets"] / "objlib"
    folder.mkdir(parents=True)
    (folder / "m.obj").write_text("mtllib ../../../home/evil.mtl\nv -1 -1 0\nv 1 -1 0\nv 1 1 0\nv -1 1 0\nvt 0 0\n"
                                  "vt 1 0\nvt 1 1\nvt 0 1\nusemtl mat\nf 1/1 2/2 3/3 4/4\n")
    row, dest = render(world["out"], folder / "m.obj", "objlib")
    assert row["status"] == "failed" and "mtllib outside the asset folder" in row["reason"], row
    assert not dest.exists()


def test_fbx_image_search_does_not_reach_other_assets(world):
    """A single-file FBX in OUT/assets naming its texture by file name only: Blender's recursive image
    search (on by default) would find another asset's file of that name anywhere below OUT/assets."""
    rb.reset_scene()
    bpy.ops.mesh.primitive_plane_add(size=2.0)
    plane = bpy.context.object
    mat = bpy.data.materials.new("m")
    mat.use_nodes = True
    tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = bpy.data.images.load(str(green_png(world["tmp"] / "make" / "green.png")))
    mat.node_tree.links.new(tex.outputs["Color"], mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"])
    plane.data.materials.append(mat)
    path = world["assets"] / "u1.fbx"
    path.parent.mkdir(parents=True)
    bpy.ops.export_scene.fbx(filepath=str(path), path_mode="STRIP", embed_textures=False)
    rb.reset_scene()
    green_png(world["assets"] / "u2" / "green.png")  # another asset's file, where the search would look
    row, dest = render(world["out"], path, "u1")
    assert row["status"] == "ok" and row["missing_textures"] == 1, row
    assert green_fraction(dest) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Bounds before the work: Blender never imports what the file's own header and counts already exceed
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_import(monkeypatch) -> list:
    calls: list = []

    def spy(*a, **k):
        calls.append(a)
        raise AssertionError("Blender must not import this asset")

    monkeypatch.setattr(rs, "import_asset", spy)
    return calls


def embedded_png(size: int) -> str:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_texture_budget_per_asset_applies_before_import(world, no_import):
    folder = world["assets"] / "many"
    folder.mkdir(parents=True)
    doc = quad_doc(embedded_png(64), n_textures=5)  # five 64x64 textures: 20480 pixels
    (folder / "m.gltf").write_text(json.dumps(doc))
    row, _ = render(world["out"], folder / "m.gltf", "many", cfg(max_asset_texture_pixels=4 * 64 * 64))
    assert row["status"] == "failed" and "more than 16384 pixels" in row["reason"], row
    assert no_import == []


def test_exr_texture_sized_from_its_header_before_import(world, no_import):
    """An EXR whose header claims 60000x60000: refused from the header (PIL knows no EXR; Blender would
    decode it to learn its size)."""
    OpenEXR = pytest.importorskip("OpenEXR")
    folder = world["assets"] / "exr"
    folder.mkdir(parents=True)
    small = folder / "t.exr"
    OpenEXR.File({"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGB": np.zeros((4, 4, 3), np.float32)}).write(str(small))
    data = bytearray(small.read_bytes())
    at = data.index(b"dataWindow\0box2i\0") + len(b"dataWindow\0box2i\0") + 4
    data[at:at + 16] = struct.pack("<iiii", 0, 0, 59999, 59999)
    small.write_bytes(bytes(data))
    (folder / "m.gltf").write_text(json.dumps(quad_doc("t.exr")))
    row, _ = render(world["out"], folder / "m.gltf", "exr")
    assert row["status"] == "failed" and "60000x60000" in row["reason"], row
    assert no_import == []


def test_instanced_geometry_is_counted_before_import(world, no_import):
    folder = world["assets"] / "inst"
    folder.mkdir(parents=True)
    doc = quad_doc(None)
    doc["nodes"] = [{"mesh": 0, "translation": [float(i), 0.0, 0.0]} for i in range(600)]
    doc["scenes"] = [{"nodes": list(range(600))}]
    (folder / "m.gltf").write_text(json.dumps(doc))
    row, _ = render(world["out"], folder / "m.gltf", "inst", cfg(max_faces=500))  # 1200 triangles > 1000
    assert row["status"] == "failed" and "1200 triangles after instancing" in row["reason"], row
    assert no_import == []


def test_modifiers_are_bounded_before_the_first_evaluation(world, monkeypatch):
    """A .blend cube with an array modifier of 100000 copies: refused from the modifier's settings, before
    any evaluation materialises it (a spy on the evaluation)."""
    rb.reset_scene()
    bpy.ops.mesh.primitive_cube_add()
    mod = bpy.context.object.modifiers.new("many", "ARRAY")
    mod.count = 100_000
    path = world["assets"] / "arr" / "m.blend"
    path.parent.mkdir(parents=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)
    rb.reset_scene()
    evaluated: list = []
    monkeypatch.setattr(rs, "_match_viewport_to_render", lambda: evaluated.append(1))
    row, _ = render(world["out"], path, "arr", cfg(max_faces=10_000))
    assert row["status"] == "failed" and "after modifiers" in row["reason"], row
    assert evaluated == []
