"""pipelines/assets.py: each check of `verify_file` on a good and a bad file written here, and the atomic
placement (`place_file`, `place_folder`) with its refusal to write outside the asset folder."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipelines.assets import VerifyError, is_inside, place_file, place_folder, sniff, verify_file
from pipelines.procedural.basic import make_procedural_asset


@pytest.fixture(scope="module")
def glb(tmp_path_factory) -> Path:
    return Path(make_procedural_asset(0, tmp_path_factory.mktemp("g") / "a.glb", 16)["path"])


def test_good_files_pass(glb, tmp_path):
    assert verify_file(glb, "glb", expected_bytes=glb.stat().st_size) == glb.stat().st_size
    (tmp_path / "a.obj").write_text("# c\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "a.stl").write_bytes(b"\0" * 80 + struct.pack("<I", 1) + b"\0" * 50)
    (tmp_path / "b.stl").write_text("solid x\nfacet normal 0 0 1\nendsolid x\n")
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nend_header\n")
    (tmp_path / "a.gltf").write_text('{"asset": {"version": "2.0"}}')
    (tmp_path / "a.fbx").write_bytes(b"Kaydara FBX Binary  \x00\x1a\x00" + b"\0" * 20)
    for name in ["a.obj", "a.stl", "b.stl", "a.ply", "a.gltf", "a.fbx"]:
        verify_file(tmp_path / name, name.split(".")[1])


@pytest.mark.parametrize("content, fmt, kw, reason", [
    (b"", "glb", {}, "zero-byte file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "glb", {}, "not a glb: no glTF magic (looks like png)"),
    (b"<!DOCTYPE html><html>rate limited</html>", "glb", {}, "looks like html"),
    (b"glTF" + struct.pack("<II", 1, 20) + b"\0" * 8, "glb", {}, "glb version 1, expected 2"),
    (b"glTF" + struct.pack("<II", 2, 999) + b"\0" * 8, "glb", {}, "glb header says 999 bytes, file has 20"),
    (b"glTF" + struct.pack("<II", 2, 20) + b"\0" * 8, "glb", {"expected_bytes": 21}, "!= 21 in the annotation"),
    (b"glTF" + struct.pack("<II", 2, 20) + b"\0" * 8, "glb", {"max_bytes": 10}, "above the 10-byte cap"),
    (b"\0\x01\x02binary", "obj", {}, "not an obj: binary content"),
    (b"# only comments\n", "obj", {}, "no 'v' and 'f' records"),
    (b"solid x\nendsolid x\n", "stl", {}, "not an stl"),
    (b"{not json", "gltf", {}, "not a gltf: not JSON"),
    (b'{"scenes": []}', "gltf", {}, "no 'asset' object"),
    (b"PK\x03\x04zip", "fbx", {}, "not an fbx: no FBX header (looks like zip)"),
    (b"hello", "ply", {}, "not a ply"),
    (b"data", "usdz", {}, "unsupported format 'usdz'"),
])
def test_each_bad_input_has_a_reason(tmp_path, content, fmt, kw, reason):
    p = tmp_path / f"x.{fmt}"
    p.write_bytes(content)
    with pytest.raises(VerifyError) as e:
        verify_file(p, fmt, **kw)
    assert reason in str(e.value)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(VerifyError, match="unreadable file: FileNotFoundError"):
        verify_file(tmp_path / "nope.glb", "glb")


def test_placement_is_atomic_and_stays_inside(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.obj").write_text("v 0 0 0\n")
    (src / "t.png").write_bytes(b"\x89PNG")
    dst = place_file(src / "a.obj", tmp_path / "assets" / "u.obj")
    assert dst.read_text() == "v 0 0 0\n" and not list(dst.parent.glob(".tmp-*"))
    folder = place_folder({"meshes/a.obj": src / "a.obj", "t.png": src / "t.png"}, tmp_path / "assets" / "u")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == ["meshes/a.obj", "t.png"]
    with pytest.raises(VerifyError, match="refusing to write outside the asset folder"):
        place_folder({"../escape.obj": src / "a.obj"}, tmp_path / "assets" / "v")
    assert not (tmp_path / "assets" / "escape.obj").exists() and not (tmp_path / "assets" / "v").exists()
    assert is_inside(tmp_path, src / "a.obj") and not is_inside(src, tmp_path / "x" / ".." / "a.obj")
    assert sniff(b"\x89PNG\r\n") == "png" and sniff(b"\x00\x01") == "binary data" and sniff(b"hello") == "text"
