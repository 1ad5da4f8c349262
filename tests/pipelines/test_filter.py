"""Vectorised filters: each criterion's decision and reason on crafted annotations, first failure wins,
null passes, the max_assets sample is deterministic, and a random table agrees with a per-row reference."""

from __future__ import annotations

import random

import pytest

from core.config import DataConfig
from core.layout import read_uid_list
from pipelines.filter import annotations_to_table, candidate_table, filter_table


def ann(uid, **kw):
    """A Sketchfab-style annotation that passes the default filters unless `kw` changes it."""
    a = {"uid": uid, "name": f"thing {uid}", "license": "by", "faceCount": 1000, "animationCount": 0,
         "isAgeRestricted": False, "archives": {"glb": {"size": 5000, "textureCount": 2}},
         "tags": [{"name": "chair", "slug": "chair"}], "categories": [{"name": "Furniture & Home"}],
         "user": {"displayName": "Ada", "username": "ada"}, "viewerUrl": f"https://sketchfab.com/3d-models/{uid}"}
    a.update(kw)
    return a


CFG = DataConfig(max_assets=0, licenses=["by", "cc0"], min_faces=100, max_faces=10_000, min_textures=1,
                 max_archive_bytes=10_000, deny_categories=["weapons-military"], deny_tags=["scan"],
                 deny_names=["test"])

CASES = {  # uid -> (annotation overrides, expected reason)
    "ok1": ({}, ""),
    "lic": ({"license": "by-nc"}, "license 'by-nc' not in the allow-list"),
    "few": ({"faceCount": 12}, "face count 12 < min_faces 100"),
    "many": ({"faceCount": 20_000}, "face count 20000 > max_faces 10000"),
    "anim": ({"animationCount": 3}, "animated (3 animations)"),
    "notex": ({"archives": {"glb": {"size": 5000, "textureCount": 0}}}, "texture count 0 < min_textures 1"),
    "big": ({"archives": {"glb": {"size": 50_000, "textureCount": 1}}}, "archive 50000 bytes > max_archive_bytes 10000"),
    "age": ({"isAgeRestricted": True}, "age-restricted"),
    "cat": ({"categories": [{"name": "Weapons & Military", "slug": "weapons-military"}]}, "category in deny-list"),
    "tag": ({"tags": [{"name": "Scan", "slug": "scan"}, {"name": "x", "slug": "x"}]}, "tag in deny-list"),
    "name": ({"name": "My TEST object"}, "name matches the deny-list"),
    # several failures: the first criterion in order is the reason
    "multi": ({"license": "by-nd", "faceCount": 1, "animationCount": 1}, "license 'by-nd' not in the allow-list"),
    "multi2": ({"faceCount": 1, "isAgeRestricted": True, "tags": [{"slug": "scan"}]}, "face count 1 < min_faces 100"),
}


def decided(table):
    return {r["uid"]: (r["status"], r["reason"]) for r in table.select(["uid", "status", "reason"]).to_pylist()}


def test_each_criterion_and_first_failure_wins():
    annotations = {u: ann(u, **kw) for u, (kw, _) in CASES.items()}
    out = decided(filter_table(annotations_to_table(annotations), CFG))
    for uid, (_, reason) in CASES.items():
        assert out[uid] == (("ok", "") if not reason else ("skipped", reason)), uid


def test_license_and_attribution_travel_with_the_row():
    t = filter_table(annotations_to_table({"a": ann("a")}), CFG).to_pylist()[0]
    assert t["license"] == "by" and t["attribution"] == "Ada (https://sketchfab.com/3d-models/a)"
    assert t["categories"] == ["furniture & home"] and t["tags"] == ["chair"]


def test_uid_lists_lvis_and_switches(tmp_path):
    annotations = {u: ann(u) for u in "abcde"}
    lvis = {"a": "chair", "b": "chair", "c": "dog"}
    cfg = DataConfig(max_assets=0, lvis_categories=["chair"], deny_tags=[])
    out = decided(filter_table(annotations_to_table(annotations, lvis), cfg, allow={"a", "b", "c", "d"}, deny={"b"}))
    assert out == {"a": ("ok", ""), "b": ("skipped", "in uid deny-list"),
                   "c": ("skipped", "not in the selected LVIS categories"),
                   "d": ("skipped", "not in the selected LVIS categories"), "e": ("skipped", "not in uid allow-list")}
    # switching a criterion off lets its rows through
    anim = {"x": ann("x", animationCount=2, isAgeRestricted=True)}
    loose = DataConfig(max_assets=0, allow_animation=True, allow_age_restricted=True, deny_tags=[])
    assert decided(filter_table(annotations_to_table(anim), loose)) == {"x": ("ok", "")}
    lst = tmp_path / "uids.txt"
    lst.write_text("# published list\nabc.glb\n\n def  # trailing comment\n")
    assert read_uid_list(str(lst)) == {"abc", "def"}
    with pytest.raises(FileNotFoundError, match="uid list not found"):
        read_uid_list(str(tmp_path / "missing.txt"))


def test_nulls_pass():
    # local files know no face count, textures or license: those criteria do not drop them
    t = candidate_table([{"uid": "f", "source": "local", "license": None}])
    assert decided(filter_table(t, DataConfig(max_assets=0))) == {"f": ("ok", "")}


