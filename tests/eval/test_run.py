"""eval/run.py end to end (Blender renders the eval sets): a GSO folder the test builds and the held-out
procedural set, each built under OUT/evalsets/<slug>/ by pipelines.evalset (`make render-eval`) and never
from the training manifest, then scored; a model with an analytic sphere for density stands in for a
checkpoint; failures (a broken object, an empty mesh) are rows.

Sizes are tiny (24² renders below LPIPS's 32² floor, 6 orbit views, 24³ marching cubes): the point is the
plumbing and what lands on disk, the metrics are proven in test_metrics.py / test_geometry.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import trimesh
from PIL import Image

from core import manifest as mf
from core.config import load_config
from core.layout import INDEX_SCHEMA
from eval import run as eval_run
from pipelines.evalset import build as build_evalset
from pipelines.procedural.basic import make_procedural_asset
from pipelines.sources.local import uid_for as local_uid
from training.model import GTR

pytestmark = pytest.mark.blender

ORBIT = 6
SIZE = 24
SMALL = [f"render.resolution={SIZE}", "render.samples=4", f"render.eval_orbit_views={ORBIT}", "render.executor=local",
         "render.threads=2", "render.sheet_views=2", "data.executor=local", "data.procedural_texture_size=64",
         "data.procedural_preset=basic", "data.procedural_count=8",  # the uids below: the basic preset, 8 training
         "loader.input_size=32", "mesh.grid=24", "refine.steps=2", "refine.render_size=32", "eval.points=2000",
         "eval.iou_resolution=16", "eval.icp_iterations=5", "eval.sheet_views=3", "eval.methods=[feedforward,refined]",
         "mesh.level_mode=fixed"]  # SphereGTR below is the level-10 set
TRAINING = [f"procedural-{i:04d}" for i in range(8)]  # what the fake training run below used


class SphereGTR(GTR):
    """A real GTR (f_c on its triplane) whose density is an analytic sphere of radius 0.35 at the sdf level."""

    def query_density(self, planes, points):
        return 10.0 + 40.0 * (0.35 - points.norm(dim=-1, keepdim=True))

    def query(self, planes, points):
        return self.query_density(planes, points), self.query_color(planes, points)


class EmptyGTR(GTR):
    """Density 0 everywhere: no surface at level 10, so every reconstruction fails with EmptyMeshError."""

    def query_density(self, planes, points):
        return torch.zeros_like(points[..., :1])

    def query(self, planes, points):
        return self.query_density(planes, points), self.query_color(planes, points)


def _model(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg.model).eval()


def _gso_object(root: Path, name: str, index: int) -> None:
    """A GSO-layout object (meshes/model.obj + model.mtl naming texture.png, the file in materials/textures/)
    from procedural asset `index`, written as OBJ text by hand."""
    glb = root / f"{name}.glb"
    make_procedural_asset(index, glb, 64)
    mesh = trimesh.load(glb, force="mesh")
    glb.unlink()
    (root / name / "meshes").mkdir(parents=True)
    (root / name / "materials" / "textures").mkdir(parents=True)
    mesh.visual.material.baseColorTexture.save(root / name / "materials" / "textures" / "texture.png")
    v, uv, f = mesh.vertices, mesh.visual.uv, mesh.faces + 1
    lines = ["mtllib model.mtl", "usemtl material_0"]
    lines += [f"v {a:.6f} {b:.6f} {c:.6f}" for a, b, c in v] + [f"vt {a:.6f} {b:.6f}" for a, b in uv]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f]
    (root / name / "meshes" / "model.obj").write_text("\n".join(lines) + "\n")
    (root / name / "meshes" / "model.mtl").write_text("newmtl material_0\nmap_Kd texture.png\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """OUT with a fake finished training run (download table + shards index, nothing rendered) and a GSO folder."""
    base = tmp_path_factory.mktemp("eval_run")
    out, gso = base / "out", base / "gso"
    mf.write_rows(mf.manifest_path(out, "download"),
                  [{"uid": u, "status": "ok", "reason": "", "path": str(out / "assets" / f"{u}.glb")} for u in TRAINING])
    trained_gso = local_uid("c_trained/meshes/model.obj")  # a GSO object training already saw
    index = [{"shard": "train-000000.tar", "split": "train", "uids": [*TRAINING, trained_gso], "count": 9,
              "bytes": 1, "sha256": "", "licenses": [], "attributions": []}]
    (out / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out / "shards" / "index.parquet")
    _gso_object(gso, "a_box", 0)
    _gso_object(gso, "c_trained", 4)
    (gso / "b_broken" / "meshes").mkdir(parents=True)
    (gso / "b_broken" / "meshes" / "model.obj").write_text("this is not a mesh\n")
    return out, gso, trained_gso


def _check_outputs(out: Path, uid: str, methods: list[str]) -> None:
    """views/<method>/<uid>/NN.png: the ground truth's count and size, RGBA; the sheet exists."""
    for m in methods:
        views = sorted((out / "eval" / "views" / m / uid).glob("*.png"))
        assert [p.name for p in views] == [f"{i:02d}.png" for i in range(ORBIT)]
        for p in views:
            img = Image.open(p)
            assert img.mode == "RGBA" and img.size == (SIZE, SIZE)
    assert Image.open(out / "eval" / "sheets" / f"{uid}.png").size[1] == 128 * (1 + len(methods))


