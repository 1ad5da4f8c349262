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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.config import DataConfig

CANDIDATE_SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("name", pa.string()), ("license", pa.string()),
    ("attribution", pa.string()), ("author", pa.string()),  # author: who made it (objaverse: the Sketchfab user)
    ("source_url", pa.string()),  # where the asset is published (objaverse: its Sketchfab page; "" = none)
    ("format", pa.string()),
    ("locator", pa.string()),  # source-specific: relative path, object path, procedural index
    ("face_count", pa.int64()), ("animation_count", pa.int64()), ("texture_count", pa.int64()),
    ("archive_bytes", pa.int64()),  # size of the file to download (objaverse: archives.glb.size)
    ("age_restricted", pa.bool_()),
    ("categories", pa.list_(pa.string())), ("tags", pa.list_(pa.string())),  # lower-case names
    ("lvis_category", pa.string()),
])
CRITERIA = ("uid deny-list", "uid allow-list", "license", "min faces", "max faces", "animation", "textures",
            "archive size", "age restricted", "category", "tag", "name", "LVIS", "max_assets")
# Each criterion: the config key that sets it and how its reason (written by `filter_table` below) begins.
CRITERION_KEYS = {
    "uid deny-list": ("uid_denylist", "in uid deny-list"), "uid allow-list": ("uid_allowlist", "not in uid allow-list"),
    "license": ("licenses", "license '"), "min faces": ("min_faces", "face count "),
    "max faces": ("max_faces", "face count "), "animation": ("allow_animation", "animated ("),
    "textures": ("min_textures", "texture count "), "archive size": ("max_archive_bytes", "archive "),
    "age restricted": ("allow_age_restricted", "age-restricted"), "category": ("deny_categories", "category in"),
    "tag": ("deny_tags", "tag in"), "name": ("deny_names", "name matches"),
    "LVIS": ("lvis_categories", "not in the selected LVIS"), "max_assets": ("max_assets", "not sampled (max_assets="),
}


def criterion_of(reason: str) -> str:
    """The criterion (one of CRITERIA) a `skipped` row of filter.parquet failed, from its reason; "" if none."""
    for name, (key, prefix) in CRITERION_KEYS.items():
        if reason.startswith(prefix) and (prefix != "face count " or f" {key} " in reason):
            return name
    return ""


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


# The annotation fields the filters read, as an Arrow type: pyarrow's converter picks exactly these keys out
# of each dict in C++ (other keys are never touched; a missing key or a None is null).
_NAMED = pa.list_(pa.struct([("slug", pa.string()), ("name", pa.string())]))
ANNOTATION_TYPE = pa.struct([
    ("name", pa.string()), ("license", pa.string()), ("faceCount", pa.int64()), ("animationCount", pa.int64()),
    ("isAgeRestricted", pa.bool_()), ("viewerUrl", pa.string()), ("uri", pa.string()),
    ("archives", pa.struct([("glb", pa.struct([("size", pa.int64()), ("textureCount", pa.int64())]))])),
    ("user", pa.struct([("displayName", pa.string()), ("username", pa.string())])),
    ("tags", _NAMED), ("categories", _NAMED),
])
_STR_FIELDS = ("name", "license", "viewerUrl", "uri")
_INT_FIELDS = ("faceCount", "animationCount")


def annotation_problem(a: Any) -> str | None:
    """Why an annotation (one uid's Sketchfab metadata) does not have the types the filters read (None when
    it does): the fields of ANNOTATION_TYPE, each absent / null or of its type. A crafted or corrupt one is
    then a failed row with this reason instead of a crash of the table build."""
    def is_int(v: Any) -> bool:
        return v is None or (isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63)

    def is_str(v: Any) -> bool:
        return v is None or isinstance(v, str)

    if not isinstance(a, dict):
        return f"annotation is a {type(a).__name__}, not an object"
    for k in _STR_FIELDS:
        if not is_str(a.get(k)):
            return f"annotation field {k} is a {type(a[k]).__name__}, not a string"
    for k in _INT_FIELDS:
        if not is_int(a.get(k)):
            return f"annotation field {k} is not an integer: {str(a[k])[:40]!r}"
    if a.get("isAgeRestricted") is not None and not isinstance(a["isAgeRestricted"], bool):
        return "annotation field isAgeRestricted is not a boolean"
    for k, inner in (("archives", None), ("user", ("displayName", "username"))):
        v = a.get(k)
        if v is not None and not isinstance(v, dict):
            return f"annotation field {k} is a {type(v).__name__}, not an object"
        if inner and v and not all(is_str(v.get(i)) for i in inner):
            return f"annotation field {k} has a non-string name"
    glb = (a.get("archives") or {}).get("glb")
    if glb is not None and (not isinstance(glb, dict) or not is_int(glb.get("size")) or not is_int(glb.get("textureCount"))):
        return "annotation field archives.glb is not an object of integer size / textureCount"
    for k in ("tags", "categories"):
        v = a.get(k)
        if v is not None and (not isinstance(v, list) or not all(
                e is None or isinstance(e, str) or (isinstance(e, dict) and is_str(e.get("slug")) and is_str(e.get("name")))
                for e in v)):
            return f"annotation field {k} is not a list of names"
    return None


