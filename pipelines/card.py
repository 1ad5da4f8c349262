"""The dataset card of the shards: OUT/shards/README.md (Hugging Face dataset-card convention) and
OUT/shards/ATTRIBUTION.{md,csv} (every packed asset: name, author, licence and source URL).

`make shards` writes them after packing (pipelines/shards.py), from what the run left on disk: the shard
index (which uid is in which shard and split), each packed asset's meta.json (name, source, licence,
author, source URL, as the render stage wrote them; the download manifest and the index fill in for render
folders written before those fields existed), the status manifests (how many assets each stage dropped
and why) and the resolved configs (the filter values, the render settings).

Licences are objaverse's short names (by, by-sa, by-nd, by-nc, by-nc-sa, by-nc-nd, cc0; GSO is by,
procedural cc0, local `data.local_license`). Renders are derivatives of the asset: a NoDerivatives licence
forbids publishing them, so those assets are flagged in the card and in the CSV; every BY licence asks for
attribution wherever renders are published, which is what ATTRIBUTION.md is for.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core import manifest
from core.config import Config, ConfigError, load_config
from core.io import atomic_write_text
from core.layout import MAX_META_BYTES, read_index, shard_dir
from pipelines.filter import CRITERIA, CRITERION_KEYS, criterion_of


@dataclass(frozen=True)
class License:
    """What a licence lets people do with renders of an asset."""

    hf_id: str  # the Hugging Face `license:` identifier
    title: str
    url: str
    derivatives: bool  # renders (derivatives) may be distributed
    commercial: bool
    share_alike: bool
    attribution: bool  # the author must be credited wherever renders are published


def _cc(kind: str, title: str) -> License:
    return License(f"cc-{kind}-4.0", f"CC {title} 4.0", f"https://creativecommons.org/licenses/{kind}/4.0/",
                   derivatives="nd" not in kind, commercial="nc" not in kind, share_alike="sa" in kind,
                   attribution=True)


LICENSES = {
    "by": _cc("by", "BY"), "by-sa": _cc("by-sa", "BY-SA"), "by-nd": _cc("by-nd", "BY-ND"),
    "by-nc": _cc("by-nc", "BY-NC"), "by-nc-sa": _cc("by-nc-sa", "BY-NC-SA"), "by-nc-nd": _cc("by-nc-nd", "BY-NC-ND"),
    "cc0": License("cc0-1.0", "CC0 1.0 (public domain)", "https://creativecommons.org/publicdomain/zero/1.0/",
                   derivatives=True, commercial=True, share_alike=False, attribution=False),
}


def license_of(short: str) -> License | None:
    """The licence behind a short name (case and surrounding space ignored); None when it is not one we know."""
    return LICENSES.get(str(short or "").strip().lower())


def redistributable(short: str) -> str:
    """May renders of an asset under `short` be published? yes | no (NoDerivatives) | unknown."""
    lic = license_of(short)
    return "unknown" if lic is None else ("yes" if lic.derivatives else "no")


# HF's size_categories buckets, by the number of samples.
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def _assets(n: int) -> str:
    return f"{n} asset{'' if n == 1 else 's'}"


def size_category(n: int) -> str:
    return next((name for limit, name in _SIZES if n < limit), "n>1B")


# ----------------------------------------------------------------------------------------------------------
# What was packed, with who made it.
# ----------------------------------------------------------------------------------------------------------

ATTRIBUTION_FIELDS = ["uid", "split", "shard", "name", "author", "license", "license_name", "license_url",
                      "source", "source_url", "attribution", "renders_redistributable"]


def _meta(folder: Path) -> dict[str, Any]:
    p = folder / "meta.json"
    try:
        if p.stat().st_size > MAX_META_BYTES:
            return {}
        m = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return m if isinstance(m, dict) else {}


def packed_assets(out: Path) -> list[dict[str, str]]:
    """One row per packed uid (ATTRIBUTION_FIELDS), in (split, uid) order, from the index + meta.json."""
    downloads = {r["uid"]: r for r in manifest.read_rows(manifest.manifest_path(out, "download"))}
    rows = []
    for shard in read_index(out):
        for i, uid in enumerate(shard["uids"]):
            meta, dl = _meta(out / "renders" / uid), downloads.get(uid, {})

            def pick(key: str, fallback: str = "", meta: dict = meta, dl: dict = dl) -> str:
                return str(meta.get(key) or dl.get(key) or fallback)

            lic_short = pick("license", shard["licenses"][i] if i < len(shard["licenses"]) else "")
            lic = license_of(lic_short)
            rows.append({
                "uid": uid, "split": shard["split"], "shard": shard["shard"], "name": pick("name"),
                "author": pick("author"), "license": lic_short,
                "license_name": lic.title if lic else f"unknown ({lic_short or 'not given'})",
                "license_url": lic.url if lic else "", "source": pick("source"), "source_url": pick("source_url"),
                "attribution": pick("attribution", shard["attributions"][i] if i < len(shard["attributions"]) else ""),
                "renders_redistributable": redistributable(lic_short),
            })
    return sorted(rows, key=lambda r: (r["split"], r["uid"]))


def attribution_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ATTRIBUTION_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _link(text: str, url: str) -> str:
    return f"[{_cell(text)}]({url})" if url else _cell(text)


def attribution_markdown(rows: list[dict[str, str]]) -> str:
    lines = ["# Attribution", "",
             f"The {len(rows)} assets rendered into these shards, with who made them and under which licence. "
             "Every CC BY licence (BY, BY-SA, BY-NC, ...) asks for this credit wherever renders of the asset are "
             "published; NoDerivatives assets may not be published as renders at all (README.md, 'Licences').",
             "", "| asset | author | licence | source | renders may be published |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        name = f"{r['name']} (`{r['uid']}`)" if r["name"] else f"`{r['uid']}`"
        lines.append(f"| {_cell(name)} | {_cell(r['author'] or r['attribution'] or 'unknown')} | "
                     f"{_link(r['license_name'], r['license_url'])} | {_link(r['source'] or 'source', r['source_url'])} | "
                     f"{r['renders_redistributable']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# What each stage dropped.
# ----------------------------------------------------------------------------------------------------------


def resolved_config(out: Path, stage: str, fallback: Config) -> tuple[Config, str]:
    """The config a stage last ran with (OUT/configs/<stage>.yaml) and where it came from."""
    path = out / "configs" / f"{stage}.yaml"
    try:
        return load_config(path), f"`configs/{stage}.yaml`"
    except (ConfigError, OSError, yaml.YAMLError):
        return fallback, f"the shards run's config (`configs/{stage}.yaml` missing or unreadable)"


def filter_drops(out: Path) -> tuple[Counter, int, int]:
    """(criterion -> skipped count, candidates, failed to list) from filter.parquet."""
    rows = manifest.read_rows(manifest.manifest_path(out, "filter"))
    drops = Counter(criterion_of(r.get("reason") or "") or "other" for r in rows if r["status"] == manifest.SKIPPED)
    return drops, len(rows), sum(r["status"] == manifest.FAILED for r in rows)


def stage_counts(out: Path) -> list[tuple[str, Counter, Counter]]:
    """[(stage, status counts, reasons of rows not ok)] for download, render and shards."""
    result = []
    for stage in ("download", "render", "shards"):
        rows = manifest.read_rows(manifest.manifest_path(out, stage))
        if rows:
            result.append((stage, Counter(r["status"] for r in rows),
                           Counter((r.get("reason") or "no reason given")[:160] for r in rows
                                   if r["status"] != manifest.OK)))
    return result


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "(none)"
    return f"`{v}`" if v not in ("", None) else "(not set)"


def _active(criterion: str, data: Any) -> bool:
    """Is the criterion in effect? An empty list, 0 or "" turns a filter off; `allow_*` true does."""
    value = getattr(data, CRITERION_KEYS[criterion][0])
    return not value if criterion in ("animation", "age restricted") else bool(value)


# ----------------------------------------------------------------------------------------------------------
# The card.
# ----------------------------------------------------------------------------------------------------------


def _sample_fields(out: Path, index: list[dict[str, Any]]) -> list[str]:
    """Member names of the first sample of the first shard (tar headers only), without the key."""
    if not index:
        return []
    first = index[0]
    names: list[str] = []
    try:
        with tarfile.open(shard_dir(out) / first["shard"], "r:") as t:
            for m in t:
                key, _, field = m.name.partition(".")
                if key != first["uids"][0]:
                    break
                names.append(field)
    except (OSError, tarfile.TarError):
        return []
    return names


def _view_fields(fields: list[str]) -> str:
    views = sorted({f.split(".", 1)[0] for f in fields if f.endswith(".png")})
    return f"{views[0]} … {views[-1]}" if views else "NN"


def card_markdown(cfg: Config, rows: list[dict[str, str]]) -> str:
    out = cfg.out_path
    index = read_index(out)
    data_cfg, data_from = resolved_config(out, "data", cfg)
    render_cfg, render_from = resolved_config(out, "render", cfg)
    n = len(rows)
    licences = Counter(r["license"] for r in rows)
    hf_ids = sorted({(license_of(s).hf_id if license_of(s) else "unknown") for s in licences})
    sources = sorted({r["source"] for r in rows if r["source"]})
    splits = {"train": "train", "val": "validation"}
    header = {
        "pretty_name": f"GTR toolkit renders ({', '.join(sources) or 'no assets'})",
        "license": hf_ids[0] if len(hf_ids) == 1 else hf_ids,
        "task_categories": ["image-to-3d"],
        "size_categories": [size_category(n)],
        "tags": ["3d", "multi-view", "webdataset", "blender", "depth", "normals", *sources],
        "configs": [{"config_name": "default", "data_files": [
            {"split": splits[s], "path": f"{s}-*.tar"} for s in ("train", "val") if any(r["split"] == s for r in index)]}],
    }
    L: list[str] = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
                    f"# {header['pretty_name']}", "",
                    f"{n} 3D assets rendered with Blender (Cycles) by the GTR toolkit and packed as WebDataset "
                    f"shards, one sample per asset: {sum(r['bytes'] for r in index) / 2**20:.1f} MiB in "
                    f"{len(index)} shards. Written by `make shards` from the run's manifests; per-asset credits in "
                    "[ATTRIBUTION.md](ATTRIBUTION.md) and [ATTRIBUTION.csv](ATTRIBUTION.csv).", ""]
    L += _licence_section(rows, licences)
    L += ["## Samples per split, source and licence", "", "| split | source | licence | samples |",
          "| --- | --- | --- | --- |"]
    combos = Counter((r["split"], r["source"] or "unknown", r["license"] or "unknown") for r in rows)
    for (split, source, lic), count in sorted(combos.items()):
        L.append(f"| {split} | {source} | {lic} | {count} |")
    for split in ("train", "val"):
        L.append(f"| **{split}** | | | **{sum(r['split'] == split for r in rows)}** |")
    L += ["", *_funnel_section(out, data_cfg, data_from), *_render_section(render_cfg.render, render_from, index),
          *_layout_section(out, index, cfg)]
    return "\n".join(L) + "\n"


def _licence_section(rows: list[dict[str, str]], licences: Counter) -> list[str]:
    L = ["## Licences", "", "| licence | samples | renders may be published | commercial use | credit required |",
         "| --- | --- | --- | --- | --- |"]
    for short, count in sorted(licences.items()):
        lic = license_of(short)
        if lic is None:
            L.append(f"| unknown ({short or 'not given'}) | {count} | unknown | unknown | unknown |")
        else:
            L.append(f"| {_link(lic.title, lic.url)} (`{short}`) | {count} | {'yes' if lic.derivatives else '**no**'} | "
                     f"{'yes' if lic.commercial else 'no'} | {'yes' if lic.attribution else 'no'} |")
    L.append("")
    nd = [r for r in rows if redistributable(r["license"]) == "no"]
    unknown = [r for r in rows if redistributable(r["license"]) == "unknown"]
    if nd:
        L += [f"> **Do not publish these shards as they are: {_assets(len(nd))} under a NoDerivatives licence** "
              "(by-nd, by-nc-nd). Renders are derivatives, which these licences forbid distributing. Drop them "
              "(`data.licenses` without by-nd and by-nc-nd, or `data.uid_denylist`) and repack before publishing: "
              + ", ".join(f"`{r['uid']}`" for r in nd[:20]) + (" …" if len(nd) > 20 else "")
              + " (all of them: `renders_redistributable = no` in ATTRIBUTION.csv).", ""]
    if unknown:
        L += [f"> **No licence we know for {_assets(len(unknown))}** ({', '.join(sorted({r['license'] or 'not given' for r in unknown}))}): "
              "find out the rights before publishing their renders (`data.local_license` sets it for local folders).", ""]
    nc = sum(1 for r in rows if (lic := license_of(r["license"])) and not lic.commercial)
    sa = sum(1 for r in rows if (lic := license_of(r["license"])) and lic.share_alike)
    by = sum(1 for r in rows if (lic := license_of(r["license"])) and lic.attribution)
    if by:
        L.append(f"- {_assets(by)} require credit to their authors wherever their renders are published: "
                 "publish ATTRIBUTION.md with them.")
    if nc:
        L.append(f"- {_assets(nc)} NonCommercial: the data set as a whole may not be used commercially.")
    if sa:
        L.append(f"- {_assets(sa)} ShareAlike: renders of them must be shared under the same licence.")
    return [*L, ""] if (by or nc or sa) else L


def _funnel_section(out: Path, data: Config, data_from: str) -> list[str]:
    drops, candidates, unlisted = filter_drops(out)
    L = ["## How the assets were chosen", "",
         f"Filters of `make data` (values from {data_from}), in the order they are applied; each asset counts "
         f"once, under the first filter it failed. {candidates} candidates from `{data.source}`"
         + (f", {unlisted} of which could not be listed" if unlisted else "") + ".", "",
         "| filter | setting | value | assets dropped |", "| --- | --- | --- | --- |"]
    for criterion in CRITERIA:
        key = CRITERION_KEYS[criterion][0]
        if _active(criterion, data.data) or drops.get(criterion):
            L.append(f"| {criterion} | `data.{key}` | {_cell(_value(getattr(data.data, key)))} | {drops.get(criterion, 0)} |")
    if drops.get("other"):
        L.append(f"| other | | | {drops['other']} |")
    L += ["", "Later stages, per asset (`manifest/<stage>.parquet` has every row with its reason):", "",
          "| stage | ok | skipped | failed | why not ok (count) |", "| --- | --- | --- | --- | --- |"]
    for stage, counts, reasons in stage_counts(out):
        why = "; ".join(f"{_cell(r)} ({c})" for r, c in reasons.most_common(5)) + (" …" if len(reasons) > 5 else "")
        L.append(f"| {stage} | {counts[manifest.OK]} | {counts[manifest.SKIPPED]} | {counts[manifest.FAILED]} | {why} |")
    return [*L, ""]


def _render_section(r: Any, render_from: str, index: list[dict[str, Any]]) -> list[str]:
    return ["## Render settings", "", f"From {render_from}. Blender Cycles, one render per view.", "",
            "| setting | value |", "| --- | --- |",
            f"| resolution | {r.resolution}² px |", f"| views per asset | {r.views} (random, seeded by the uid) |",
            f"| field of view | {r.fov_deg}° |", f"| camera distance | uniform in [{r.distance_min}, {r.distance_max}] |",
            f"| elevation | area-uniform in [{r.elevation_min_deg}°, {r.elevation_max_deg}°], azimuth uniform |",
            f"| samples per pixel | {r.samples} (adaptive threshold {r.adaptive_threshold}, denoise {r.denoise}) |",
            f"| bounces | {r.max_bounces} |", f"| lighting | deterministic per asset, strength {r.light_strength}, "
            f"white world {r.world_strength} |", f"| depth scale | {r.depth_scale} |", ""]


def _layout_section(out: Path, index: list[dict[str, Any]], cfg: Config) -> list[str]:
    fields = _sample_fields(out, index)
    nn = _view_fields(fields)
    L = ["## Cameras and depth", "",
         "- World: Blender's, right-handed, Z up. Each asset is centred on its bounding box and scaled so its "
         "largest side is 1 (it fits [-0.5, 0.5]³); meta.json keeps `normalization` {center, scale}.",
         "- Cameras: `c2w` 4×4 in OpenCV axes (x right, y down, z forward), camera to world; `K` 3×3 in pixels "
         "of the stored image, principal point at the centre.",
         "- `NN.depth.png`: 16-bit planar depth (along the camera's z axis) × `depth_scale` (meta.json), "
         "0 where nothing was hit. `NN.normal.png`: 8-bit world-space normals, (n + 1) / 2.",
         "- `NN.rgba.png`: 8-bit RGBA, straight alpha, transparent background (the alpha is the mask).", "",
         "## Sample layout", "",
         "Shards `{split}-NNNNNN.tar` (ustar), one sample per asset, `__key__` = uid (no dots). Fields:", "",
         "| field | content |", "| --- | --- |",
         "| `meta.json` | uid, source, license, attribution, name, author, source_url, normalization, depth_scale, "
         "render settings, lighting, quality |",
         "| `cameras.npz` | `c2w` [V,4,4] float32, `K` [V,3,3] float32, `width`, `height` |",
         f"| `NN.rgba.png`, `NN.depth.png`, `NN.normal.png` | one triple per view, NN = {nn} |"]
    if cfg.shards.geometry or "geometry.npz" in fields:
        L.append("| `geometry.npz` | `vertices` [N,3] float32 (normalised frame), `faces` [F,3] int32 |")
    if fields:
        L += ["", f"The first sample (`{index[0]['uids'][0]}` in `{index[0]['shard']}`) holds: "
              + ", ".join(f"`{f}`" for f in fields[:8]) + (f" … ({len(fields)} fields)" if len(fields) > 8 else "") + "."]
    L += ["", "`index.parquet` lists per shard: shard, split, uids, count, bytes, sha256, licenses, attributions."]
    return L


def write_card(cfg: Config) -> dict[str, Path]:
    """Write OUT/shards/{README.md, ATTRIBUTION.md, ATTRIBUTION.csv} (atomically); return their paths."""
    out = cfg.out_path
    rows = packed_assets(out)
    d = shard_dir(out)
    paths = {"card": d / "README.md", "attribution_md": d / "ATTRIBUTION.md", "attribution_csv": d / "ATTRIBUTION.csv"}
    atomic_write_text(paths["attribution_csv"], attribution_csv(rows))
    atomic_write_text(paths["attribution_md"], attribution_markdown(rows))
    atomic_write_text(paths["card"], card_markdown(cfg, rows))
    return paths
