"""pipelines/render.py end to end: Ray actors and worker processes holding bpy, resume, SIGKILL then rerun, eval
mode. (The executor's timeout / crash / retire replacement is proven in tests/pipelines/test_executor.py.)

(The stage entry lives in pipelines/ but is the render stage's; its test sits with the render tests.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core import manifest as mf
from core.cameras import look_at, random_views, spherical_position
from core.config import Config, RenderConfig
from pipelines.render import run

ROOT = Path(__file__).resolve().parents[2]


def make_assets(out: Path, n: int, bad: bool = True) -> list[str]:
    """n textured GLBs (trimesh: a box, a sphere, a capsule ...) plus a broken file, listed as download rows."""
    import trimesh
    from PIL import Image

    (out / "assets").mkdir(parents=True, exist_ok=True)
    tex = Image.fromarray((np.indices((16, 16)).sum(0) % 2 * 200 + 30).astype(np.uint8))
    shapes = [lambda: trimesh.creation.box(extents=[1, 0.6, 0.4]), lambda: trimesh.creation.icosphere(2),
              lambda: trimesh.creation.capsule(height=1.0, radius=0.3), lambda: trimesh.creation.cone(0.5, 1.0)]
    rows = []
    for i in range(n):
        m = shapes[i % len(shapes)]()
        uv = (m.vertices[:, :2] - m.vertices[:, :2].min(0)) / np.ptp(m.vertices[:, :2], 0).max()
        m.visual = trimesh.visual.TextureVisuals(uv=uv, image=tex)
        path = out / "assets" / f"a{i}.glb"
        m.export(path)
        rows.append({"uid": f"asset{i}", "status": "ok", "reason": "", "path": str(path), "source": "test",
                     "license": "cc0", "attribution": f"test {i}", "name": f"a{i}", "format": "glb"})
    if bad:
        (out / "assets" / "bad.glb").write_bytes(b"not a gltf at all")
        rows.append({"uid": "broken", "status": "ok", "reason": "", "path": str(out / "assets" / "bad.glb"),
                     "source": "test", "license": "cc0", "attribution": "", "name": "bad", "format": "glb"})
    rows.append({"uid": "never", "status": "failed", "reason": "download failed", "path": "", "source": "test",
                 "license": "", "attribution": "", "name": "", "format": ""})
    mf.write_rows(mf.manifest_path(out, "download"), rows)
    return [r["uid"] for r in rows]


def small(out: Path, **render) -> Config:
    cfg = Config(out=str(out))
    cfg.render = RenderConfig(**{"resolution": 32, "views": 3, "samples": 4, "workers": 2, "threads": 1,
                                 "timeout_s": 120.0, **render})
    return cfg


def rows_by_uid(out: Path, stage: str = "render") -> dict[str, dict]:
    return {r["uid"]: r for r in mf.read_rows(mf.manifest_path(out, stage))}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from pipelines.executor import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def test_changing_training_views_does_not_restale_eval_renders(tmp_path):
    """plan() compares each mode's own hash: render.views touches renders/ only, eval_distance renders_eval/ only."""
    from pipelines.render import plan
    from render.blender import output_hash

    make_assets(tmp_path, 1, bad=False)
    cfg = small(tmp_path)
    for eval_mode, folder in ((False, tmp_path / "renders" / "asset0"), (True, tmp_path / "renders_eval" / "asset0" / "orbit")):
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"render": {"output_hash": output_hash(cfg.render, eval_mode)}}))
    assert [len(x) for x in plan(cfg, False)] == [0, 1] and [len(x) for x in plan(cfg, True)] == [0, 1]
    more_views = small(tmp_path, views=5)
    assert [len(x) for x in plan(more_views, True)] == [0, 1]  # eval renders stay done
    assert [len(x) for x in plan(more_views, False)] == [1, 0]  # training renders are stale
    farther = small(tmp_path, eval_distance=3.0)
    assert [len(x) for x in plan(farther, False)] == [0, 1] and [len(x) for x in plan(farther, True)] == [1, 0]
    # the second eval protocol: eval renders of the 20-view orbit are stale for it (and its distance counts),
    # training renders are not; the default protocol's hash is the one it always had
    grid = small(tmp_path, eval_protocol="lrm64")
    assert [len(x) for x in plan(grid, True)] == [1, 0] and [len(x) for x in plan(grid, False)] == [0, 1]
    assert output_hash(grid.render, True) != output_hash(small(tmp_path, eval_protocol="lrm64",
                                                              eval_grid_distance=2.0).render, True)
    assert output_hash(small(tmp_path, eval_grid_distance=2.0).render, True) == output_hash(cfg.render, True)


