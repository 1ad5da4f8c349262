"""The real `objaverse` package functions on a cache this test builds in the package's own layout
(object-paths.json.gz, metadata shards, lvis annotations, glbs), with a local HTTP server standing in for
Hugging Face: filters' decisions and reasons, downloads, and every bad input (corrupt annotation files,
no network, unknown uid, truncated download, hanging download)."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import objaverse
import pyarrow.parquet as pq
import pytest

from pipelines.data import main as data_main
from pipelines.procedural.basic import make_procedural_asset
from pipelines.sources import objaverse as src


def annotation(uid: str, size: int, **kw) -> dict:
    a = {"uid": uid, "name": f"object {uid[:6]}", "license": "by", "faceCount": 500, "vertexCount": 300,
         "animationCount": 0, "isAgeRestricted": False, "tags": [], "categories": [],
         "archives": {"glb": {"size": size, "textureCount": 1, "type": "glb"}},
         "user": {"displayName": "Maker", "username": "maker"}, "viewerUrl": f"https://sketchfab.com/3d-models/{uid}"}
    a.update(kw)
    return a


def gz_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(data).encode()))


U = {k: f"{i:032x}" for i, k in enumerate(["cached", "remote", "truncated", "hang", "nocc", "few", "lvisdog",
                                           "corruptshard"], start=1)}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """(versioned cache folder, mirror folder, server base URL) with the layout objaverse 0.1.7 uses."""
    mirror = tmp_path / "mirror"
    glbs = {}
    for i, name in enumerate(["cached", "remote", "truncated", "hang", "nocc", "few", "lvisdog"]):
        p = mirror / "glbs" / "000-001" / f"{U[name]}.glb"
        glbs[name] = make_procedural_asset(i, p, 16)["bytes"]
    paths = {u: f"glbs/{'000-002' if k == 'corruptshard' else '000-001'}/{u}.glb" for k, u in U.items()}
    gz_json(mirror / "object-paths.json.gz", paths)
    shard = {U[k]: annotation(U[k], glbs[k]) for k in glbs}
    shard[U["nocc"]]["license"] = "by-nc"
    shard[U["few"]]["faceCount"] = 10
    gz_json(mirror / "metadata" / "000-001.json.gz", shard)
    gz_json(mirror / "lvis-annotations.json.gz", {"chair": [U["cached"], U["remote"]], "dog": [U["lvisdog"]]})
    # the server's copy of "truncated" is cut short; "hang" never answers in time
    data = (mirror / "glbs/000-001" / f"{U['truncated']}.glb").read_bytes()
    (mirror / "glbs/000-001" / f"{U['truncated']}.glb").write_bytes(data[: len(data) // 2])
    # the local cache: object paths and metadata truncated mid-file (what urlretrieve leaves when cut off)
    cache = tmp_path / "cache"
    ver = cache / "hf-objaverse-v1"
    good = (mirror / "object-paths.json.gz").read_bytes()
    (ver).mkdir(parents=True)
    (ver / "object-paths.json.gz").write_bytes(good[: len(good) // 2])
    meta = (mirror / "metadata" / "000-001.json.gz").read_bytes()
    (ver / "metadata").mkdir()
    (ver / "metadata" / "000-001.json.gz").write_bytes(meta[:-20])
    (ver / "metadata" / "000-002.json.gz").write_bytes(b"\x1f\x8bnot really gzip")  # and not on the server
    (ver / "glbs" / "000-001").mkdir(parents=True)
    (ver / "glbs" / "000-001" / f"{U['cached']}.glb").write_bytes(
        (mirror / "glbs/000-001" / f"{U['cached']}.glb").read_bytes())

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if U["hang"] in self.path:
                time.sleep(4)  # longer than the test's per-file timeout
            return super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # the package and our source set module/global state: restore it after the test
    monkeypatch.setattr(objaverse, "BASE_PATH", objaverse.BASE_PATH)
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", objaverse._VERSIONED_PATH)
    old_timeout = socket.getdefaulttimeout()
    yield ver, mirror, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    socket.setdefaulttimeout(old_timeout)
    urllib.request.install_opener(None)


def run(out: Path, cache: Path, mirror_url: str, *extra: str) -> int:
    """`make data` on objaverse, offline; the global urllib opener the source installs is removed after it."""
    try:
        return data_main(["--source", "objaverse", "--out", str(out), "data.executor=local", "data.max_assets=0",
                          f"data.objaverse_cache={cache}", f"data.objaverse_mirror={mirror_url}",
                          "data.download_timeout_s=1", "data.download_retries=2", "data.deny_tags=[]",
                          "data.licenses=[by, cc0]", *extra])
    finally:
        urllib.request.install_opener(None)


def table(out: Path, stage: str) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(out / "manifest" / f"{stage}.parquet").to_pylist()}


def test_objaverse_filter_download_and_bad_inputs(world, tmp_path):
    ver, mirror, url = world
    out = tmp_path / "out"
    rc = run(out, ver.parent, url)
    assert rc == 3
    # the truncated annotation files were moved aside and fetched again; the package then read them
    assert (ver / "object-paths.json.gz.corrupt").exists() and (ver / "metadata/000-001.json.gz.corrupt").exists()
    assert objaverse._VERSIONED_PATH == str(ver)
    assert set(objaverse.load_uids()) == set(U.values())  # the real function reads the repaired file
    f = table(out, "filter")
    assert f[U["nocc"]]["status"] == "skipped" and f[U["nocc"]]["reason"] == "license 'by-nc' not in the allow-list"
    assert f[U["few"]]["reason"] == "face count 10 < min_faces 100"
    bad = f[U["corruptshard"]]
    assert bad["status"] == "failed" and "corrupt annotation file 000-002.json.gz" in bad["reason"]
    assert "cannot fetch metadata/000-002.json.gz" in bad["reason"]  # the server has no such shard (HTTP 404)
    assert f[U["cached"]]["attribution"] == f"Maker (https://sketchfab.com/3d-models/{U['cached']})"
    d = table(out, "download")
    assert set(d) == {U[k] for k in ["cached", "remote", "truncated", "hang", "lvisdog"]}
    for k in ["cached", "remote", "lvisdog"]:
        r = d[U[k]]
        assert r["status"] == "ok" and r["license"] == "by" and r["format"] == "glb"
        assert Path(r["path"]).read_bytes() == (mirror / "glbs/000-001" / f"{U[k]}.glb").read_bytes()
    assert (ver / "glbs/000-001" / f"{U['remote']}.glb").exists()  # downloaded by load_objects into its cache
    t = d[U["truncated"]]
    assert t["status"] == "failed" and "!= " in t["reason"] and "in the annotation" in t["reason"]
    assert "after 2 attempts" in t["reason"]
    assert not (ver / "glbs/000-001" / f"{U['truncated']}.glb").exists()  # not left for the package to reuse
    h = d[U["hang"]]
    assert h["status"] == "failed" and "timed out" in h["reason"]


def test_lvis_allowlist_and_unknown_uid(world, tmp_path):
    ver, _, url = world
    allow = tmp_path / "allow.txt"
    allow.write_text("\n".join([U["cached"], U["lvisdog"], U["remote"], "f" * 32]) + "\n")
    out = tmp_path / "out"
    rc = run(out, ver.parent, url, "data.lvis_categories=[dog]", f"data.uid_allowlist={allow}")
    f = table(out, "filter")
    assert set(f) == {U["cached"], U["lvisdog"], U["remote"], "f" * 32}
    assert f["f" * 32]["status"] == "failed" and f["f" * 32]["reason"].startswith("unknown uid")
    assert f[U["cached"]]["reason"] == "not in the selected LVIS categories"
    assert f[U["lvisdog"]]["status"] == "ok" and f[U["lvisdog"]]["lvis_category"] == "dog"
    assert rc == 3 and [r["status"] for r in table(out, "download").values()] == ["ok"]


def test_no_network_is_a_failed_row(tmp_path, monkeypatch):
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", objaverse._VERSIONED_PATH)
    monkeypatch.setattr(objaverse, "BASE_PATH", objaverse.BASE_PATH)
    with socket.socket() as s:  # a port nobody listens on: connection refused, as without network
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "out"
    rc = run(out, tmp_path / "empty-cache", dead)
    f = table(out, "filter")
    assert rc == 3 and list(f) == ["object-paths.json.gz"]
    assert f["object-paths.json.gz"]["status"] == "failed"
    assert "cannot fetch object-paths.json.gz: URLError" in f["object-paths.json.gz"]["reason"]
    assert not (tmp_path / "empty-cache/hf-objaverse-v1/object-paths.json.gz").exists()  # nothing half-written


def test_mirror_rewrites_only_dataset_urls():
    h = src._MirrorHandler("http://mirror.local/objaverse/")
    r = h.https_request(urllib.request.Request(f"{src.HF_BASE}/glbs/000-001/x.glb"))
    assert r.full_url == "http://mirror.local/objaverse/glbs/000-001/x.glb" and r.type == "http"
    other = h.https_request(urllib.request.Request("https://example.org/a"))
    assert other.full_url == "https://example.org/a"


# ----------------------------------------------------------------------------------------------------------
# Annotations are data: crafted uids, object paths and files become failed rows; nothing outside is touched
# ----------------------------------------------------------------------------------------------------------


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_crafted_uids_and_object_paths_are_failed_rows(tmp_path):
    """uids with `../` or absolute, object paths that are absolute (an existing host file), climb out, lack a
    `/`, or are not strings: failed rows with the reason, before any file is touched, in the filter table;
    the host files keep their bytes; nothing is created outside OUT and the cache."""
    host = tmp_path / "host"
    victim = host / "victim.glb"
    victim.parent.mkdir()
    victim.write_bytes(b"not a glb: this file must survive")
    good = f"{99:032x}"
    mirror = tmp_path / "mirror"
    size = make_procedural_asset(0, mirror / "glbs" / "000-001" / f"{good}.glb", 16)["bytes"]
    evil = {"../../host/evil": "glbs/000-001/x.glb", str(host / "abs"): "glbs/000-001/y.glb",
            f"{1:032x}": str(victim), f"{2:032x}": "glbs/000-001/../../../host/victim.glb", f"{3:032x}": "noslash",
            f"{4:032x}": ["glbs", "000-001"], f"{5:032x}": f"glbs/000-001/{6:032x}.glb", good: f"glbs/000-001/{good}.glb",
            f"{7:032x}\n": f"glbs/000-001/{7:032x}.glb", f"{8:032x}": f"glbs/000-001/{8:032x}.glb\n",
            f"{9:032x}": f"glbs/\u0660\u0660\u0660-\u0660\u0660\u0661/{9:032x}.glb"}  # $ and \\d would pass these
    gz_json(mirror / "object-paths.json.gz", evil)
    gz_json(mirror / "metadata" / "000-001.json.gz", {u: annotation(u, size) for u in evil if isinstance(u, str)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = _tree_state(tmp_path)
    try:
        out = tmp_path / "out"
        rc = run(out, tmp_path / "cache", f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert rc == 3
    f = table(out, "filter")
    assert f[good]["status"] == "ok" and table(out, "download")[good]["status"] == "ok"
    for u in evil:
        if u == good:
            continue
        assert f[u]["status"] == "failed", (u, f[u])
        assert "not an Objaverse uid" in f[u]["reason"] or "is not glbs/NNN-NNN/" in f[u]["reason"], f[u]
    assert victim.read_bytes() == b"not a glb: this file must survive"
    after = _tree_state(tmp_path)
    created = {p for p in after if p not in before and not p.startswith((str(out), str(tmp_path / "cache")))}
    assert created == set() and all(after[p] == before[p] for p in before if not p.startswith(str(out)))


def test_fetch_refuses_a_crafted_locator_before_touching_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", objaverse._VERSIONED_PATH)
    monkeypatch.setattr(objaverse, "BASE_PATH", objaverse.BASE_PATH)
    victim = tmp_path / "victim.glb"
    victim.write_bytes(b"keep me")
    calls = []
    monkeypatch.setattr(objaverse, "load_objects", lambda *a, **k: calls.append(a) or {})
    for uid, locator in ((f"{1:032x}", str(victim)), ("../x", "glbs/000-001/../x.glb"), (f"{1:032x}", "")):
        with pytest.raises(src.VerifyError, match="not an Objaverse uid|is not glbs/NNN-NNN/"):
            src.fetch({"uid": uid, "locator": locator}, str(tmp_path / "assets"), cache=str(tmp_path / "cache"))
    assert calls == [] and victim.read_bytes() == b"keep me" and not (tmp_path / "assets").exists()


@pytest.mark.parametrize("content", [["a", "list"], "a string", {f"{1:032x}": 5}])
def test_malformed_object_paths_file_is_a_failed_row(tmp_path, content):
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    gz_json(cache / "object-paths.json.gz", content)
    gz_json(cache / "metadata" / "000-001.json.gz", ["not", "an", "object"])
    out = tmp_path / "out"
    rc = run(out, cache.parent, "http://127.0.0.1:9")
    assert rc == 3
    rows = list(table(out, "filter").values())
    assert rows and all(r["status"] == "failed" and r["reason"] for r in rows), rows


def test_metadata_that_is_not_objects_fails_its_uids(tmp_path):
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    a, b = f"{1:032x}", f"{2:032x}"
    gz_json(cache / "object-paths.json.gz", {a: f"glbs/000-001/{a}.glb", b: f"glbs/000-002/{b}.glb"})
    gz_json(cache / "metadata" / "000-001.json.gz", {a: "a string, not an annotation"})
    gz_json(cache / "metadata" / "000-002.json.gz", [b])
    out = tmp_path / "out"
    assert run(out, cache.parent, "http://127.0.0.1:9") == 3
    f = table(out, "filter")
    assert f[a]["status"] == "failed" and "annotation is a str" in f[a]["reason"]
    assert f[b]["status"] == "failed" and "not an object of uid -> annotation" in f[b]["reason"]


def test_annotation_bomb_is_refused_while_decompressing(tmp_path):
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    cache.mkdir(parents=True)
    bomb = gzip.compress(b'{"' + b"a" * (50 << 20) + b'": 1}', compresslevel=9)  # 50 MB from ~50 kB
    assert len(bomb) < 1 << 20
    (cache / "object-paths.json.gz").write_bytes(bomb)
    with pytest.raises(src.AnnotationError, match="decompresses to more than 1048576 bytes"):
        src.read_json_gz(cache / "object-paths.json.gz", max_bytes=1 << 20)
    out = tmp_path / "out"
    assert run(out, cache.parent, "http://127.0.0.1:9", "data.max_annotation_bytes=1048576") == 3
    (row,) = table(out, "filter").values()
    assert row["status"] == "failed" and "decompresses to more than" in row["reason"]


def test_download_does_not_read_annotation_files_a_worker_may_find_truncated(world, tmp_path):
    """On a node-local cache another (killed or concurrent) worker may leave object-paths.json.gz cut short
    while downloads run: the download step never reads it (the package's lookup is answered from the
    checked locator), so the download succeeds instead of failing with EOFError."""
    ver, mirror, url = world
    out = tmp_path / "out"
    run(out, ver.parent, url)
    full = (ver / "object-paths.json.gz").read_bytes()
    (ver / "object-paths.json.gz").write_bytes(full[: len(full) // 2])  # what a cut-off urlretrieve leaves
    uid = U["remote"]
    (ver / "glbs/000-001" / f"{uid}.glb").unlink()
    item = {"uid": uid, "locator": f"glbs/000-001/{uid}.glb", "archive_bytes": None}
    row = src.fetch(item, str(tmp_path / "assets2"), cache=str(ver.parent), mirror=url, retries=1, timeout_s=5)
    assert row["status"] == "ok" and Path(row["path"]).read_bytes() == (mirror / "glbs/000-001" / f"{uid}.glb").read_bytes()


def test_annotations_of_the_wrong_types_are_failed_rows(tmp_path):
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    bad = {"faceCount": "many", "tags": 5, "name": {"x": 1}, "archives": [1], "user": "bob",
           "categories": [3], "license": 3, "isAgeRestricted": "yes", "animationCount": 10**30}
    uids = {f"{i + 1:032x}": {k: v} for i, (k, v) in enumerate(bad.items())}
    uids[f"{99:032x}"] = annotation(f"{99:032x}", 10)
    gz_json(cache / "object-paths.json.gz", {u: f"glbs/000-001/{u}.glb" for u in uids})
    gz_json(cache / "metadata" / "000-001.json.gz", uids)
    out = tmp_path / "out"
    assert run(out, cache.parent, "http://127.0.0.1:9") == 3
    f = table(out, "filter")
    for u, a in uids.items():
        if u == f"{99:032x}":
            assert f[u]["status"] == "ok", f[u]
        else:
            assert f[u]["status"] == "failed" and f"field {next(iter(a))}" in f[u]["reason"], (a, f[u])
