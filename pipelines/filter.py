"""Vectorised asset filters on a pyarrow table: every dropped uid keeps the first criterion it failed.

Candidates (from any source) become a table with `CANDIDATE_SCHEMA`. `filter_table` evaluates each
criterion as one pyarrow/numpy expression over all rows, then writes `status` (`ok` / `skipped`) and
`reason` = the first failed criterion in `CRITERIA` order, with the offending value
(e.g. `face count 37 < min_faces 100`). A null value (a source that does not know it) passes.
The deterministic `max_assets` sample is drawn last, among the rows that passed everything else.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import DataConfig

CANDIDATE_SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("name", pa.string()), ("license", pa.string()),
    ("attribution", pa.string()), ("format", pa.string()),
    ("locator", pa.string()),  # source-specific: relative path, object path, procedural index
    ("face_count", pa.int64()), ("animation_count", pa.int64()), ("texture_count", pa.int64()),
    ("archive_bytes", pa.int64()),  # size of the file to download (objaverse: archives.glb.size)
    ("age_restricted", pa.bool_()),
    ("categories", pa.list_(pa.string())), ("tags", pa.list_(pa.string())),  # lower-case names
    ("lvis_category", pa.string()),
])
CRITERIA = ("uid deny-list", "uid allow-list", "license", "min faces", "max faces", "animation", "textures",
            "archive size", "age restricted", "category", "tag", "name", "LVIS", "max_assets")


def read_uid_list(path: str) -> set[str]:
    """Uids of a list file: one per line, blank lines and `#` comments ignored, `.glb` suffix dropped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"uid list not found: {path}")
    out = set()
    for line in p.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(line.removesuffix(".glb"))
    return out