def test_gso_folder(world, monkeypatch):
    torch.set_num_threads(2)
    out, gso, trained_gso = world
    cfg = load_config(None, [f"out={out}", *SMALL, "eval.max_assets=2"])
    monkeypatch.setattr(eval_run, "_load", lambda ckpt, default, c: (_model(SphereGTR, c), "sphere double"))
    build_evalset(cfg, f"gso:{gso}", progress=False)
    rows = eval_run.run(cfg, source=f"gso:{gso}", progress=False)

    root = next((out / "evalsets").glob("gso-gso-*"))
    assert len(root.name) == len("gso-gso-") + 8
    for p in ("manifest/filter.parquet", "manifest/download.parquet", "manifest/render_eval.parquet", "evalset.json"):
        assert (root / p).is_file(), p
    box, broken = local_uid("a_box/meshes/model.obj"), local_uid("b_broken/meshes/model.obj")
    # first 2 by folder name after dropping the one training used; only the box renders
    assert json.loads((root / "evalset.json").read_text())["uids"] == [box, broken]
    filt = {r["uid"]: r for r in mf.read_rows(root / "manifest" / "filter.parquet")}
    assert filt[trained_gso]["status"] == "skipped" and "deny-list" in filt[trained_gso]["reason"]
    rendered = sorted(p.name for p in (root / "renders_eval").iterdir() if p.is_dir())
    assert rendered == [box]
    assert len(list((root / "renders_eval" / box / "orbit").glob("*.rgba.png"))) == ORBIT
    assert not (out / "renders_eval").exists()  # the training manifest was not rendered

    by = {(r["uid"], r["method"]): r for r in rows}
    assert set(by) == {(u, m) for u in (box, broken) for m in ("feedforward", "refined")}
    for m in ("feedforward", "refined"):
        ok = by[(box, m)]
        assert ok["status"] == "ok" and 0 < ok["ssim"] <= 1 and math.isfinite(ok["psnr"]) and 0 <= ok["iou"] <= 1
        assert math.isnan(ok["lpips_vgg"]) and "LPIPS not scored" in ok["notes"]
        assert by[(broken, m)]["status"] == "failed"
        assert "download failed" in by[(broken, m)]["reason"] and "not an obj" in by[(broken, m)]["reason"]
    _check_outputs(out, box, ["feedforward", "refined"])

    report = json.loads((out / "eval" / "report.json").read_text())
    es = report["info"]["eval_set"]
    assert es["slug"] == root.name and es["assets"] == 2 and es["excluded_training"] == 1 and es["held_out"]
    assert es["leak_check"]["checked"] and es["leak_check"]["overlap"] == []
    assert set(report["mean"]) == {"feedforward", "refined"} and report["mean"]["refined"]["failed"] == 1
    md = (out / "eval" / "report.md").read_text()
    assert root.name in md and "LEAK" not in md and "Leak check: no eval uid" in md
    assert f"| {box} (a_box) | refined | ok |" in md and f"{broken} (b_broken)" in md  # GSO folder names shown
    assert "| GTR feed-forward |" in md and md.count("| GTR + texture refinement") == 1
    csv = (out / "eval" / "report.csv").read_text().splitlines()
    assert sum(line.startswith("MEAN,") for line in csv) == 2 and len(csv) == 1 + 4 + 2


