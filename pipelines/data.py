"""`make data`: list the source's candidates, filter them, download (or generate / link) the kept assets.

Writes OUT/manifest/filter.parquet (every candidate: ok / skipped / failed, with the first failed
criterion as the reason), OUT/manifest/download.parquet (every kept asset: status, reason, `path` of
the main file, source, license, attribution, name, format, bytes, sha256) and the files under
OUT/assets/. Steps run through `pipelines.executor` (`data.executor`: `ray` by default, RAY_ADDRESS for a
cluster; `process` for worker processes on this machine; `local` in this process, for debugging). A rerun redoes only what is not ok. Exit status: 0 all ok, 3 finished with failures, 2 bad
arguments or configuration. One run per OUT at a time (`OUT/.locks/data.lock`): a second run waits for
the first, then finds its work done.

  python -m pipelines.data --source procedural --out /tmp/x
  python -m pipelines.data --source local:/data/meshes data.max_assets=0
  python -m pipelines.data --source gso:/data/gso data.executor=process
  python -m pipelines.data --source objaverse data.objaverse_cache=/data/objaverse data.max_assets=1000
"""

from __future__ import annotations

import dataclasses
import sys
import time

import pyarrow as pa

from core import manifest
from core.cli import EXIT_PARTIAL, config_from_args, save_resolved, stage_parser
from core.config import Config
from core.layout import read_uid_list
from core.lock import stage_lock
from pipelines.download import download
from pipelines.filter import CANDIDATE_SCHEMA, filter_table
from pipelines.sources import SourceError, candidates, parse_source

FILTER_SCHEMA = CANDIDATE_SCHEMA.append(pa.field("status", pa.string())).append(pa.field("reason", pa.string()))


def run_filter(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Candidates -> filter.parquet. Returns (kept rows, failed rows). Holds OUT's `data` lock (core.lock)."""
    with stage_lock(cfg.out_path, "data"):
        return _run_filter(cfg)


def _run_filter(cfg: Config) -> tuple[list[dict], list[dict]]:
    table, failed = candidates(cfg)
    d = cfg.data
    allow = read_uid_list(d.uid_allowlist) if d.uid_allowlist else None
    deny = read_uid_list(d.uid_denylist) if d.uid_denylist else None
    failed_uids = {r["uid"] for r in failed}
    if failed_uids:  # a uid that failed to be listed is not a candidate too
        table = table.filter(pa.compute.invert(pa.compute.is_in(table["uid"], value_set=pa.array(sorted(failed_uids)))))
    if parse_source(cfg.source)[0] == "procedural":  # procedural_count is the selection, not a pool to sample
        d = dataclasses.replace(d, max_assets=0)
    filtered = filter_table(table, d, seed=cfg.seed, allow=allow, deny=deny)
    rows = filtered.to_pylist()
    fail_rows = [{f: r.get(f) for f in FILTER_SCHEMA.names} for r in failed]
    for r in fail_rows:
        r["reason"] = r["reason"] or ""
    manifest.write_rows(manifest.manifest_path(cfg.out, "filter"), rows + fail_rows, schema=FILTER_SCHEMA)
    return [r for r in rows if r["status"] == manifest.OK], fail_rows


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    try:
        parse_source(cfg.source)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # one `make data` per OUT at a time: a second waits here, then finds the first one's work done
    with stage_lock(cfg.out_path, "data"):
        save_resolved(cfg, "data")
        try:
            kept, listing_failed = run_filter(cfg)
        except (FileNotFoundError, ValueError, SourceError) as e:  # uid list missing or not text; bad procedural setting
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"filter: {len(kept)} kept, {len(listing_failed)} failed to list "
              f"-> {manifest.manifest_path(cfg.out, 'filter')}", flush=True)
        rows = download(cfg, kept)
    n_failed = len(listing_failed) + sum(r["status"] == manifest.FAILED for r in rows)
    print(f"data ({cfg.source}): {manifest.summary(rows)} downloads; {len(listing_failed)} failed before "
          f"download; {n_failed} failed in all; {time.perf_counter() - t0:.1f} s "
          f"-> {manifest.manifest_path(cfg.out, 'download')}")
    for r in [*listing_failed, *rows]:
        if r["status"] == manifest.FAILED:
            print(f"  failed {r['uid']} ({r.get('name') or ''}): {r['reason']}", file=sys.stderr)
    if parse_source(cfg.source)[0] == "procedural":  # description table, histograms, rendered contact sheet
        from pipelines.procedural_report import write_report

        for what, path in write_report(cfg, rows).items():
            print(f"procedural {what}: {path}")
    return EXIT_PARTIAL if n_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
