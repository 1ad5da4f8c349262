"""render/references.py (what an asset may read) and render/files.header_size on files this test crafts:
every way a glTF / glb / OBJ+MTL names a file outside its folder is refused or dropped before Blender could
open it, the sandbox holds exactly the allowed files, glTF triangle counts follow instancing, and image
sizes come from headers written by independent writers (OpenEXR, PIL, the Radiance and KTX2 specs)."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render.files import header_size
from render.references import ContainmentError, asset_files, build_sandbox


def png_bytes(w: int = 4, h: int = 3, colour=(0, 255, 0)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.array(colour, np.uint8), (h, w, 1))).save(buf, format="PNG")
    return buf.getvalue()


def gltf_doc(buffer_uri: str | None = "data:application/octet-stream;base64,AAAA", images=()) -> dict:
    doc = {"asset": {"version": "2.0"}, "buffers": [{"byteLength": 3}], "images": [dict(i) for i in images]}
    if buffer_uri is not None:
        doc["buffers"][0]["uri"] = buffer_uri
    return doc


def glb_bytes(doc: dict, binary: bytes = b"") -> bytes:
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(js), 0x4E4F534A) + js
    if binary:
        chunks += struct.pack("<II", len(binary), 0x004E4942) + binary
    return b"glTF" + struct.pack("<II", 2, 12 + len(chunks)) + chunks


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """A secret outside the asset folder, and the asset folder (named like a uid) beside it."""
    secret = tmp_path / "home" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes())
    folder = tmp_path / "assets" / "u1"
    folder.mkdir(parents=True)
    return {"secret": secret, "folder": folder, "tmp": tmp_path}


# ----------------------------------------------------------------------------------------------------------
# glTF and glb
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["SECRET_ABS", "../../home/secret.png", "%2E%2E/%2e%2e/home/secret.png",
                                 "..\\..\\home\\secret.png", "file:///SECRET_ABS", "link.png",
                                 "data:image/png,../../home/secret.png"])
def test_gltf_image_outside_is_dropped_from_the_sandbox_copy(world, uri):
    folder, secret = world["folder"], world["secret"]
    (folder / "link.png").symlink_to(secret)  # inside by name, outside once resolved
    uri = uri.replace("SECRET_ABS", str(secret).lstrip("/") if uri.startswith("file") else str(secret))
    (folder / "m.gltf").write_text(json.dumps(gltf_doc(images=[{"uri": uri}])))
    files = asset_files(folder / "m.gltf", "gltf", folder)
    assert len(files.refused) == 1 and files.refused[0].startswith("outside the asset folder")
    assert files.images == [] and set(files.files) == {"m.gltf"}
    rewritten = json.loads(files.rewrites["m.gltf"])
    assert "uri" not in rewritten["images"][0]  # Blender's importer creates no image without a uri
    box = build_sandbox(files, world["tmp"] / "box")
    assert sorted(p.name for p in box.parent.rglob("*")) == ["m.gltf"]
    assert secret.read_bytes() not in box.read_bytes()


@pytest.mark.parametrize("uri", ["SECRET_ABS", "../../home/secret.png", "%2e%2e/%2e%2e/home/secret.png", "link.png",
                                 "http://example.org/x.bin", "data:application/octet-stream,../../home/secret.png"])
def test_gltf_buffer_outside_fails_the_asset(world, uri):
    folder, secret = world["folder"], world["secret"]
    (folder / "link.png").symlink_to(secret)
    (folder / "m.gltf").write_text(json.dumps(gltf_doc(uri.replace("SECRET_ABS", str(secret)))))
    with pytest.raises(ContainmentError, match="buffer 0"):
        asset_files(folder / "m.gltf", "gltf", folder)


def test_gltf_files_inside_are_provided_and_nothing_else(world):
    folder = world["folder"]
    (folder / "tex").mkdir()
    (folder / "tex" / "a b.png").write_bytes(png_bytes(5, 7))
    (folder / "geo.bin").write_bytes(b"\0" * 12)
    (folder / "unrelated.txt").write_text("not referenced")
    doc = gltf_doc("geo.bin", images=[{"uri": "tex/a%20b.png"}, {"uri": "missing.png"},
                                      {"uri": "data:image/png;base64," + base64.b64encode(png_bytes(2, 9)).decode()}])
    (folder / "m.gltf").write_text(json.dumps(doc))
    files = asset_files(folder / "m.gltf", "gltf", folder)
    assert set(files.files) == {"m.gltf", "geo.bin", "tex/a b.png"} and files.refused == [] and not files.rewrites
    assert [header_size(s if isinstance(s, (bytes, Path)) else s()) for _, s in files.images] == [(5, 7), (2, 9)]
    box = build_sandbox(files, world["tmp"] / "box")
    assert sorted(p.relative_to(box.parent).as_posix() for p in box.parent.rglob("*") if p.is_file()) == \
        ["geo.bin", "m.gltf", "tex/a b.png"]


def test_glb_may_hold_only_embedded_data(world):
    folder = world["folder"]
    (folder / "ok.png").write_bytes(png_bytes())
    for doc, what in ((gltf_doc("ok.png"), "buffer 0"), (gltf_doc(None, [{"uri": "ok.png"}]), "image 0")):
        (folder / "m.glb").write_bytes(glb_bytes(doc, b"\0" * 4))
        with pytest.raises(ContainmentError, match=f"only embedded data: {what}"):
            asset_files(folder / "m.glb", "glb", folder)
    # buffer 0 = the BIN chunk, an image in a buffer view: read from the file for its header, nothing else
    png = png_bytes(6, 2)
    doc = gltf_doc(None, [{"bufferView": 0, "mimeType": "image/png"}])
    doc["bufferViews"] = [{"buffer": 0, "byteOffset": 0, "byteLength": len(png)}]
    (folder / "m.glb").write_bytes(glb_bytes(doc, png))
    files = asset_files(folder / "m.glb", "glb", folder)
    assert set(files.files) == {"m.glb"} and header_size(files.images[0][1]()) == (6, 2)


def test_gltf_triangles_follow_nodes_and_gpu_instancing(world):
    folder = world["folder"]
    doc = gltf_doc()
    doc["accessors"] = [{"count": 300}, {"count": 999}, {"count": 1000}]  # 300 indices = 100 triangles
    doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": 1}, "indices": 0}]},
                     {"primitives": [{"attributes": {"POSITION": 1}, "mode": 5}]}]  # a strip: 997 triangles
    doc["nodes"] = [{"mesh": 0} for _ in range(50)] + [
        {"mesh": 1, "extensions": {"EXT_mesh_gpu_instancing": {"attributes": {"TRANSLATION": 2}}}}]
    (folder / "m.gltf").write_text(json.dumps(doc))
    files = asset_files(folder / "m.gltf", "gltf", folder)
    assert files.triangles == 50 * 100 + 1000 * 997 and files.instances == 50 + 1000


@pytest.mark.parametrize("doc", [[], {"asset": {}, "buffers": {"uri": "x"}}, {"asset": {}, "images": ["x"]}])
def test_malformed_gltf_is_a_reason_not_a_crash(world, doc):
    (world["folder"] / "m.gltf").write_text(json.dumps(doc))
    with pytest.raises(ContainmentError):
        asset_files(world["folder"] / "m.gltf", "gltf", world["folder"])


# ----------------------------------------------------------------------------------------------------------
# OBJ + MTL, single files, the main file itself
# ----------------------------------------------------------------------------------------------------------


OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


@pytest.mark.parametrize("ref", ["SECRET_ABS", "../../home/secret.mtl", "link.mtl"])
def test_obj_mtllib_outside_fails_the_asset(world, ref):
    folder = world["folder"]
    outside = world["secret"].with_suffix(".mtl")
    outside.write_text("newmtl m\nmap_Kd secret.png\n")
    (folder / "link.mtl").symlink_to(outside)
    (folder / "m.obj").write_text(f"mtllib {ref.replace('SECRET_ABS', str(outside))}\n" + OBJ)
    with pytest.raises(ContainmentError, match="mtllib outside the asset folder"):
        asset_files(folder / "m.obj", "obj", folder)


def test_mtl_lines_outside_are_dropped_inside_kept(world):
    folder, secret = world["folder"], world["secret"]
    (folder / "tex").mkdir()
    (folder / "tex" / "wood.png").write_bytes(png_bytes(3, 3))
    (folder / "beside.png").write_bytes(png_bytes(2, 2))
    (folder / "m.obj").write_text("mtllib m.mtl\n" + OBJ)
    (folder / "m.mtl").write_text("\n".join([
        "newmtl wood", "Kd 1 1 1", "map_Kd -s 1 1 1 tex/wood.png", f"map_Bump -bm 0.5 {secret}",
        "map_Ks ../../home/secret.png", "bump ..\\..\\home\\secret.png", "refl -type sphere ../x/../../home/a.png",
        r"map_Ka C:\Users\artist\beside.png", "some_vendor_key ../../home/secret.png", ""]))
    files = asset_files(folder / "m.obj", "obj", folder)
    assert set(files.files) == {"m.obj", "m.mtl", "tex/wood.png", "beside.png"}
    assert len(files.refused) == 4 and all(r.startswith("outside the asset folder") for r in files.refused)
    mtl = files.rewrites["m.mtl"].decode()
    assert "secret" not in mtl and "vendor" not in mtl and "../" not in mtl
    assert "map_Kd -s 1 1 1 tex/wood.png" in mtl and "map_Ka beside.png" in mtl  # Blender's name fallback, inside
    box = build_sandbox(files, world["tmp"] / "box")
    assert (box.parent / "m.mtl").read_text() == mtl


def test_single_file_asset_reads_nothing_but_itself(world):
    assets = world["folder"].parent  # OUT/assets: every other asset lies beside a single-file one
    (assets / "other.png").write_bytes(png_bytes())
    (assets / "other.mtl").write_text("newmtl m\nmap_Kd other.png\n")
    (assets / "u2.obj").write_text("mtllib other.mtl\n" + OBJ)
    files = asset_files(assets / "u2.obj", "obj", None)
    assert set(files.files) == {"u2.obj"} and files.images == []


def test_main_file_linked_from_outside_is_refused(world):
    target = world["tmp"] / "home" / "model.obj"
    target.write_text(OBJ)
    (world["folder"] / "meshes").mkdir()
    (world["folder"] / "meshes" / "model.obj").symlink_to(target)
    with pytest.raises(ContainmentError, match="outside its folder"):
        asset_files(world["folder"] / "meshes" / "model.obj", "obj", world["folder"])


def test_sandbox_never_writes_outside_its_root(world):
    files = asset_files(world["secret"], "png", world["secret"].parent)
    files.files["../escape.png"] = world["secret"]
    with pytest.raises(ContainmentError, match="outside the sandbox"):
        build_sandbox(files, world["tmp"] / "box")
    assert not (world["tmp"] / "escape.png").exists()


# ----------------------------------------------------------------------------------------------------------
# Image sizes from headers
# ----------------------------------------------------------------------------------------------------------


def test_header_size_of_exr_written_by_openexr(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR")
    path = tmp_path / "t.exr"
    pixels = np.zeros((37, 53, 3), np.float32)  # rows, columns
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGB": pixels}).write(str(path))
    assert header_size(path) == (53, 37)


def test_header_size_of_hdr_and_ktx2_from_their_specs():
    # Radiance: header lines, a blank line, then the resolution string "-Y rows +X columns"
    assert header_size(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\nEXPOSURE=1\n\n-Y 512 +X 1024\n" + b"\0" * 8) == (1024, 512)
    assert header_size(b"#?RADIANCE\n\n+X 300 -Y 200\n") == (300, 200)
    assert header_size(b"#?RADIANCE\n\n-Y 5 -Y 7\n") is None
    ktx2 = b"\xabKTX 20\xbb\r\n\x1a\n" + struct.pack("<IIIII", 0, 1, 640, 480, 0)
    assert header_size(ktx2) == (640, 480)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "TGA"])
def test_header_size_of_pil_formats(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (23, 11)).save(buf, format=fmt)
    assert header_size(buf.getvalue()) == (23, 11)


def test_unknown_image_has_no_size(tmp_path):
    assert header_size(b"not an image at all") is None
    assert header_size(tmp_path / "nowhere.png") is None
    assert os.path.exists(tmp_path)


def test_crafted_gltf_is_a_reason_or_a_result_never_a_crash(world):
    """Odd types anywhere the resolvers look: each input either resolves or raises ContainmentError (the
    renderer's failed row), never another exception (a traceback in the render stage)."""
    docs = [
        {"asset": {}, "nodes": [{"mesh": "x"}, {"mesh": 0, "extensions": []}, 5], "meshes": [{"primitives": [
            {"indices": "a", "attributes": [], "mode": "strip"}, None]}], "accessors": "bad"},
        {"asset": {}, "nodes": [{"mesh": 0, "extensions": {"EXT_mesh_gpu_instancing": {"attributes": {"T": 99}}}}],
         "meshes": [{"primitives": {"a": 1}}], "accessors": [{"count": -5}, {"count": True}]},
        {"asset": {}, "images": [{"uri": 5}]}, {"asset": {}, "images": [{"bufferView": 7}]},
        {"asset": {}, "images": [{"bufferView": 0}], "bufferViews": [{"buffer": "zero", "byteOffset": "x"}]},
        {"asset": {}, "buffers": [{"uri": None}], "images": [{"uri": "data:image/png;base64,%%%%"}]},
        {"asset": {}, "images": [{"uri": "\0/../x.png"}, {"uri": "a" * 5000}]},
    ]
    for i, doc in enumerate(docs):
        for ext in ("gltf", "glb"):
            path = world["folder"] / f"m{i}.{ext}"
            path.write_bytes(json.dumps(doc).encode() if ext == "gltf" else glb_bytes(doc, b"\0" * 8))
            try:
                asset_files(path, ext, world["folder"])
            except ContainmentError:
                pass
    (world["folder"] / "short.glb").write_bytes(b"glTF" + struct.pack("<II", 2, 999) + struct.pack("<II", 10**9, 0x4E4F534A))
    with pytest.raises(ContainmentError, match="not a plausible glTF"):
        asset_files(world["folder"] / "short.glb", "glb", world["folder"])
