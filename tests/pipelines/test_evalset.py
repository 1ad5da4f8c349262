"""pipelines/evalset.py (`make render-eval`) without Blender: held-out procedural indices, the val split,
exclusion of training uids, and what evaluation then reads (core.evalsets) and refuses (an unbuilt set). The
render stage is replaced by a recorder; tests/eval/test_run.py renders for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trimesh

from core import evalsets as E
from core import manifest as mf
from core.config import load_config
from eval.report import markdown
from pipelines import evalset as P
from pipelines.sources import candidates
from pipelines.sources.local import uid_for as local_uid
from tests.core.test_evalsets import write_index as _index


@pytest.fixture
def renders(monkeypatch):
    """Stand-in for pipelines.render.run: records which config (eval root) and mode it was called with."""
    calls = []
    monkeypatch.setattr(P, "render_run", lambda cfg, eval_mode=False, **kw: calls.append((cfg, eval_mode)))
    return calls


def test_bad_or_unbuilt_sets_exit_2_with_the_command(tmp_path, capsys):
    from eval.run import main as eval_main

    assert P.main(["--out", str(tmp_path / "o"), "--source", "s3:x"]) == 2
    assert "unknown source" in capsys.readouterr().err
    assert eval_main(["--out", str(tmp_path / "o"), "--source", "s3:x"]) == 2
    assert eval_main(["--out", str(tmp_path / "o"), "--source", "procedural"]) == 2  # not built yet
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: eval set procedural-heldout is not built") and "make render-eval SOURCE=procedural" in err[-1]


def test_procedural_held_out_indices(tmp_path):
    cfg = load_config(None, [f"out={tmp_path}", "data.procedural_count=8", "eval.max_assets=24",
                             "data.procedural_preset=basic"])  # basic: its (shape, texture) pairing is checked
    ecfg = P.eval_config(cfg, "procedural", "", tmp_path / "evalsets" / "procedural-heldout")
    train = candidates(cfg)[0].to_pylist()
    held = candidates(ecfg)[0].to_pylist()
    assert [r["uid"] for r in held] == [f"procedural-{i:04d}" for i in range(8, 32)]
    combo = lambda r: r["name"].split(" #")[0]  # noqa: E731 - "box with checker texture"
    assert not {combo(r) for r in held} & {combo(r) for r in train}  # shapes meet other textures
    assert len({combo(r) for r in held}) == 24
    assert ecfg.out_path == tmp_path / "evalsets" / "procedural-heldout" and cfg.data.procedural_start == 0


def test_val_split_from_the_training_assets(tmp_path, renders, monkeypatch):
    out = tmp_path / "out"
    (out / "assets").mkdir(parents=True)
    uids = [f"u{i}" for i in range(6)]
    for u in uids:
        (out / "assets" / f"{u}.glb").write_bytes(b"glTF")
    mf.write_rows(mf.manifest_path(out, "download"),
                  [{"uid": u, "status": "ok", "reason": "", "name": u, "path": f"assets/{u}.glb"} for u in uids])
    split = {"u0": "train", "u1": "val", "u2": "train", "u3": "val", "u4": "val", "u5": "train"}
    mf.write_rows(mf.manifest_path(out, "shards"), [{"uid": u, "status": "ok", "split": s} for u, s in split.items()])
    _index(out, ["u0", "u2", "u5"], ["u1", "u3", "u4"])
    monkeypatch.chdir(tmp_path)  # paths in the training table are relative to OUT, not to here
    cfg = load_config(None, ["out=out", "eval.max_assets=2"])
    es = P.build(cfg, "val", progress=False)
    assert es.slug == "val" and es.uids == ["u1", "u3"] and not es.held_out
    ((ecfg, eval_mode),) = renders
    assert eval_mode and ecfg.out_path == Path("out/evalsets/val")
    down = mf.read_rows(mf.manifest_path(ecfg.out, "download"))
    assert [r["uid"] for r in down] == ["u1", "u3"]
    assert all(Path(r["path"]) == (out / "assets" / f"{r['uid']}.glb").resolve() for r in down)
    filt = {r["uid"]: r["status"] for r in mf.read_rows(mf.manifest_path(ecfg.out, "filter"))}
    assert filt == {"u1": "ok", "u3": "ok", "u4": "skipped"}
    leak = E.leak_check(cfg, es)  # val uids sit in val shards by design: only the train split counts
    assert leak["checked"] and leak["overlap"] == [] and "train split" in leak["against"]
    _index(out, ["u0", "u2", "u3"], ["u1", "u4"])
    assert E.leak_check(cfg, es)["overlap"] == ["u3"]
    assert E.load_built(cfg, "val").uids == ["u1", "u3"]  # evalset.json: what eval.run reads


def test_training_uids_excluded_and_the_leak_warning(tmp_path, renders):
    src, out = tmp_path / "meshes", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b", "c"):
        trimesh.creation.icosphere(1).export(src / f"{name}.ply")
    _index(out, [local_uid("a.ply"), "procedural-0000"])
    cfg = load_config(None, [f"out={out}", "eval.max_assets=1", "data.executor=local"])
    es = P.build(cfg, f"local:{src}", progress=False)
    assert es.uids == [local_uid("b.ply")] and es.excluded_training == 1  # a.ply trained on: the next one
    assert (es.root / "assets" / f"{local_uid('b.ply')}.ply").is_file() and len(renders) == 1
    assert json.loads((es.root / "evalset.json").read_text())["uids"] == es.uids
    assert E.leak_check(cfg, es)["overlap"] == []

    cfg = load_config(None, [f"out={out}", "eval.max_assets=1", "data.executor=local", "eval.exclude_training=false"])
    es = P.build(cfg, f"local:{src}", progress=False)
    assert es.uids == [local_uid("a.ply")] and es.excluded_training == 0
    assert [r["uid"] for r in mf.read_rows(mf.manifest_path(es.root, "download"))] == es.uids
    leak = E.leak_check(cfg, es)
    assert leak["overlap"] == es.uids and "all splits" in leak["against"]
    md = markdown([], {"eval_set": E.describe(es, leak)})
    assert "TRAIN/EVAL LEAK: 1 of 1" in md and local_uid("a.ply") in md


def test_eval_uids_may_name_objects_of_a_folder_source(tmp_path, renders):
    """eval.uids (one entry a line, # comments): for folder sources an entry is a uid or an object's name
    (a GSO folder, an OmniObject3D object id); entries that match nothing are listed, not silently dropped."""
    from tests.pipelines.test_sources import build_omniobject3d

    root = build_omniobject3d(tmp_path / "omni")
    lst = tmp_path / "list.txt"
    lst.write_text("# the paper's OmniObject3D list would go here\napple_002\ntoy_car_003  # a comment\nnot_there\n")
    cfg = load_config(None, [f"out={tmp_path / 'out'}", "data.executor=local", f"eval.uids={lst}",
                             "eval.max_assets=0"])
    es = P.build(cfg, f"omniobject3d:{root}", progress=False)
    want = {local_uid("apple/apple_002/Scan/Scan.obj"), local_uid("toy_car/toy_car_003/Scan/Scan.obj")}
    assert set(es.uids) == want and es.slug.startswith("omniobject3d-omni-")
    written = (es.root / "eval-uids.txt").read_text()
    assert "# no candidate: not_there" in written
