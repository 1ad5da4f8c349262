"""pipelines/shards.py: packing render folders into WebDataset shards, the split, the index, resume.

Shards are read back with Python's `tarfile` (not our loader, not webdataset) and compared with the files
the fake render stage wrote.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core import manifest
from core.config import Config
from core.layout import read_index
from pipelines.shards import member_bytes, pack, split_of, tar_bytes, uid_fraction
from tests.fake_renders import view_name, write_renders

UIDS = [f"asset{i:02d}" for i in range(9)]


def _cfg(out: Path, **shards) -> Config:
    cfg = Config(out=str(out))
    cfg.shards.val_fraction = 0.0
    for k, v in shards.items():
        setattr(cfg.shards, k, v)
    return cfg


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_samples_hold_exactly_the_render_files(tmp_path):
    write_renders(tmp_path, UIDS[:3], views=4)
    pack(_cfg(tmp_path, mtime=1234.0))
    (row,) = read_index(tmp_path)
    assert row["shard"] == "train-000000.tar" and row["uids"] == UIDS[:3] and row["count"] == 3
    path = tmp_path / "shards" / row["shard"]
    assert row["bytes"] == path.stat().st_size and row["sha256"] == _sha(path)
    assert row["licenses"] == ["by"] * 3 and row["attributions"] == [f"author of {u}" for u in UIDS[:3]]
    with tarfile.open(path) as t:
        members = t.getmembers()
        got = {m.name: t.extractfile(m).read() for m in members}
    assert {m.mtime for m in members} == {1234} and {m.uname for m in members} == {"gtr"}
    want = {}
    for u in UIDS[:3]:
        names = ["meta.json", "cameras.npz"] + [view_name(i, 4, k) for i in range(4) for k in ("rgba", "depth", "normal")]
        want.update({f"{u}.{n}": (tmp_path / "renders" / u / n).read_bytes() for n in names})
    assert got == want  # geometry.npz stays out by default
    # samples are contiguous, in uid order: WebDataset groups consecutive members by key
    keys = [m.name.split(".", 1)[0] for m in members]
    assert keys == sorted(keys)


def test_geometry_travels_when_asked(tmp_path):
    write_renders(tmp_path, UIDS[:1], views=2)
    pack(_cfg(tmp_path, geometry=True))
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as t:
        assert t.extractfile(f"{UIDS[0]}.geometry.npz").read() == (tmp_path / "renders" / UIDS[0] / "geometry.npz").read_bytes()


def test_bad_assets_are_skipped_or_failed_with_reasons(tmp_path):
    write_renders(tmp_path, UIDS[:3], failed=("brokenasset",), views=2)
    write_renders(tmp_path, ["lowquality"], views=2, ok=False)
    (tmp_path / "renders" / UIDS[1] / "01.depth.png").unlink()
    manifest.write_rows(manifest.manifest_path(tmp_path, "render"),
                        manifest.read_rows(manifest.manifest_path(tmp_path, "render"))
                        + [{"uid": "has.dot", "status": "ok", "reason": ""}])
    s = pack(_cfg(tmp_path))
    rows = {r["uid"]: r for r in manifest.read_rows(manifest.manifest_path(tmp_path, "shards"))}
    assert rows[UIDS[0]]["status"] == "ok" and rows[UIDS[0]]["shard"] == "train-000000.tar"
    assert rows[UIDS[1]]["status"] == "failed" and "01.depth.png missing" in rows[UIDS[1]]["reason"]
    assert rows["brokenasset"]["status"] == "skipped" and "blender crashed" in rows["brokenasset"]["reason"]
    assert rows["lowquality"]["status"] == "skipped" and "empty_views" in rows["lowquality"]["reason"]
    assert rows["has.dot"]["status"] == "failed" and "dots" in rows["has.dot"]["reason"]
    assert (s["ok"], s["skipped"], s["failed"]) == (2, 2, 2)
    assert [u for r in read_index(tmp_path) for u in r["uids"]] == [UIDS[0], UIDS[2]]


def test_split_is_a_function_of_the_uid_and_forced_val_never_trains(tmp_path):
    many = [f"u{i:04d}" for i in range(2000)]
    frac = sum(split_of(u, 0.25) == "val" for u in many) / len(many)
    assert abs(frac - 0.25) < 0.04  # binomial sd ~0.01: the hash is uniform
    assert [split_of(u, 0.25) for u in many] == [split_of(u, 0.25) for u in reversed(many)][::-1]
    assert all(0.0 <= uid_fraction(u) < 1.0 for u in many[:50])

    write_renders(tmp_path, UIDS, views=2)
    forced = [u for u in UIDS if split_of(u, 0.3) == "train"][:2]
    (tmp_path / "val.txt").write_text("# eval set\n" + "\n".join(forced) + "\n")
    pack(_cfg(tmp_path, val_fraction=0.3, val_uids=str(tmp_path / "val.txt")))
    index = read_index(tmp_path)
    train = {u for r in index if r["split"] == "train" for u in r["uids"]}
    val = {u for r in index if r["split"] == "val" for u in r["uids"]}
    assert train | val == set(UIDS) and not train & val
    assert set(forced) <= val
    assert val == {u for u in UIDS if u in forced or split_of(u, 0.3) == "val"}
    assert all(r["shard"].startswith(r["split"] + "-") for r in index)


def test_shards_split_by_count_and_bytes_and_sizes_are_planned_exactly(tmp_path):
    write_renders(tmp_path, UIDS, views=2)
    pack(_cfg(tmp_path, max_count=4))
    assert [r["count"] for r in read_index(tmp_path)] == [4, 4, 1]
    one = sum(member_bytes((tmp_path / "renders" / UIDS[0] / n).stat().st_size)
              for n in ["meta.json", "cameras.npz"] + [view_name(i, 2, k) for i in range(2) for k in ("rgba", "depth", "normal")])
    limit = tar_bytes(3 * one) + 100  # room for 3 samples of about this size, not 4
    out2 = tmp_path / "bytes"
    shutil.copytree(tmp_path / "renders", out2 / "renders")
    shutil.copytree(tmp_path / "manifest", out2 / "manifest")
    (out2 / "manifest" / "shards.parquet").unlink()
    pack(_cfg(out2, max_bytes=limit))
    idx = read_index(out2)
    assert all(r["bytes"] <= limit for r in idx) and sum(r["count"] for r in idx) == len(UIDS)
    assert max(r["count"] for r in idx) == 3
    for r in idx:  # the planner's closed form equals what tarfile wrote
        assert r["bytes"] == (out2 / "shards" / r["shard"]).stat().st_size


def test_rewrite_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_renders(a, UIDS, views=3)
    shutil.copytree(a, b)
    pack(_cfg(a, max_count=4))
    pack(_cfg(b, max_count=4))
    ia, ib = read_index(a), read_index(b)
    assert [r["sha256"] for r in ia] == [r["sha256"] for r in ib] and len(ia) == 3
    for r in ia:
        assert (a / "shards" / r["shard"]).read_bytes() == (b / "shards" / r["shard"]).read_bytes()


def test_resume_keeps_closed_shards_and_never_duplicates(tmp_path):
    write_renders(tmp_path, UIDS[:5], views=2)
    cfg = _cfg(tmp_path, max_count=2)
    first = pack(cfg)
    assert first["written"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stat = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}
    assert pack(cfg)["written"] == []  # nothing left to do

    # a crash after a rename but before the index write, plus a half-written temporary
    (tmp_path / "shards" / "index.parquet").unlink()
    (tmp_path / "shards" / ".tmp-train-000003.tar.123.abcd").write_bytes(b"partial")
    write_renders(tmp_path, UIDS[5:], views=2)
    s = pack(cfg)
    assert s["written"] == ["train-000003.tar", "train-000004.tar"]  # numbering goes on; old ones adopted
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("train-00000[0-2].tar")} == stat
    assert not list((tmp_path / "shards").glob(".tmp-*"))
    uids = [u for r in read_index(tmp_path) for u in r["uids"]]
    assert sorted(uids) == UIDS and len(uids) == len(set(uids))
    rows = manifest.read_rows(manifest.manifest_path(tmp_path, "shards"))
    assert sorted(r["uid"] for r in rows) == UIDS and all(r["status"] == "ok" for r in rows)

    # forcing an already-trained uid into val is refused rather than leaking the eval set
    (tmp_path / "val.txt").write_text(UIDS[0] + "\n")
    with pytest.raises(RuntimeError, match="leaks"):
        pack(_cfg(tmp_path, max_count=2, val_uids=str(tmp_path / "val.txt")))


def test_packed_uid_whose_render_later_fails_stays_ok_and_names_its_shard(tmp_path):
    write_renders(tmp_path, UIDS[:3], views=2)
    cfg = _cfg(tmp_path, max_count=2)
    pack(cfg)
    with tarfile.open(tmp_path / "shards" / "train-000001.tar") as t:  # where it really is, read by tarfile
        assert {m.name.split(".", 1)[0] for m in t.getmembers()} == {UIDS[2]}
    # a later render run marks two packed uids failed / flagged; their samples are still in closed shards
    write_renders(tmp_path, [], failed=(UIDS[2],))
    meta = tmp_path / "renders" / UIDS[0] / "meta.json"
    meta.write_text(meta.read_text().replace('"ok": true', '"ok": false'))
    s = pack(cfg)
    assert s["written"] == []
    rows = {r["uid"]: r for r in manifest.read_rows(manifest.manifest_path(tmp_path, "shards"))}
    for uid, shard, why in ((UIDS[2], "train-000001.tar", "render failed"), (UIDS[0], "train-000000.tar", "quality")):
        r = rows[uid]
        assert r["status"] == "ok" and r["shard"] == shard and r["split"] == "train", r
        assert f"in closed shard {shard}" in r["reason"] and why in r["reason"]
    assert rows[UIDS[1]]["status"] == "ok" and rows[UIDS[1]]["reason"] == ""


def test_missing_render_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make render"):
        pack(_cfg(tmp_path))


def test_index_rows_describe_the_tars_on_disk(tmp_path):
    """Every index row, read back with pyarrow, against its tar read with tarfile and hashed with hashlib."""
    write_renders(tmp_path, UIDS, views=2)
    pack(_cfg(tmp_path, max_count=2, val_fraction=0.3))
    index = pq.read_table(tmp_path / "shards" / "index.parquet").to_pylist()
    on_disk = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert sorted(r["shard"] for r in index) == on_disk and len(on_disk) >= 4  # train and val shards
    for r in index:
        path = tmp_path / "shards" / r["shard"]
        with tarfile.open(path) as t:
            members = t.getmembers()
            keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
            metas = {m.name.split(".", 1)[0]: json.loads(t.extractfile(m).read())
                     for m in members if m.name.endswith(".meta.json")}
        assert r["uids"] == keys and r["count"] == len(keys) <= 2, r["shard"]
        assert r["bytes"] == path.stat().st_size and r["sha256"] == _sha(path)
        assert r["shard"].startswith(r["split"] + "-")
        assert all(split_of(u, 0.3) == r["split"] for u in keys)
        assert r["licenses"] == [metas[u]["license"] for u in keys]
        assert r["attributions"] == [metas[u]["attribution"] for u in keys]
    packed = [u for r in index for u in r["uids"]]
    assert sorted(packed) == UIDS and len(packed) == len(set(packed))  # each ok asset in exactly one shard
    rows = {r["uid"]: r for r in manifest.read_rows(manifest.manifest_path(tmp_path, "shards"))}
    assert {u: rows[u]["shard"] for u in UIDS} == {u: r["shard"] for r in index for u in r["uids"]}


def test_cli_help_and_run(tmp_path):
    root = Path(__file__).resolve().parents[2]
    h = subprocess.run([sys.executable, "-m", "pipelines.shards", "--help"], cwd=root, capture_output=True, text=True)
    assert h.returncode == 0 and "shards" in h.stdout
    write_renders(tmp_path, UIDS[:2], views=2)
    r = subprocess.run([sys.executable, "-m", "pipelines.shards", "--out", str(tmp_path), "shards.val_fraction=0"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shards" / "train-000000.tar").is_file() and (tmp_path / "configs" / "shards.yaml").is_file()


def test_process_writers_give_the_same_bytes_and_several_writers_need_a_parallel_executor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_renders(a, UIDS, views=2)
    shutil.copytree(a, b)
    pack(_cfg(a, max_count=2), executor="local")
    with pytest.raises(ValueError, match="shards.writers=2 needs shards.executor=process or ray"):
        pack(_cfg(b, max_count=2, writers=2), executor="local")
    pack(_cfg(b, max_count=2, writers=2), executor="process")
    ia, ib = read_index(a), read_index(b)
    assert len(ia) == 5 and [(r["shard"], r["sha256"]) for r in ia] == [(r["shard"], r["sha256"]) for r in ib]
    for r in ia:
        assert (a / "shards" / r["shard"]).read_bytes() == (b / "shards" / r["shard"]).read_bytes()


@pytest.mark.ray
def test_ray_writers_give_the_same_bytes_as_one_local_writer(tmp_path):
    ray = pytest.importorskip("ray")
    a, b = tmp_path / "a", tmp_path / "b"
    write_renders(a, UIDS, views=2)
    shutil.copytree(a, b)
    pack(_cfg(a, max_count=2), executor="local")
    if ray.is_initialized():  # another test module's Ray instance: start a clean one for this test
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pack(_cfg(b, max_count=2, writers=2), executor="ray")
    finally:
        ray.shutdown()
    assert [(r["shard"], r["sha256"]) for r in read_index(a)] == [(r["shard"], r["sha256"]) for r in read_index(b)]


@pytest.mark.parametrize("damage", ["truncated", "no_end_blocks", "foreign", "other_bytes"])
def test_a_shard_file_the_index_does_not_list_is_adopted_only_if_it_is_exactly_ours(tmp_path, damage):
    """After a crash between a shard's rename and the index write, a rerun adopts the file only if it is byte
    for byte the shard of its samples: a truncated one (mid-member, or just its end blocks cut), a foreign
    tar, or one whose members differ from the render folders is removed and written again; the result is
    the same bytes as a clean pack elsewhere."""
    write_renders(tmp_path / "a", UIDS[:4], views=2)
    write_renders(tmp_path / "b", UIDS[:4], views=2)
    pack(_cfg(tmp_path / "b", max_count=2))  # the reference, never damaged
    cfg = _cfg(tmp_path / "a", max_count=2)
    pack(cfg)
    shards = tmp_path / "a" / "shards"
    (shards / "index.parquet").unlink()
    victim = shards / "train-000001.tar"
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "no_end_blocks":
        end = len(data.rstrip(b"\0"))
        victim.write_bytes(data[: -(-end // 512) * 512])  # every member complete, the zero blocks gone
        with tarfile.open(victim) as t:  # tarfile still lists every member: what adoption used to trust
            assert len(t.getmembers()) == len(tarfile.open(tmp_path / "b" / "shards" / victim.name).getmembers())
    elif damage == "foreign":
        with tarfile.open(victim, "w") as t:
            t.add(tmp_path / "a" / "renders" / UIDS[0] / "meta.json", arcname=f"{UIDS[2]}.meta.json")
    else:
        folder = tmp_path / "a" / "renders" / UIDS[2]
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "attribution": "changed after packing"}))
        (tmp_path / "b" / "renders" / UIDS[2] / "meta.json").write_text((folder / "meta.json").read_text())
        shutil.rmtree(tmp_path / "b" / "shards")
        pack(_cfg(tmp_path / "b", max_count=2))
    with pytest.warns(UserWarning, match="is not adopted"):
        s = pack(cfg)
    assert victim.name in s["written"] and "train-000000.tar" not in s["written"]  # the intact one was adopted
    ia, ib = read_index(tmp_path / "a"), read_index(tmp_path / "b")
    assert [(r["shard"], r["uids"], r["sha256"]) for r in ia] == [(r["shard"], r["uids"], r["sha256"]) for r in ib]
    for r in ia:
        assert _sha(shards / r["shard"]) == r["sha256"]