def test_eval_view_sets_follow_the_protocol(tmp_path):
    from pipelines.render import view_sets

    cfg = small(tmp_path)
    default = view_sets("u", cfg.render, True)
    assert len(default["orbit"]) == cfg.render.eval_orbit_views and len(default["inputs"]) == 4
    grid = view_sets("u", small(tmp_path, eval_protocol="lrm64").render, True)
    assert grid["orbit"].shape == (64, 4, 4) and np.allclose(grid["inputs"], default["inputs"])
    assert np.allclose(np.linalg.norm(grid["orbit"][:, :3, 3], axis=1), 2.7)


@pytest.mark.ray
@pytest.mark.blender
def test_stage_with_ray_actors_then_resume(tmp_path, ray_local):
    pytest.importorskip("bpy")  # this process holds bpy too (as in a whole test session): the worker processes
    # of the rerun copy its sys.path and must still import their own
    make_assets(tmp_path, 2)
    cfg = small(tmp_path)
    run(cfg, executor="ray", progress=False)
    rows = rows_by_uid(tmp_path)
    assert set(rows) == {"asset0", "asset1", "broken"}  # the download-failed uid is not a render job
    assert rows["broken"]["status"] == "failed" and "not a glb: no glTF header" in rows["broken"]["reason"]  # refused before Blender opens it
    for uid in ("asset0", "asset1"):
        r, d = rows[uid], tmp_path / "renders" / uid
        assert r["status"] == "ok" and r["rendered"] and r["license"] == "cc0", r
        assert sorted(p.name for p in d.glob("*.png")) == sorted(
            f"{i:02d}.{k}.png" for i in range(3) for k in ("rgba", "depth", "normal"))
        cams = np.load(d / "cameras.npz")
        np.testing.assert_allclose(cams["c2w"], random_views(uid, 3)["c2w"], atol=1e-6)  # seeded by uid
        meta = json.loads((d / "meta.json").read_text())
        assert meta["attribution"] == r["attribution"] and "lighting" in meta and meta["quality"]["ok"]
    assert (tmp_path / "renders" / "sheet.png").exists()
    before = {u: json.loads((tmp_path / "renders" / u / "meta.json").read_text())["rendered_at"]
              for u in ("asset0", "asset1")}
    # Rerun in worker processes: complete assets are skipped, the failed one is retried (and fails again).
    run(cfg, executor="process", progress=False)
    rows = rows_by_uid(tmp_path)
    for u, t in before.items():
        assert json.loads((tmp_path / "renders" / u / "meta.json").read_text())["rendered_at"] == t
        assert rows[u]["status"] == "ok" and not rows[u]["rendered"]
    assert rows["broken"]["status"] == "failed"


@pytest.mark.blender
def test_sigkill_halfway_then_rerun_renders_each_asset_once(tmp_path):
    make_assets(tmp_path, 3, bad=False)
    args = [sys.executable, "-m", "pipelines.render", "--out", str(tmp_path), "render.executor=local",
            "render.resolution=96", "render.views=6", "render.samples=16", "render.threads=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    renders = tmp_path / "renders"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((renders / f"asset{i}" / "meta.json").exists() for i in range(3)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    complete = {u.name: json.loads((u / "meta.json").read_text()) for u in renders.iterdir()
                if u.is_dir() and not u.name.startswith(".")}
    assert 1 <= len(complete) < 3, list(complete)
    assert all((renders / u / "meta.json").exists() for u in complete)  # a folder exists only when whole

    cfg = small(tmp_path, resolution=96, views=6, samples=16, threads=1)
    run(cfg, executor="local", progress=False)
    rows = rows_by_uid(tmp_path)
    assert {u for u, r in rows.items() if r["status"] == "ok"} == {"asset0", "asset1", "asset2"}
    for u in ("asset0", "asset1", "asset2"):
        meta = json.loads((renders / u / "meta.json").read_text())
        if u in complete:  # finished before the kill: kept, not rendered again
            assert meta["rendered_at"] == complete[u]["rendered_at"] and not rows[u]["rendered"]
        else:  # rendered once, by the rerun
            assert meta["pid"] == os.getpid() and rows[u]["rendered"]
        assert len(list((renders / u).glob("*.rgba.png"))) == 6
    assert not list(renders.glob(".tmp-*"))