def test_procedural_held_out_then_an_empty_mesh(world, monkeypatch, capsys):
    torch.set_num_threads(2)
    out, _, _ = world
    cfg = load_config(None, [f"out={out}", *SMALL, "eval.max_assets=1"])
    monkeypatch.setattr(eval_run, "_load", lambda ckpt, default, c: (_model(SphereGTR, c), "sphere double"))
    build_evalset(cfg, "procedural", progress=False)
    rows = eval_run.run(cfg, source="procedural", progress=False)
    root = out / "evalsets" / "procedural-heldout"
    down = mf.read_rows(root / "manifest" / "download.parquet")
    assert [r["uid"] for r in down] == ["procedural-0008"] and down[0]["status"] == "ok"  # after training's 0..7
    assert sorted(p.name for p in (root / "assets").iterdir()) == ["procedural-0008.glb"]
    assert [p.name for p in (root / "renders_eval").iterdir() if p.is_dir()] == ["procedural-0008"]
    assert not set(r["uid"] for r in rows) & set(TRAINING)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 2
    _check_outputs(out, "procedural-0008", ["feedforward", "refined"])
    meta = root / "renders_eval" / "procedural-0008" / "orbit" / "meta.json"
    stamp = meta.stat().st_mtime_ns

    # A model with no surface: every row fails with the reason, the report is still written, nothing re-rendered.
    for p in (out / "eval").glob("report.*"):
        p.unlink()
    monkeypatch.setattr(eval_run, "_load", lambda ckpt, default, c: (_model(EmptyGTR, c), "empty double"))
    assert eval_run.main(["--out", str(out), "--source", "procedural", *SMALL[:-1], "eval.max_assets=1",
                          "eval.methods=[feedforward]"]) == 1
    report = json.loads((out / "eval" / "report.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "failed" and "EmptyMeshError" in row["reason"] and "no surface" in row["reason"]
    assert report["info"]["eval_set"]["slug"] == "procedural-heldout"
    assert "EmptyMeshError" in (out / "eval" / "report.md").read_text()
    assert meta.stat().st_mtime_ns == stamp  # the already-rendered asset was reused
    assert "0/1 rows ok" in capsys.readouterr().out
    assert np.asarray(Image.open(out / "eval" / "sheets" / "procedural-0008.png")).ndim == 3


def test_rows_are_kept_for_the_same_weights_and_settings_only_and_redone_when_a_view_is_bad(world, monkeypatch, tmp_path):
    """The row cache follows the checkpoint's bytes, not its path: retraining into the same step-N/ (new
    model.safetensors at the same path) redoes every row; a cached row whose view file went missing is
    redone instead of crashing the evaluation."""
    torch.set_num_threads(2)
    out, _, _ = world
    step = tmp_path / "runs" / "mesh" / "step-4"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"weights of the first training")
    cfg = load_config(None, [f"out={out}", *SMALL, "eval.max_assets=1", "eval.methods=[feedforward]"])
    monkeypatch.setattr(eval_run, "_load", lambda ckpt, default, c: (_model(SphereGTR, c), f"checkpoint {step}"))
    build_evalset(cfg, "procedural", progress=False)
    calls = []
    real = eval_run.evaluate_one
    monkeypatch.setattr(eval_run, "evaluate_one", lambda uid, method, *a: calls.append((uid, method)) or
                        real(uid, method, *a))
    assert {r["status"] for r in eval_run.run(cfg, source="procedural", progress=False)} == {"ok"}
    assert len(calls) == 1
    eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 1  # the same weights: the finished row is reused
    (step / "model.safetensors").write_bytes(b"weights of a second training, same path")
    eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 2  # other bytes at the same path: redone
    (out / "eval" / "views" / "feedforward" / "procedural-0008" / "03.png").unlink()
    rows = eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 3 and rows[0]["status"] == "ok"
    assert (out / "eval" / "views" / "feedforward" / "procedural-0008" / "03.png").is_file()
    (out / "eval" / "views" / "feedforward" / "procedural-0008" / "00.png").write_bytes(b"\x89PNG truncated")
    rows = eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 4 and rows[0]["status"] == "ok"  # a view that does not decode: redone
    for done in (out / "eval" / "rows").rglob("feedforward/procedural-0008.json"):  # every eval set's row of it
        crafted = {k: v for k, v in json.loads(done.read_text()).items() if k != "status"}
        done.write_text(json.dumps(crafted))
    rows = eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 5 and rows[0]["status"] == "ok"  # a row without its status: not ours, redone
    cfg.refine.steps += 1
    eval_run.run(cfg, source="procedural", progress=False)
    assert len(calls) == 6  # other refinement settings, same weights: redone