CHUNK_ROWS = 65_536  # rows converted at once; an odd row sends only its chunk down the per-row Python path


def annotations_to_table(annotations: dict[str, dict], lvis: dict[str, str] | None = None) -> pa.Table:
    """Objaverse annotations (uid -> Sketchfab metadata, as `objaverse.load_annotations` returns) as a table.

    Each chunk of dicts becomes one Arrow struct array (`ANNOTATION_TYPE`, converted in C++), and the columns
    are derived from it with pyarrow compute; a chunk pyarrow cannot convert (e.g. tags given as plain
    strings) is built by the per-row Python path instead, with the same result. `lvis` maps uid to its LVIS
    category. Attribution is "<displayName> (<viewerUrl>)", what CC BY asks for; `author` and `source_url` keep
    its two parts for the dataset card (pipelines/card.py).
    """
    uids = list(annotations)
    values = list(annotations.values())  # same order as the keys; cheaper than a lookup per uid
    lvis = lvis or {}
    parts = []
    for i in range(0, len(uids), CHUNK_ROWS):
        chunk = uids[i:i + CHUNK_ROWS]
        try:
            parts.append(_annotations_to_table_arrow(chunk, values[i:i + CHUNK_ROWS], lvis))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            parts.append(_annotations_to_table_py({u: annotations[u] for u in chunk}, lvis))
    if not parts:
        return CANDIDATE_SCHEMA.empty_table()
    # one chunk per part, not combined: combining would copy the whole table (twice the peak memory), and
    # every consumer (filter_table, parquet, to_pylist) takes chunked columns
    return pa.concat_tables(parts)


