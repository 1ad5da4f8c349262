"""pipelines/card.py: the dataset card and attribution of `make shards`, checked against the run's manifests.

A run with mixed licences is built by hand (Objaverse-style annotations through the real filter, a download
table, fake render folders with meta.json, the real packer); the card's numbers are compared with counts
taken from what the test itself put there, and ATTRIBUTION.csv with the shard index read by `tarfile`.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter

import yaml

from core import manifest
from core.config import Config, DataConfig, save_config
from core.layout import read_index
from pipelines.card import criterion_of, license_of, size_category
from pipelines.data import FILTER_SCHEMA
from pipelines.download import DOWNLOAD_SCHEMA
from pipelines.filter import CRITERIA, annotations_to_table, filter_table
from pipelines.shards import main as shards_main
from tests.fake_renders import write_renders

# uid -> licence of the assets that get through the filter and are rendered
PACKED = {"by1": "by", "by2": "by", "nd1": "by-nd", "ncnd": "by-nc-nd", "ncsa": "by-nc-sa", "zero": "cc0"}


def _ann(uid: str, **kw) -> dict:
    a = {"name": f"thing {uid}", "license": "by", "faceCount": 1000, "animationCount": 0, "isAgeRestricted": False,
         "archives": {"glb": {"size": 5000, "textureCount": 2}}, "tags": [], "categories": [],
         "user": {"displayName": f"Author {uid}", "username": uid}, "viewerUrl": f"https://sketchfab.com/3d-models/{uid}"}
    a.update(kw)
    return a


def _run(tmp_path) -> tuple[Config, dict]:
    """A run of data -> render -> shards with mixed licences; returns the config and what was dropped where."""
    cfg = Config(out=str(tmp_path), source="objaverse")
    cfg.data = DataConfig(max_assets=0, licenses=["by", "by-nd", "by-nc-nd", "by-nc-sa", "cc0"], min_faces=100,
                          deny_tags=["scan"])
    cfg.shards.val_fraction = 0.0
    annotations = {u: _ann(u, license=lic) for u, lic in PACKED.items()}
    annotations |= {"dlfail": _ann("dlfail"), "rfail": _ann("rfail"), "lowq": _ann("lowq"),
                    "few1": _ann("few1", faceCount=10), "few2": _ann("few2", faceCount=50),
                    "ncby": _ann("ncby", license="by-nc"), "scan": _ann("scan", tags=[{"slug": "scan"}])}
    filtered = filter_table(annotations_to_table(annotations), cfg.data).to_pylist()
    manifest.write_rows(manifest.manifest_path(tmp_path, "filter"), filtered, schema=FILTER_SCHEMA)
    kept = [r for r in filtered if r["status"] == "ok"]
    dl = [{**{k: r.get(k) for k in DOWNLOAD_SCHEMA.names}, "status": "ok", "reason": ""} for r in kept]
    for r in dl:
        if r["uid"] == "dlfail":
            r.update(status="failed", reason="download failed: HTTPError: 404")
    manifest.write_rows(manifest.manifest_path(tmp_path, "download"), dl, schema=DOWNLOAD_SCHEMA)
    save_config(cfg, tmp_path / "configs" / "data.yaml")
    write_renders(tmp_path, [], failed=("rfail",), views=2)
    write_renders(tmp_path, ["lowq"], views=2, ok=False)
    for uid, lic in PACKED.items():
        write_renders(tmp_path, [uid], views=2, license=lic)
        meta_p = tmp_path / "renders" / uid / "meta.json"
        meta = json.loads(meta_p.read_text())
        if uid != "zero":  # "zero" stands for a render folder written before author/source_url existed
            meta |= {"name": f"thing {uid}", "author": f"Author {uid}",
                     "source_url": f"https://sketchfab.com/3d-models/{uid}", "source": "objaverse"}
        meta_p.write_text(json.dumps(meta))
    assert shards_main(["--out", str(tmp_path), "--source", "objaverse", "shards.val_fraction=0.5"]) == 0
    return cfg, {"min faces": 2, "license": 1, "tag": 1}


def _header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_and_attribution_add_up_against_the_manifests(tmp_path):
    _, dropped = _run(tmp_path)
    index = read_index(tmp_path)
    in_tars = {}
    for row in index:  # the uids that are really in the tars, read with tarfile
        with tarfile.open(tmp_path / "shards" / row["shard"]) as t:
            in_tars |= {m.name.split(".", 1)[0]: row["split"] for m in t}
    assert set(in_tars) == set(PACKED)

    rows = list(csv.DictReader(io.StringIO((tmp_path / "shards" / "ATTRIBUTION.csv").read_text())))
    assert sorted(r["uid"] for r in rows) == sorted(PACKED)  # every packed uid has exactly one row
    by_uid = {r["uid"]: r for r in rows}
    for uid, lic in PACKED.items():
        r = by_uid[uid]
        assert r["split"] == in_tars[uid] and r["license"] == lic
        assert r["renders_redistributable"] == ("no" if "nd" in lic else "yes")
    assert by_uid["by1"]["author"] == "Author by1" and by_uid["by1"]["source_url"] == "https://sketchfab.com/3d-models/by1"
    # an older render folder without author/source_url: the download manifest fills them in
    assert by_uid["zero"]["author"] == "Author zero" and by_uid["zero"]["source_url"].endswith("/zero")
    assert by_uid["by1"]["license_url"] == "https://creativecommons.org/licenses/by/4.0/"

    card = (tmp_path / "shards" / "README.md").read_text()
    head = _header(card)
    assert sorted(head["license"]) == sorted({"cc-by-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-4.0", "cc0-1.0"})
    assert head["task_categories"] == ["image-to-3d"] and head["size_categories"] == ["n<1K"]
    splits = {f["split"] for f in head["configs"][0]["data_files"]}
    assert splits == {"train" if s == "train" else "validation" for s in in_tars.values()}
    # counts per split add up to what is in the tars
    for split in ("train", "val"):
        assert f"| **{split}** | | | **{sum(s == split for s in in_tars.values())}** |" in card
    per_licence = Counter(PACKED.values())
    for lic, n in per_licence.items():
        assert f"(`{lic}`) | {n} |" in card
    # the NoDerivatives assets are flagged by uid
    assert "Do not publish these shards as they are: 2 assets under a NoDerivatives licence" in card
    assert "`nd1`" in card and "`ncnd`" in card
    assert "- 2 assets NonCommercial" in card and "- 1 asset ShareAlike" in card  # ncnd + ncsa; ncsa
    # filters with their values and what each dropped (what the test put there)
    assert f"| min faces | `data.min_faces` | `100` | {dropped['min faces']} |" in card
    assert f"| license | `data.licenses` | by, by-nd, by-nc-nd, by-nc-sa, cc0 | {dropped['license']} |" in card
    assert f"| tag | `data.deny_tags` | scan | {dropped['tag']} |" in card
    assert "13 candidates from `objaverse`" in card
    # later stages: the download failure and the render failure with their reasons, the quality skip
    assert "| download | 8 | 0 | 1 | download failed: HTTPError: 404 (1) |" in card
    assert "blender crashed (1)" in card and "quality not ok: empty_views (1)" in card
    assert "| `cameras.npz` |" in card and "NN = 00 … 01" in card

    md = (tmp_path / "shards" / "ATTRIBUTION.md").read_text()
    for uid in PACKED:
        assert f"`{uid}`" in md
    assert "[CC BY-ND 4.0](https://creativecommons.org/licenses/by-nd/4.0/)" in md


def test_unknown_licences_are_flagged_not_guessed(tmp_path):
    write_renders(tmp_path, ["mine"], views=2, license="unknown")
    assert shards_main(["--out", str(tmp_path), "shards.val_fraction=0"]) == 0
    card = (tmp_path / "shards" / "README.md").read_text()
    assert _header(card)["license"] == "unknown"
    assert "No licence we know for 1 asset** (unknown)" in card
    (row,) = csv.DictReader(io.StringIO((tmp_path / "shards" / "ATTRIBUTION.csv").read_text()))
    assert row["renders_redistributable"] == "unknown" and row["license_url"] == ""


def test_every_filter_reason_names_its_criterion():
    cfg = DataConfig(max_assets=1, licenses=["by"], min_faces=100, max_faces=10_000, min_textures=1,
                     max_archive_bytes=10_000, deny_categories=["weapons"], deny_tags=["scan"], deny_names=["test"],
                     lvis_categories=["chair"])
    cases = {"uid deny-list": {}, "uid allow-list": {}, "license": {"license": "by-nc"},
             "min faces": {"faceCount": 12}, "max faces": {"faceCount": 20_000}, "animation": {"animationCount": 2},
             "textures": {"archives": {"glb": {"size": 50, "textureCount": 0}}},
             "archive size": {"archives": {"glb": {"size": 50_000, "textureCount": 1}}},
             "age restricted": {"isAgeRestricted": True}, "category": {"categories": [{"slug": "weapons"}]},
             "tag": {"tags": [{"slug": "scan"}]}, "name": {"name": "a test thing"}, "LVIS": {}, "max_assets": {}}
    assert set(cases) == set(CRITERIA)
    uids = {c: f"u{i:02d}" for i, c in enumerate(cases)}
    annotations = {uids[c]: _ann(uids[c], **kw) for c, kw in cases.items()}
    annotations["ok2"] = _ann("ok2")
    lvis = {u: "chair" for u in annotations if u != uids["LVIS"]}
    allow = set(annotations) - {uids["uid allow-list"]}
    rows = {r["uid"]: r for r in filter_table(annotations_to_table(annotations, lvis), cfg, allow=allow,
                                              deny={uids["uid deny-list"]}).to_pylist()}
    sampled_out = [u for u in (uids["max_assets"], "ok2") if rows[u]["status"] == "skipped"]
    assert len(sampled_out) == 1  # max_assets=1 of the two that pass everything
    for criterion, uid in uids.items():
        if criterion != "max_assets":
            assert rows[uid]["status"] == "skipped" and criterion_of(rows[uid]["reason"]) == criterion, rows[uid]
    assert criterion_of(rows[sampled_out[0]]["reason"]) == "max_assets"
    assert criterion_of("") == "" and criterion_of("something new") == ""


def test_licence_names_and_size_buckets():
    assert license_of(" BY-NC-ND ").hf_id == "cc-by-nc-nd-4.0" and not license_of("by-nc-nd").derivatives
    assert license_of("cc0").hf_id == "cc0-1.0" and not license_of("cc0").attribution
    assert license_of("unknown") is None and license_of("") is None
    assert [size_category(n) for n in (0, 999, 1000, 12_345, 800_000)] == \
        ["n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M"]
