"""The download stage: resume after a simulated crash, and a real SIGKILL halfway (the checks themselves:
test_assets.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.assets import verify_file
from pipelines.data import main as data_main

ROOT = Path(__file__).resolve().parents[2]


def rows(out: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(out / "manifest" / "download.parquet").to_pylist()}


def test_resume_after_simulated_crash_redoes_only_what_is_not_ok(tmp_path):
    out = tmp_path / "out"
    args = ["--source", "procedural", "--out", str(out), "data.procedural_count=5",
            "data.procedural_texture_size=16", "data.executor=local", "data.max_assets=0",
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
    N = 200
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.data", "--source", "procedural", "--out", str(out),
           # N assets with 1024² textures (0.03-0.3 s each): the job is still running after the manifest's
           # first flush (every 2 s) on a quiet machine too (with 40 at 512² it had finished, seen in CI; with 60
           # at 1024² too, on a quiet machine of 2026-12-02).
           f"data.procedural_count={N}", "data.procedural_texture_size=1024", "data.executor=local",
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
    assert 3 <= len(done) < N
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
    assert len(final) == N and all(r["status"] == "ok" for r in final.values())
    for r in final.values():
        verify_file(r["path"], "glb")
    assert not list(assets.glob(".tmp-*"))
    # what the manifest had recorded as ok before the kill was not redone
    for r in recorded:
        assert Path(r["path"]).stat().st_ino == before[Path(r["path"]).name]


def test_two_concurrent_data_runs_on_one_out_are_both_safe(tmp_path):
    """Two `make data` on one OUT: the second waits for the first's lock (it would otherwise remove the
    first's temporaries mid-write), then finds the work done; both exit 0 with the complete table."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.data", "--source", "procedural", "--out", str(out),
           "data.procedural_count=12", "data.procedural_texture_size=256", "data.executor=local", "data.max_assets=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".locks" / "data.lock"
    t0 = time.monotonic()
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() - t0 < 60, "the first run never took OUT's data lock"
        time.sleep(0.05)
    second = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (_, e1), (_, e2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (e1[-2000:], e2[-2000:])
    assert "waiting for that run to finish" in e2 and "Traceback" not in e1 + e2
    got = rows(out)
    assert len(got) == 12 and all(r["status"] == "ok" for r in got.values())
    for r in got.values():
        verify_file(r["path"], "glb", expected_bytes=r["bytes"])