def _nonempty(arr: pa.Array) -> pa.Array:
    """`""` as null, so that `coalesce` picks the next value the way Python's `a or b` does."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _names_column(lists: pa.Array) -> pa.Array:
    """list<struct<slug, name>> [N] -> list<string> [N] of `slug or name`, lower-cased; a null list or a null
    entry contributes nothing (as `_names` does for None)."""
    n = len(lists)
    items = pc.list_flatten(lists)  # entries of the non-null lists, in row order
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = pc.is_valid(items)
    names = pc.coalesce(_nonempty(pc.struct_field(items, "slug")), pc.struct_field(items, "name"))
    names = pc.utf8_lower(pc.filter(names, keep))
    counts = np.bincount(parents[keep.to_numpy(zero_copy_only=False)], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), names)


def _annotations_to_table_arrow(uids: list[str], annotations: list[dict | None], lvis: dict[str, str]) -> pa.Table:
    n = len(uids)
    s = pa.array(annotations, type=ANNOTATION_TYPE)  # [N] struct; a None annotation is a null row

    def field(*path: str) -> pa.Array:
        return pc.struct_field(s, list(path))  # nulls of every enclosing struct carry through

    who = pc.coalesce(_nonempty(field("user", "displayName")), _nonempty(field("user", "username")),
                      pa.scalar("unknown"))
    url = pc.coalesce(_nonempty(field("viewerUrl")), _nonempty(field("uri")), pa.scalar(""))
    uid_col = pa.array(uids, pa.string())
    cols = {
        "uid": uid_col,
        "source": pa.array(["objaverse"] * n, pa.string()),
        "name": field("name"),
        "license": field("license"),
        "attribution": pc.binary_join_element_wise(who, " (", url, ")", ""),
        "author": who,
        "source_url": url,
        "format": pa.array(["glb"] * n, pa.string()),
        "locator": uid_col,
        "face_count": field("faceCount"),
        "animation_count": field("animationCount"),
        "texture_count": field("archives", "glb", "textureCount"),
        "archive_bytes": field("archives", "glb", "size"),
        "age_restricted": field("isAgeRestricted"),
        "categories": _names_column(field("categories")),
        "tags": _names_column(field("tags")),
        "lvis_category": pa.array([lvis.get(u) for u in uids], pa.string()) if lvis else pa.nulls(n, pa.string()),
    }
    return pa.table(cols, schema=CANDIDATE_SCHEMA)


def _annotations_to_table_py(annotations: dict[str, dict], lvis: dict[str, str] | None) -> pa.Table:
    """The per-row Python path (annotations pyarrow cannot convert as `ANNOTATION_TYPE`)."""
    # Building millions of small lists next to millions of live dicts makes the cyclic GC rescan them all
    # again and again (10x the work here); nothing built below can form a cycle.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _annotations_to_table_lists(annotations, lvis)
    finally:
        if was_enabled:
            gc.enable()


def _annotations_to_table_lists(annotations: dict[str, dict], lvis: dict[str, str] | None) -> pa.Table:
    uids = list(annotations)
    ann = [annotations[u] or {} for u in uids]
    glb = [((a.get("archives") or {}).get("glb") or {}) for a in ann]
    users = [a.get("user") or {} for a in ann]
    authors = [u.get("displayName") or u.get("username") or "unknown" for u in users]
    urls = [a.get("viewerUrl") or a.get("uri") or "" for a in ann]
    attribution = [f"{who} ({url})" for who, url in zip(authors, urls)]
    lvis = lvis or {}
    cols = {
        "uid": uids,
        "source": ["objaverse"] * len(uids),
        "name": [a.get("name") for a in ann],
        "license": [a.get("license") for a in ann],
        "attribution": attribution,
        "author": authors,
        "source_url": urls,
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
    checks: list[tuple[np.ndarray, str | list[Any]]] = []  # (failed mask [N], reason: str or _msg parts)
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
                       ["license '", pc.fill_null(lic, ""), "' not in the allow-list"]))
    fc = t["face_count"]
    checks.append((_np(pc.less(fc, cfg.min_faces), n), ["face count ", fc, f" < min_faces {cfg.min_faces}"]))
    checks.append((_np(pc.greater(fc, cfg.max_faces), n), ["face count ", fc, f" > max_faces {cfg.max_faces}"]))
    if not cfg.allow_animation:
        ac = t["animation_count"]
        checks.append((_np(pc.greater(ac, 0), n), ["animated (", ac, " animations)"]))
    tc = t["texture_count"]
    checks.append((_np(pc.less(tc, cfg.min_textures), n),
                   ["texture count ", tc, f" < min_textures {cfg.min_textures}"]))
    if cfg.max_archive_bytes:
        ab = t["archive_bytes"]
        checks.append((_np(pc.greater(ab, cfg.max_archive_bytes), n),
                       ["archive ", ab, f" bytes > max_archive_bytes {cfg.max_archive_bytes}"]))
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

    # The first failed criterion of each row, then its message built for those rows only: a full-length
    # message column per criterion would hold millions of strings that are never used.
    first = np.full(n, -1, dtype=np.int64)  # [N] index into `checks`, -1 = passed everything
    for i, (mask, _) in enumerate(checks):
        first[(first < 0) & mask] = i
    pieces: list[pa.Array] = [pa.array([""], pa.string())]  # concatenated messages; 0 = no reason
    pos = np.zeros(n, dtype=np.int64)  # [N] row -> its message in `pieces`

    def add(rows: np.ndarray, msg: str | list[Any]) -> None:
        start = sum(len(p) for p in pieces)
        if isinstance(msg, str):
            pieces.append(pa.array([msg], pa.string()))
            pos[rows] = start
        else:
            take = pa.array(rows)
            built = _msg([m if isinstance(m, str) else m.take(take) for m in msg])
            pieces.append(built.combine_chunks() if isinstance(built, pa.ChunkedArray) else built)
            pos[rows] = start + np.arange(len(rows))

    for i, (_, msg) in enumerate(checks):
        rows = np.flatnonzero(first == i)
        if len(rows):
            add(rows, msg)
    dropped = first >= 0
    if cfg.max_assets and cfg.max_assets > 0:
        passing = np.flatnonzero(~dropped)
        if len(passing) > cfg.max_assets:
            # deterministic: order the passing uids, then a seeded permutation picks max_assets of them
            order = passing[pc.sort_indices(uid.take(pa.array(passing))).to_numpy()]
            chosen = np.random.default_rng(seed).permutation(len(order))[:cfg.max_assets]
            out = np.zeros(n, dtype=bool)  # passing rows that were not drawn
            out[passing] = True
            out[order[chosen]] = False
            add(np.flatnonzero(out), f"not sampled (max_assets={cfg.max_assets})")
    reason = pc.take(pa.concat_arrays(pieces), pa.array(pos))
    status = pc.if_else(pa.array(pos > 0), "skipped", "ok")
    return t.append_column("status", status).append_column("reason", reason)
