"""core/evalsets.py: slugs, source parsing, what training used, the leak check, and a set that is not built.

(Building sets is pipelines/evalset.py, tested in tests/pipelines/test_evalset.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import evalsets as E
from core import manifest as mf
from core.config import load_config
from core.layout import INDEX_SCHEMA


def write_index(out: Path, train: list[str], val: list[str] = ()) -> None:
    rows = [{"shard": f"{s}-000000.tar", "split": s, "uids": list(u), "count": len(u), "bytes": 1, "sha256": "",
             "licenses": [], "attributions": []} for s, u in (("train", train), ("val", val)) if u]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), out / "shards" / "index.parquet")


def test_slugs_and_bad_sources(tmp_path, monkeypatch):
    a, b = tmp_path / "x" / "My GSO!", tmp_path / "y" / "My GSO!"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    sa = E.slug_for(*E.parse_eval_source(f"gso:{a}"))
    assert sa.startswith("gso-My_GSO-") and len(sa.rsplit("-", 1)[1]) == 8
    monkeypatch.chdir(tmp_path)
    assert E.slug_for(*E.parse_eval_source("gso:x/My GSO!")) == sa  # same folder by a relative path
    assert E.slug_for(*E.parse_eval_source(f"gso:{b}")) != sa  # same name, another folder
    assert E.slug_for(*E.parse_eval_source(f"local:{a}")).startswith("local-My_GSO-")
    assert E.slug_for("procedural", "") == "procedural-heldout" and E.slug_for("val", "") == "val"
    lst = tmp_path / "gso eval.txt"
    lst.write_text("u1\nu2\n")
    s1 = E.slug_for("objaverse", "", str(lst))
    lst.write_text("u1\nu3\n")
    assert s1.startswith("objaverse-gso_eval-") and E.slug_for("objaverse", "", str(lst)) != s1
    for bad, msg in [("s3:x", "unknown source"), (f"gso:{tmp_path / 'nope'}", "not found"), ("val:x", "unknown")]:
        with pytest.raises(E.EvalSetError, match=msg):
            E.parse_eval_source(bad)


def test_a_set_that_is_not_built_names_the_command_that_builds_it(tmp_path):
    cfg = load_config(None, [f"out={tmp_path}"])
    es = E.resolve(cfg, "procedural")
    assert not es.built and es.uids == [] and es.root == tmp_path / "evalsets" / "procedural-heldout"
    with pytest.raises(E.EvalSetError, match=f"run `make render-eval SOURCE=procedural OUT={tmp_path}`"):
        E.load_built(cfg, "procedural")
    (es.root).mkdir(parents=True)
    (es.root / "evalset.json").write_text(json.dumps({"uids": ["procedural-0008"], "excluded_training": 0}))
    built = E.load_built(cfg, "procedural")
    assert built.built and built.uids == ["procedural-0008"]
    # nothing downloaded or rendered for it: its failure says so, naming what to run
    assert built.failures() == {"procedural-0008": "download failed: no download row"}
    mf.write_rows(mf.manifest_path(es.root, "download"), [{"uid": "procedural-0008", "status": "ok", "name": "box"}])
    assert built.failures() == {"procedural-0008": "not rendered (run `make render-eval`)"}
    assert built.names() == {"procedural-0008": "box"}


def test_leak_check_counts_the_split_that_matters(tmp_path):
    cfg = load_config(None, [f"out={tmp_path}"])
    held = E.EvalSet("procedural", "procedural", "procedural-heldout", tmp_path, ["a", "b"])
    val = E.EvalSet("val", "val", "val", tmp_path, ["c", "d"], held_out=False)
    assert not E.leak_check(cfg, held)["checked"]  # no index: nothing trained from shards here
    write_index(tmp_path, ["a", "x"], ["c", "d"])
    leak = E.leak_check(cfg, held)
    assert leak["checked"] and leak["overlap"] == ["a"] and "all splits" in leak["against"]
    assert E.leak_check(cfg, val)["overlap"] == []  # val uids sit in val shards by design
    write_index(tmp_path, ["a", "d"], ["c"])
    assert E.leak_check(cfg, val)["overlap"] == ["d"]
    described = E.describe(held, leak)
    assert described["assets"] == 2 and described["root"] == str(tmp_path) and described["leak_check"] is leak


def test_training_uids_fall_back_to_the_download_table(tmp_path):
    assert E.training_uids(tmp_path) == (set(), "")
    mf.write_rows(mf.manifest_path(tmp_path, "download"), [{"uid": "x", "status": "ok"}, {"uid": "y", "status": "failed"}])
    assert E.training_uids(tmp_path)[0] == {"x"}
    write_index(tmp_path, ["t"], ["v"])
    assert E.training_uids(tmp_path) == ({"t"}, str(tmp_path / "shards" / "index.parquet"))
    assert E.training_uids(tmp_path, None)[0] == {"t", "v"}