def candidate_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Candidate dicts (missing keys = null) as a table with `CANDIDATE_SCHEMA`."""
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in CANDIDATE_SCHEMA}
    return pa.table(cols, schema=CANDIDATE_SCHEMA)


def _names(entries: Any) -> list[str]:
    """Sketchfab tag/category entries ({'slug': ..., 'name': ...} or plain strings) as names (lower-cased later)."""
    if not entries:
        return []
    try:
        return [e.get("slug") or e.get("name") for e in entries]
    except AttributeError:  # plain strings, or a mix
        return [e if isinstance(e, str) else (e.get("slug") or e.get("name")) for e in entries
                if isinstance(e, (str, dict))]


def annotations_to_table(annotations: dict[str, dict], lvis: dict[str, str] | None = None) -> pa.Table:
    """Objaverse annotations (uid -> Sketchfab metadata, as `objaverse.load_annotations` returns) as a table.

    Columns are built one list each from the dicts (the only per-row Python pass); `lvis` maps uid to
    its LVIS category. Attribution is "<displayName> (<viewerUrl>)", what CC BY asks for.
    """
    # Building millions of small lists next to millions of live dicts makes the cyclic GC rescan them all
    # again and again (10x the work here); nothing built below can form a cycle.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _annotations_to_table(annotations, lvis)
    finally:
        if was_enabled:
            gc.enable()


def _annotations_to_table(annotations: dict[str, dict], lvis: dict[str, str] | None) -> pa.Table:
    uids = list(annotations)
    ann = [annotations[u] or {} for u in uids]
    glb = [((a.get("archives") or {}).get("glb") or {}) for a in ann]
    users = [a.get("user") or {} for a in ann]
    attribution = [f"{u.get('displayName') or u.get('username') or 'unknown'} ({a.get('viewerUrl') or a.get('uri') or ''})"
                   for u, a in zip(users, ann)]
    lvis = lvis or {}
    cols = {
        "uid": uids,
        "source": ["objaverse"] * len(uids),
        "name": [a.get("name") for a in ann],
        "license": [a.get("license") for a in ann],
        "attribution": attribution,
        "format": ["glb"] * len(uids),
        "locator": uids,
        "face_count": [a.get("faceCount") for a in ann],
        "animation_count": [a.get("animationCount") for a in ann],
        "texture_count": [g.get("textureCount") for g in glb],
        "archive_bytes": [g.get("size") for g in glb],
        "age_restricted": [a.get("isAgeRestricted") for a in ann],
        "categories": [_names(a.get("categories")) for a in ann],
        "tags": [_names(a.get("tags")) for a in ann],
        "lvis_category": [lvis.get(u) for u in uids],
    }
    t = pa.table(cols, schema=CANDIDATE_SCHEMA)
    for name in ("categories", "tags"):  # lower-case in one vectorised pass, not per row
        col = t[name].combine_chunks()
        lowered = pa.ListArray.from_arrays(col.offsets, pc.utf8_lower(col.values), mask=col.is_null())
        t = t.set_column(t.schema.get_field_index(name), name, lowered)
    return t


def _list_hits(col: pa.ChunkedArray, deny: list[str]) -> np.ndarray:
    """Rows of a list<string> column with any element in `deny` (case-insensitive) -> bool [N]."""
    n = len(col)
    hit = np.zeros(n, dtype=bool)
    if not deny or n == 0:
        return hit
    arr = col.combine_chunks()
    flat = pc.list_flatten(arr)
    parents = pc.list_parent_indices(arr).to_numpy()
    member = pc.fill_null(pc.is_in(pc.utf8_lower(flat), value_set=pa.array([d.lower() for d in deny])), False)
    hit[parents[member.to_numpy(zero_copy_only=False)]] = True
    return hit


def _np(mask: Any, n: int) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return mask
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    if isinstance(mask, pa.Scalar):
        return np.full(n, bool(mask.as_py()))
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(bool)


def _msg(parts: list[Any]) -> Any:
    """Join literal strings and columns (cast to string) into one reason per row."""
    cols = [p if isinstance(p, str) else pc.cast(p, pa.string()) for p in parts]
    return pc.binary_join_element_wise(*cols, "")


def filter_table(table: pa.Table, cfg: DataConfig, seed: int = 0, allow: set[str] | None = None,
                 deny: set[str] | None = None) -> pa.Table:
    """Add `status` and `reason` to a candidate table (see module docstring); rows keep their order."""
    n = table.num_rows
    t = table
    checks: list[tuple[np.ndarray, Any]] = []  # (failed mask [N], reason: str or string array)
    uid = t["uid"]
    if deny:
        checks.append((_np(pc.is_in(uid, value_set=pa.array(sorted(deny))), n), "in uid deny-list"))
    if allow is not None:
        checks.append((~_np(pc.is_in(uid, value_set=pa.array(sorted(allow), pa.string())), n),
                       "not in uid allow-list"))
    if cfg.licenses:
        lic = t["license"]
        bad = pc.invert(pc.is_in(lic, value_set=pa.array(cfg.licenses)))
        checks.append((_np(pc.and_(bad, pc.is_valid(lic)), n),
                       _msg(["license '", pc.fill_null(lic, ""), "' not in the allow-list"])))
    fc = t["face_count"]
    checks.append((_np(pc.less(fc, cfg.min_faces), n), _msg(["face count ", fc, f" < min_faces {cfg.min_faces}"])))
    checks.append((_np(pc.greater(fc, cfg.max_faces), n), _msg(["face count ", fc, f" > max_faces {cfg.max_faces}"])))
    if not cfg.allow_animation:
        ac = t["animation_count"]
        checks.append((_np(pc.greater(ac, 0), n), _msg(["animated (", ac, " animations)"])))
    tc = t["texture_count"]
    checks.append((_np(pc.less(tc, cfg.min_textures), n),
                   _msg(["texture count ", tc, f" < min_textures {cfg.min_textures}"])))
    if cfg.max_archive_bytes:
        ab = t["archive_bytes"]
        checks.append((_np(pc.greater(ab, cfg.max_archive_bytes), n),
                       _msg(["archive ", ab, f" bytes > max_archive_bytes {cfg.max_archive_bytes}"])))
    if not cfg.allow_age_restricted:
        checks.append((_np(t["age_restricted"], n), "age-restricted"))
    if cfg.deny_categories:
        checks.append((_list_hits(t["categories"], cfg.deny_categories), "category in deny-list"))
    if cfg.deny_tags:
        checks.append((_list_hits(t["tags"], cfg.deny_tags), "tag in deny-list"))
    if cfg.deny_names:
        name = pc.fill_null(t["name"], "")
        hit = np.zeros(n, dtype=bool)
        for s in cfg.deny_names:
            hit |= _np(pc.match_substring(name, s, ignore_case=True), n)
        checks.append((hit, "name matches the deny-list"))
    if cfg.lvis_categories:
        in_lvis = _np(pc.is_in(t["lvis_category"], value_set=pa.array(cfg.lvis_categories)), n)
        checks.append((~in_lvis, "not in the selected LVIS categories"))

    reason = pa.nulls(n, pa.string())
    dropped = np.zeros(n, dtype=bool)
    for mask, msg in reversed(checks):  # later criteria first, so the earliest failure is written last
        reason = pc.if_else(pa.array(mask), msg, reason)
        dropped |= mask
    if cfg.max_assets and cfg.max_assets > 0:
        passing = np.flatnonzero(~dropped)
        if len(passing) > cfg.max_assets:
            # deterministic: order the passing uids, then a seeded permutation picks max_assets of them
            order = passing[pc.sort_indices(uid.take(pa.array(passing))).to_numpy()]
            chosen = np.random.default_rng(seed).permutation(len(order))[:cfg.max_assets]
            out = np.zeros(n, dtype=bool)  # passing rows that were not drawn
            out[passing] = True
            out[order[chosen]] = False
            reason = pc.if_else(pa.array(out), f"not sampled (max_assets={cfg.max_assets})", reason)
    status = pc.if_else(pc.is_null(reason), "ok", "skipped")
    return t.append_column("status", status).append_column("reason", pc.fill_null(reason, ""))
