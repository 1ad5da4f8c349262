"""pipelines/render.py end to end: Ray actors, timeout/crash replacement, resume, SIGKILL then rerun, eval mode.

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
from pipelines.render import run, run_actor_pool

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
    cfg.render = RenderConfig(**{"resolution": 32, "views": 3, "samples": 4, "actors": 2, "threads": 1,
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


class Flaky:
    """A stand-in actor for the pool: hangs or dies on request, like Blender on a hostile file."""

    def work(self, item: str) -> tuple[str, int]:
        if item == "hang":
            time.sleep(600)
        if item == "crash":
            os._exit(1)
        return item, os.getpid()

    def ready(self) -> int:
        return os.getpid()


@pytest.mark.ray
def test_actor_pool_replaces_hung_and_crashed_actors(ray_local):
    ray = ray_local
    # The test module is not importable in Ray's workers: ship the class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cls = ray.remote(num_cpus=0)(Flaky)
    results: dict[str, tuple] = {}
    items = ["a", "hang", "b", "crash", "c", "d"]
    run_actor_pool(items, cls.remote, lambda a, it: a.work.remote(it),
                   lambda it, res, err: results.__setitem__(it, (res, err)), actors=2, timeout_s=8.0,
                   ping=lambda a: a.ready.remote())
    assert set(results) == set(items)
    assert results["hang"][0] is None and results["hang"][1].startswith("timeout")
    assert results["crash"][0] is None and "crashed" in results["crash"][1]
    for it in "abcd":
        assert results[it][1] is None and results[it][0][0] == it
    assert len({results[it][0][1] for it in "abcd"}) >= 2  # work moved on to replacement actors


class Poisoned:
    """A stand-in actor whose result says its renderer could not reset (render_asset's `reset_failed`)."""

    def work(self, item: str) -> dict:
        return {"item": item, "pid": os.getpid(), "reset_failed": item == "poison"}

    def ready(self) -> int:
        return os.getpid()


@pytest.mark.ray
def test_actor_pool_retires_an_actor_whose_reset_failed(ray_local):
    from pipelines.render import _reset_failed

    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cls = ray.remote(num_cpus=0)(Poisoned)
    got: dict[str, dict] = {}
    run_actor_pool(["a", "b", "poison", "c"], cls.remote, lambda a, it: a.work.remote(it),
                   lambda it, res, err: got.__setitem__(it, res), actors=1, timeout_s=60.0,
                   ping=lambda a: a.ready.remote(), retire=_reset_failed)
    assert got["a"]["pid"] == got["b"]["pid"] == got["poison"]["pid"]  # one actor, reused while healthy
    assert got["c"]["pid"] != got["poison"]["pid"]  # ... and replaced after its reset failed
    assert got["poison"]["reset_failed"] and not got["c"]["reset_failed"]


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


@pytest.mark.ray
@pytest.mark.blender
def test_stage_with_ray_actors_then_resume(tmp_path, ray_local):
    make_assets(tmp_path, 2)
    cfg = small(tmp_path)
    run(cfg, use_ray=True, progress=False)
    rows = rows_by_uid(tmp_path)
    assert set(rows) == {"asset0", "asset1", "broken"}  # the download-failed uid is not a render job
    assert rows["broken"]["status"] == "failed" and "import failed" in rows["broken"]["reason"]
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
    # Rerun in-process: complete assets are skipped, the failed one is retried (and fails again).
    run(cfg, use_ray=False, progress=False)
    rows = rows_by_uid(tmp_path)
    for u, t in before.items():
        assert json.loads((tmp_path / "renders" / u / "meta.json").read_text())["rendered_at"] == t
        assert rows[u]["status"] == "ok" and not rows[u]["rendered"]
    assert rows["broken"]["status"] == "failed"


@pytest.mark.blender
def test_sigkill_halfway_then_rerun_renders_each_asset_once(tmp_path):
    make_assets(tmp_path, 3, bad=False)
    args = [sys.executable, "-m", "pipelines.render", "--no-ray", "--out", str(tmp_path),
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
    run(cfg, use_ray=False, progress=False)
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
    run(cfg, eval_mode=True, use_ray=False, progress=False)
    d = tmp_path / "renders_eval" / "asset0"
    orbit, inputs = np.load(d / "orbit" / "cameras.npz"), np.load(d / "inputs" / "cameras.npz")
    assert orbit["c2w"].shape == (20, 4, 4) and inputs["c2w"].shape == (4, 4, 4)
    for i in range(20):  # DESIGN: azimuth 18°·i, elevation 30°·sin(2·azimuth), distance 2.6
        az = 18.0 * i
        eye = spherical_position(az, 30.0 * np.sin(np.radians(2 * az)), 2.6)
        np.testing.assert_allclose(orbit["c2w"][i], look_at(eye), atol=1e-5)
    for i, az in enumerate([0, 90, 180, 270]):
        np.testing.assert_allclose(inputs["c2w"][i], look_at(spherical_position(az, 20.0, 2.6)), atol=1e-5)
    assert len(list((d / "orbit").glob("*.depth.png"))) == 20 and (d / "inputs" / "meta.json").exists()
    assert rows_by_uid(tmp_path, "render_eval")["asset0"]["status"] == "ok"