@pytest.mark.blender
def test_eval_mode_orbit_and_inputs(tmp_path):
    make_assets(tmp_path, 1, bad=False)
    cfg = small(tmp_path, samples=2, resolution=24)
    run(cfg, eval_mode=True, executor="local", progress=False)
    d = tmp_path / "renders_eval" / "asset0"
    orbit, inputs = np.load(d / "orbit" / "cameras.npz"), np.load(d / "inputs" / "cameras.npz")
    assert orbit["c2w"].shape == (20, 4, 4) and inputs["c2w"].shape == (4, 4, 4)
    for i in range(20):  # docs/CONTRACTS.md: azimuth 18°·i, elevation 30°·sin(2·azimuth), distance 2.6
        az = 18.0 * i
        eye = spherical_position(az, 30.0 * np.sin(np.radians(2 * az)), 2.6)
        np.testing.assert_allclose(orbit["c2w"][i], look_at(eye), atol=1e-5)
    for i, az in enumerate([0, 90, 180, 270]):
        np.testing.assert_allclose(inputs["c2w"][i], look_at(spherical_position(az, 20.0, 2.6)), atol=1e-5)
    assert len(list((d / "orbit").glob("*.depth.png"))) == 20 and (d / "inputs" / "meta.json").exists()
    assert rows_by_uid(tmp_path, "render_eval")["asset0"]["status"] == "ok"


def test_an_unsafe_uid_is_a_failed_row_and_the_others_render(tmp_path):
    """A download row whose uid names a path (`../x`, absolute, dotted): that row fails with the reason and
    nothing is written for it; the stage goes on (it used to stop the whole stage)."""
    out = tmp_path / "out"
    make_assets(out, 1, bad=False)
    rows = mf.read_rows(mf.manifest_path(out, "download"))
    glb = rows[0]["path"]
    for uid in ("../escaped", str(tmp_path / "abs"), "dotted.name"):
        rows.append({**rows[0], "uid": uid, "path": glb})
    mf.write_rows(mf.manifest_path(out, "download"), rows)
    got = {r["uid"]: r for r in run(small(out, executor="local"), progress=False)}
    assert got["asset0"]["status"] == "ok"
    for uid in ("../escaped", str(tmp_path / "abs"), "dotted.name"):
        assert got[uid]["status"] == "failed" and got[uid]["reason"].startswith("unsafe uid"), got[uid]
    assert not (tmp_path / "out" / "escaped").exists() and not (tmp_path / "abs").exists()
    assert sorted(p.name for p in (out / "renders").iterdir() if p.is_dir()) == ["asset0"]


class HungryWorker:
    """A renderer (RenderWorker: bpy, then the memory cap) whose asset asks for twice its cap."""

    def __init__(self, cap: int) -> None:
        from pipelines.render import RenderWorker

        self.inner = RenderWorker({"max_memory_bytes": cap}, 1, False, 0, cap_memory=True)
        self.cap = cap

    def ready(self) -> None:
        self.inner.ready()

    def __call__(self, item: dict) -> dict:
        np.ones(2 * self.cap, np.uint8)  # past the cap: MemoryError, not the machine's memory
        return {"uid": item["uid"], "status": "ok"}


def test_a_renderer_past_its_memory_cap_fails_its_row(tmp_path):
    from functools import partial

    from pipelines.executor import run_workers

    rows = run_workers(partial(HungryWorker, 256 << 20), [{"uid": "a"}, {"uid": "b"}], executor="process",
                       workers=1, timeout_s=120, progress=False)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("MemoryError" in r["reason"] for r in rows), rows
