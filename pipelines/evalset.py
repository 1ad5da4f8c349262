"""`make render-eval`: build an evaluation set (choose, fetch, render in eval mode) under a root of its own.

    python -m pipelines.evalset [--config C] [--out OUT] [--source S] [key=value ...]

An evaluation set never mixes with the training data: it lives in `OUT/evalsets/<slug>/` (layout and slugs:
core/evalsets.py, which is also what evaluation reads). It is built by the data and render stages called
as functions on a copy of the config whose `out` is that root and whose `source` is the evaluation source:
`pipelines.data.run_filter` + `pipelines.download.download`, then `pipelines.render.run(eval_mode=True)`.
Both resume, so a rerun reuses what is fetched and rendered. The source is `--source` / SOURCE= when given,
else eval.source.

| source | assets |
| --- | --- |
| `procedural` | indices after the training ones: `data.procedural_start + data.procedural_count` onwards (uids differ from training's) |
| `val` | the val split of `OUT/manifest/shards.parquet`, from the training assets (`OUT/manifest/download.parquet`) |
| `gso:<dir>` | `<dir>/<name>/meshes/model.obj`, by folder name |
| `omniobject3d:<dir>` | `<dir>/raw_scans/<category>/<object_id>/Scan/Scan.obj`, by relative path |
| `local:<dir>` | every mesh file under `<dir>`, by relative path |
| `objaverse` | objaverse uids (of `eval.uids` when set), by uid |

`eval.max_assets` bounds the set: the first N in the order of the last column (deterministic, not a random
sample). With `eval.exclude_training` (default) candidates whose uid training used are dropped first (the
filter's uid deny-list, reason recorded), so pointing the eval at the training folder gives held-out assets.
Exit status: 0 every asset rendered, 3 finished with failures, 2 bad arguments or source.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from core import manifest as mf
from core.cli import EXIT_PARTIAL, config_from_args, save_resolved, stage_parser
from core.config import Config
from core.evalsets import EvalSet, EvalSetError, parse_eval_source, resolve, training_uids
from core.io import atomic_write_text
from core.layout import read_uid_list
from core.sources import FOLDER_KINDS
from pipelines.data import FILTER_SCHEMA, run_filter
from pipelines.download import DOWNLOAD_SCHEMA, download
from pipelines.render import run as render_run


def _order_key(kind: str):
    if kind == "procedural":
        return lambda r: int(r["locator"])
    if kind in FOLDER_KINDS:
        return lambda r: (r.get("locator") or "", r["uid"])
    return lambda r: r["uid"]


def eval_config(cfg: Config, kind: str, arg: str, root: Path) -> Config:
    """The config the stages run with for this eval set: out = its root, source = the eval source."""
    ecfg = copy.deepcopy(cfg)
    ecfg.out = str(root)
    ecfg.data.max_assets = 0  # the eval set is chosen here (first N), not by the filter's random sample
    n = cfg.eval.max_assets or cfg.data.procedural_count
    if kind == "procedural":
        ecfg.source = "procedural"
        ecfg.data.procedural_start = cfg.data.procedural_start + cfg.data.procedural_count
        ecfg.data.procedural_count = n
    elif kind != "val":
        ecfg.source = f"{kind}:{arg}" if arg else kind
    if cfg.eval.uids:
        ecfg.data.uid_allowlist = cfg.eval.uids
        if kind in FOLDER_KINDS:  # entries may name objects (GSO folder names, OmniObject3D object ids)
            ecfg.data.uid_allowlist = _uids_of_list(ecfg, root)
    return ecfg


def _uids_of_list(ecfg: Config, root: Path) -> str:
    """eval.uids for a folder source, as uids: each entry (docs/eval.md "eval.uids") is a uid or the `name` of
    a candidate (GSO: the object folder; OmniObject3D: the object id; local: the file's relative path).
    Writes `root/eval-uids.txt` (the filter's allow-list) with a comment line per entry that matched none."""
    from pipelines.sources import candidates

    table, _ = candidates(ecfg)
    by_name: dict[str, list[str]] = {}
    for uid, name, locator in zip(*(table.column(c).to_pylist() for c in ("uid", "name", "locator"))):
        for key in {uid, name or "", locator or ""} - {""}:
            by_name.setdefault(key, []).append(uid)
    uids, missing = set(), []
    for entry in sorted(read_uid_list(ecfg.data.uid_allowlist)):
        if entry in by_name:
            uids.update(by_name[entry])
        else:
            missing.append(entry)
    path = root / "eval-uids.txt"
    atomic_write_text(path, "".join(f"{u}\n" for u in sorted(uids))
                      + "".join(f"# no candidate: {m}\n" for m in missing))
    if missing:
        print(f"warning: {len(missing)} eval.uids entries match no candidate of {ecfg.source} "
              f"(listed in {path})", file=sys.stderr)
    return str(path)


def _write_deny_list(cfg: Config, root: Path, train: set[str]) -> str:
    """Training uids (plus the user's data.uid_denylist) as one deny-list file for the filter."""
    deny = set(train) | (read_uid_list(cfg.data.uid_denylist) if cfg.data.uid_denylist else set())
    path = root / "deny-training-uids.txt"
    atomic_write_text(path, "".join(f"{u}\n" for u in sorted(deny)))
    return str(path)


def _select_from_source(cfg: Config, ecfg: Config, kind: str, root: Path) -> tuple[list[dict], int]:
    """Filter (the source's candidates), keep the first N; returns (chosen filter rows, excluded as training)."""
    train: set[str] = set()
    if kind != "procedural" and cfg.eval.exclude_training:  # procedural held-out indices never meet training's
        train, _ = training_uids(cfg.out_path)
        ecfg.data.uid_denylist = _write_deny_list(cfg, root, train)
    kept, _failed = run_filter(ecfg)
    table = mf.manifest_path(root, "filter")
    rows = mf.read_rows(table)
    excluded = sum(r["uid"] in train for r in rows)
    n = cfg.eval.max_assets
    chosen = sorted(kept, key=_order_key(kind))[:n] if n else sorted(kept, key=_order_key(kind))
    keep = {r["uid"] for r in chosen}
    for r in rows:
        if r["status"] == mf.OK and r["uid"] not in keep:
            r["status"], r["reason"] = mf.SKIPPED, f"beyond eval.max_assets={n} (first {n} in source order)"
    mf.write_rows(table, rows, schema=FILTER_SCHEMA)
    return chosen, excluded


def _select_val(cfg: Config, root: Path) -> list[str]:
    """The first N val uids of OUT/manifest/shards.parquet; their training download rows become this set's."""
    shards = mf.manifest_path(cfg.out, "shards")
    val = sorted(r["uid"] for r in mf.read_rows(shards) if r["status"] == mf.OK and r.get("split") == "val")
    if not val:
        raise EvalSetError(f"no val split in {shards}: run `make shards` first (shards.val_fraction > 0)")
    n = cfg.eval.max_assets
    chosen = val[:n] if n else val
    down = {r["uid"]: r for r in mf.read_rows(mf.manifest_path(cfg.out, "download"))}
    rows = []
    for uid in chosen:
        r = dict(down.get(uid) or {"uid": uid, "status": mf.FAILED, "reason": "not in the training download table"})
        if r.get("path") and not Path(r["path"]).is_absolute():  # relative to the training OUT, else to here
            p = cfg.out_path / r["path"]
            r["path"] = str((p if p.exists() else Path(r["path"])).resolve())
        rows.append({f: r.get(f) for f in DOWNLOAD_SCHEMA.names})
    for r in rows:
        r["reason"] = r["reason"] or ""
    mf.write_rows(mf.manifest_path(root, "filter"),
                  [{"uid": u, "status": mf.OK if u in set(chosen) else mf.SKIPPED,
                    "reason": "" if u in set(chosen) else f"beyond eval.max_assets={n}"} for u in val])
    mf.write_rows(mf.manifest_path(root, "download"), rows, schema=DOWNLOAD_SCHEMA)
    return chosen


def build(cfg: Config, source: str, progress: bool = True) -> EvalSet:
    """Choose, fetch and render the eval set of `source`; returns it with its uids (EvalSetError: bad source)."""
    es = resolve(cfg, source)
    es.root.mkdir(parents=True, exist_ok=True)
    ecfg = eval_config(cfg, es.kind, parse_eval_source(source)[1], es.root)
    if es.kind == "val":
        es.uids = _select_val(cfg, es.root)
    else:
        chosen, es.excluded_training = _select_from_source(cfg, ecfg, es.kind, es.root)
        es.uids = [r["uid"] for r in chosen]
        download(ecfg, chosen)
    atomic_write_text(es.root / "evalset.json", json.dumps(
        {"source": es.source, "slug": es.slug, "kind": es.kind, "uids": es.uids, "held_out": es.held_out,
         "excluded_training": es.excluded_training, "max_assets": cfg.eval.max_assets}, indent=1))
    if mf.ok_uids(mf.manifest_path(es.root, "download")):  # the render stage renders exactly these rows
        render_run(ecfg, eval_mode=True, progress=progress)
    return es


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n\n")[0])
    for action in p._actions:  # the shared parser's wording is about training sources
        if action.dest == "source":
            action.help = ("eval set: procedural (held-out) | val | objaverse | local:<dir> | gso:<dir> | omniobject3d:<dir> "
                           "(default: config eval.source)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    save_resolved(cfg, "evalset")
    try:
        es = build(cfg, args.source or cfg.eval.source)
    except EvalSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = mf.read_rows(mf.manifest_path(es.root, "render_eval"))
    print(f"eval set {es.slug}: {len(es.uids)} assets, renders {mf.summary(rows)} -> {es.root / 'renders_eval'}")
    return 0 if rows and all(r["status"] == mf.OK for r in rows) else EXIT_PARTIAL


if __name__ == "__main__":
    raise SystemExit(main())
