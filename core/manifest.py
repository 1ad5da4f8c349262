"""Per-stage status tables (`OUT/manifest/<stage>.parquet`): one row per uid, `status` ok/skipped/failed.

Every stage writes what it decided with `reason` for anything not ok, plus its own columns. Tables are
written atomically. A rerun only redoes what is not ok because each *stage* skips uids whose row is ok
before it works; `merge` itself does not look at status: a row of the rerun replaces the earlier row with
the same uid, whatever either status is, and earlier rows the rerun did not touch stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.io import atomic_path

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
STATUSES = (OK, SKIPPED, FAILED)
STAGES = ("filter", "download", "render", "render_eval", "shards")


def manifest_path(out: str | Path, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown manifest stage '{stage}' (known: {', '.join(STAGES)})")
    return Path(out) / "manifest" / f"{stage}.parquet"


def read_table(path: str | Path) -> pa.Table | None:
    path = Path(path)
    if not path.exists():
        return None
    return pq.read_table(path)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    t = read_table(path)
    return [] if t is None else t.to_pylist()


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    """Write rows (dicts with at least uid/status/reason) as a parquet table, atomically."""
    rows = list(rows)
    for r in rows:
        if "uid" not in r or r.get("status") not in STATUSES:
            raise ValueError(f"manifest row needs uid and status in {STATUSES}: {r}")
        r.setdefault("reason", "")
    table = pa.Table.from_pylist(rows, schema=schema) if rows else _empty(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _empty(schema: pa.Schema | None) -> pa.Table:
    if schema is not None:
        return schema.empty_table()
    return pa.table({"uid": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                     "reason": pa.array([], pa.string())})


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row of `new` replaces the row of `old` with the same uid, whatever either's status (an `ok` row
    is replaced by a later `failed` one too: the stage decides what to retry, not this function). Rows of
    `old` whose uid is not in `new` are kept unchanged. Within `new`, the last row of a uid wins.
    Order: old order (replaced rows keep their place), then uids seen only in `new`, in `new` order."""
    by_uid = {r["uid"]: r for r in old}
    order = [r["uid"] for r in old]
    for r in new:
        if r["uid"] not in by_uid:
            order.append(r["uid"])
        by_uid[r["uid"]] = r
    return [by_uid[u] for u in order]


def ok_uids(path: str | Path) -> list[str]:
    return [r["uid"] for r in read_rows(path) if r["status"] == OK]


def summary(rows: list[dict[str, Any]]) -> str:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[r["status"]] += 1
    return f"{counts[OK]} ok, {counts[SKIPPED]} skipped, {counts[FAILED]} failed"