def test_max_assets_sample_is_deterministic_and_among_passing():
    annotations = {f"u{i:03d}": ann(f"u{i:03d}", faceCount=(10 if i % 3 == 0 else 1000)) for i in range(60)}
    cfg = DataConfig(max_assets=7, deny_tags=[])
    a = decided(filter_table(annotations_to_table(annotations), cfg, seed=1))
    # the input order must not matter, only the set of uids and the seed
    shuffled = dict(random.Random(0).sample(sorted(annotations.items()), len(annotations)))
    b = decided(filter_table(annotations_to_table(shuffled), cfg, seed=1))
    assert a == b
    kept = [u for u, (s, _) in a.items() if s == "ok"]
    assert len(kept) == 7 and all(int(u[1:]) % 3 != 0 for u in kept)
    assert sum(r == "not sampled (max_assets=7)" for _, r in a.values()) == 40 - 7
    c = decided(filter_table(annotations_to_table(annotations), cfg, seed=2))
    assert {u for u, (s, _) in c.items() if s == "ok"} != set(kept)


def reference(a: dict, cfg: DataConfig) -> str:
    """Per-row reference written from the criteria list, independent of the pyarrow code."""
    glb = a["archives"]["glb"]
    tags = {t.get("slug") or t.get("name") for t in a["tags"]}
    cats = {c.get("slug") or c.get("name").lower() for c in a["categories"]}
    if a["license"] not in cfg.licenses:
        return f"license '{a['license']}' not in the allow-list"
    if a["faceCount"] < cfg.min_faces:
        return f"face count {a['faceCount']} < min_faces {cfg.min_faces}"
    if a["faceCount"] > cfg.max_faces:
        return f"face count {a['faceCount']} > max_faces {cfg.max_faces}"
    if a["animationCount"] > 0:
        return f"animated ({a['animationCount']} animations)"
    if glb["textureCount"] < cfg.min_textures:
        return f"texture count {glb['textureCount']} < min_textures {cfg.min_textures}"
    if glb["size"] > cfg.max_archive_bytes:
        return f"archive {glb['size']} bytes > max_archive_bytes {cfg.max_archive_bytes}"
    if a["isAgeRestricted"]:
        return "age-restricted"
    if cats & set(cfg.deny_categories):
        return "category in deny-list"
    if tags & set(cfg.deny_tags):
        return "tag in deny-list"
    if any(s.lower() in a["name"].lower() for s in cfg.deny_names):
        return "name matches the deny-list"
    return ""


def test_random_table_agrees_with_per_row_reference():
    rng = random.Random(7)
    annotations = {}
    for i in range(3000):
        annotations[f"r{i}"] = ann(
            f"r{i}", license=rng.choice(["by", "cc0", "by-nc", "by-sa"]), faceCount=rng.choice([5, 500, 50_000]),
            animationCount=rng.choice([0, 0, 0, 2]), isAgeRestricted=rng.random() < 0.05,
            name=rng.choice(["chair", "a test", "Tree"]),
            archives={"glb": {"size": rng.choice([100, 20_000]), "textureCount": rng.choice([0, 1, 3])}},
            tags=[{"slug": s} for s in rng.sample(["scan", "car", "tree", "lowpoly"], rng.randint(0, 2))],
            categories=[{"name": c} for c in rng.sample(["weapons-military", "cars"], rng.randint(0, 1))])
    out = decided(filter_table(annotations_to_table(annotations), CFG))
    mismatches = [u for u, a in annotations.items() if out[u][1] != reference(a, CFG)]
    assert not mismatches, mismatches[:5]
    assert 0 < sum(s == "ok" for s, _ in out.values()) < len(out)


def test_arrow_conversion_reads_odd_annotations_like_python_does(monkeypatch):
    """`annotations_to_table` converts chunks of dicts with pyarrow (a struct array); what it reads must be
    what Python's `a.get(k) or default` reading gives, for missing / None / empty values, and a chunk pyarrow
    cannot convert (tags as plain strings) must go down the per-row path with the same result."""
    import pipelines.filter as F

    odd = {
        "none": None,
        "empty": {},
        "blank": {"user": {"displayName": "", "username": "bo"}, "viewerUrl": "", "uri": "https://x/u",
                  "tags": [None, {"slug": "", "name": "Foo"}, {"name": "BAR"}], "archives": {"glb": None},
                  "categories": None, "faceCount": 7},
        "plain": {"tags": ["Plain", {"slug": "S"}], "license": "cc0"},
    }
    expected = {  # uid -> (name, license, face_count, attribution, tags, categories, texture_count, archive_bytes)
        "none": (None, None, None, "unknown ()", [], [], None, None),
        "empty": (None, None, None, "unknown ()", [], [], None, None),
        "blank": (None, None, 7, "bo (https://x/u)", ["foo", "bar"], [], None, None),
        "plain": (None, "cc0", None, "unknown ()", ["plain", "s"], [], None, None),
    }
    per_row = []
    real = F._annotations_to_table_py
    monkeypatch.setattr(F, "_annotations_to_table_py", lambda a, lv: per_row.append(list(a)) or real(a, lv))
    monkeypatch.setattr(F, "CHUNK_ROWS", 2)  # ["none", "empty"] converts with pyarrow, ["blank", "plain"] cannot
    rows = {r["uid"]: r for r in annotations_to_table(odd).to_pylist()}
    assert per_row == [["blank", "plain"]]
    keys = ("name", "license", "face_count", "attribution", "tags", "categories", "texture_count", "archive_bytes")
    for uid, want in expected.items():
        assert tuple(rows[uid][k] for k in keys) == want, uid
    # the same chunk without the plain-string tags converts with pyarrow and reads the same values
    per_row.clear()
    del odd["plain"]
    rows = {r["uid"]: r for r in annotations_to_table(odd).to_pylist()}
    assert per_row == [] and tuple(rows["blank"][k] for k in keys) == expected["blank"]
