"""Download verification on each bad input, resume after a simulated crash, and a real SIGKILL halfway."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data import main as data_main
from pipelines.download import VerifyError, verify_file
from pipelines.sources.procedural import make_procedural_asset

ROOT = Path(__file__).resolve().parents[2]


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


def rows(out: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(out / "manifest" / "download.parquet").to_pylist()}


def test_resume_after_simulated_crash_redoes_only_what_is_not_ok(tmp_path):
    out = tmp_path / "out"
    args = ["--source", "procedural", "--out", str(out), "data.procedural_count=5",
            "data.procedural_texture_size=16", "data.executor=inline", "data.max_assets=0",
            "data.procedural_sheet_assets=0"]  # no rendered contact sheet: this tests the download
    assert data_main(args) == 0
    first = rows(out)
    inodes = {u: os.stat(r["path"]).st_ino for u, r in first.items()}
    # the crash: one asset's file vanished, one row failed, and a half-written temporary is left behind
    uids = sorted(first)
    # moved away, not unlinked: an unlinked file's inode number is free for the redone file to reuse
    Path(first[uids[1]]["path"]).rename(tmp_path / "vanished.glb")
    import pyarrow as pa

    from pipelines.download import DOWNLOAD_SCHEMA
    table = pq.read_table(out / "manifest" / "download.parquet").to_pylist()
    for r in table:
        if r["uid"] == uids[3]:
            r.update(status="failed", reason="simulated crash")
    pq.write_table(pa.Table.from_pylist(table, schema=DOWNLOAD_SCHEMA), out / "manifest" / "download.parquet")
    (out / "assets" / f".tmp-{uids[4]}.glb.123.abcd").write_bytes(b"glTF half")
    assert data_main(args) == 0
    second = rows(out)
    assert all(r["status"] == "ok" for r in second.values())
    redone = {u for u in uids if os.stat(second[u]["path"]).st_ino != inodes[u]}
    assert redone == {uids[1], uids[3]}
    assert not list((out / "assets").glob(".tmp-*"))


def test_sigkill_halfway_leaves_nothing_taken_as_done(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.data", "--source", "procedural", "--out", str(out),
           # 60 assets with 1024² textures (~0.1-0.3 s each): the job is still running after the manifest's
           # first flush (every 2 s) on a quiet machine too (with 40 at 512² it had finished, seen in CI).
           "data.procedural_count=60", "data.procedural_texture_size=1024", "data.executor=inline",
           "data.max_assets=0", "data.procedural_sheet_assets=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assets = out / "assets"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        flushed = (out / "manifest" / "download.parquet").exists()  # the job flushes every 2 s
        if flushed and len(list(assets.glob("procedural-*.glb"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(assets.glob("procedural-*.glb"))
    assert 3 <= len(done) < 60
    for p in done:  # every file under its final name is complete
        verify_file(p, "glb")
    manifest = out / "manifest" / "download.parquet"
    recorded = pq.read_table(manifest).to_pylist()
    assert recorded
    for r in recorded:  # flushed while running: its ok rows point at complete files
        assert r["status"] == "ok" and verify_file(r["path"], "glb") > 0
    before = {p.name: p.stat().st_ino for p in done}
    rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    assert rc == 0
    final = rows(out)
    assert len(final) == 60 and all(r["status"] == "ok" for r in final.values())
    for r in final.values():
        verify_file(r["path"], "glb")
    assert not list(assets.glob(".tmp-*"))
    # what the manifest had recorded as ok before the kill was not redone
    for r in recorded:
        assert Path(r["path"]).stat().st_ino == before[Path(r["path"]).name]
