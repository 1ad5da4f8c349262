"""core/manifest.py: tables read back through pyarrow itself, merge against hand-written expectations,
bad rows refused before anything is written."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import manifest as mf


def test_write_read_round_trip_through_parquet(tmp_path):
    p = mf.manifest_path(tmp_path, "download")
    assert p == tmp_path / "manifest" / "download.parquet"
    rows = [{"uid": "a", "status": "ok", "bytes": 10}, {"uid": "b", "status": "failed", "reason": "404", "bytes": 0}]
    mf.write_rows(p, rows)
    t = pq.read_table(p)  # pyarrow's own reader, not ours
    assert t.column_names == ["uid", "status", "bytes", "reason"]
    assert t.to_pylist() == [{"uid": "a", "status": "ok", "bytes": 10, "reason": ""},
                             {"uid": "b", "status": "failed", "bytes": 0, "reason": "404"}]
    assert mf.read_rows(p) == t.to_pylist() and mf.ok_uids(p) == ["a"]
    assert sorted(x.name for x in p.parent.iterdir()) == ["download.parquet"]  # no temporary left


def test_empty_and_missing_tables(tmp_path):
    assert mf.read_rows(tmp_path / "none.parquet") == [] and mf.read_table(tmp_path / "none.parquet") is None
    p = tmp_path / "empty.parquet"
    mf.write_rows(p, [])
    assert pq.read_table(p).num_rows == 0 and pq.read_table(p).column_names == ["uid", "status", "reason"]
    schema = pa.schema([("uid", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("n", pa.int64())])
    mf.write_rows(p, [], schema=schema)
    assert pq.read_table(p).schema.equals(schema)


@pytest.mark.parametrize("bad", [{"status": "ok"}, {"uid": "x", "status": "done"}, {"uid": "x"}])
def test_bad_rows_are_rejected_and_the_old_table_survives(tmp_path, bad):
    p = tmp_path / "m.parquet"
    mf.write_rows(p, [{"uid": "keep", "status": "ok"}])
    with pytest.raises(ValueError, match="uid and status"):
        mf.write_rows(p, [{"uid": "fine", "status": "ok"}, bad])
    assert mf.read_rows(p) == [{"uid": "keep", "status": "ok", "reason": ""}]


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown manifest stage"):
        mf.manifest_path(tmp_path, "rendr")


def test_merge_rerun_rows_replace_same_uid_whatever_the_status():
    old = [{"uid": "a", "status": "ok", "v": 1}, {"uid": "b", "status": "failed", "v": 2},
           {"uid": "c", "status": "ok", "v": 3}]
    new = [{"uid": "d", "status": "ok", "v": 4}, {"uid": "b", "status": "ok", "v": 5},
           {"uid": "a", "status": "failed", "v": 6}, {"uid": "d", "status": "skipped", "v": 7}]
    got = mf.merge(old, new)
    # a: an ok row replaced by a later failed one; b: retried; c: untouched; d: new, last row of it wins
    assert got == [{"uid": "a", "status": "failed", "v": 6}, {"uid": "b", "status": "ok", "v": 5},
                   {"uid": "c", "status": "ok", "v": 3}, {"uid": "d", "status": "skipped", "v": 7}]
    assert mf.merge([], new[:1]) == new[:1] and mf.merge(old, []) == old


def test_summary_counts():
    rows = [{"uid": str(i), "status": s} for i, s in enumerate(["ok", "ok", "failed", "skipped", "ok"])]
    assert mf.summary(rows) == "3 ok, 1 skipped, 1 failed"
