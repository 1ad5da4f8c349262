"""Evaluation sets: choose, fetch and render (eval mode) the assets `make eval` scores, under a root of their own.

An evaluation set never mixes with the training data. It lives in `OUT/evalsets/<slug>/`, laid out like a
run of its own:

    manifest/{filter,download,render_eval}.parquet    the stages' status tables for this set only
    assets/                                           fetched / generated / linked source files
    renders_eval/<uid>/{orbit,inputs}/                the 20 orbit views and the 4 input views (DESIGN)
    evalset.json                                      source, slug, the chosen uids in order, exclusions

It is built by the existing stages called as functions on a copy of the config whose `out` is that root
and whose `source` is the evaluation source: `pipelines.data.run_filter` + `pipelines.download.download`,
then `pipelines.render.run(eval_mode=True)`. Both resume, so a rerun reuses what is fetched and rendered.

| source | slug | assets |
| --- | --- | --- |
| `procedural` | `procedural-heldout` | indices after the training ones: `data.procedural_start + data.procedural_count` onwards (uids differ from training's) |
| `val` | `val` | the val split of `OUT/manifest/shards.parquet`, from the training assets (`OUT/manifest/download.parquet`) |
| `gso:<dir>` | `gso-<folder name>-<sha256(abs path)[:8]>` | `<dir>/<name>/meshes/model.obj`, by folder name |
| `local:<dir>` | `local-<folder name>-<hash8>` | every mesh file under `<dir>`, by relative path |
| `objaverse` | `objaverse` or `objaverse-<list name>-<hash8 of eval.uids>` | objaverse uids (of `eval.uids` when set), by uid |

`eval.max_assets` bounds the set: the first N in the order of the last column (deterministic, not a random
sample). With `eval.exclude_training` (default) candidates whose uid training used are dropped first (the
filter's uid deny-list, reason recorded), so pointing the eval at the training folder gives held-out assets.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core import manifest as mf
from core.config import Config
from core.io import atomic_write_text
from core.layout import index_path, indexed_uids

EVAL_KINDS = ("procedural", "val", "objaverse", "local", "gso")


class EvalSetError(ValueError):
    """An evaluation source that cannot be built; the message says why and what to run."""


@dataclass
class EvalSet:
    source: str  # as resolved: procedural | val | objaverse | local:<abs dir> | gso:<abs dir>
    kind: str  # one of EVAL_KINDS
    slug: str  # folder name under OUT/evalsets/
    root: Path  # OUT/evalsets/<slug>
    uids: list[str]  # the chosen assets, in selection order
    held_out: bool = True  # False only for `val` (its uids are in the val shards by construction)
    excluded_training: int = 0  # candidates dropped because training used them
    notes: list[str] = field(default_factory=list)

    @property
    def renders(self) -> Path:
        return self.root / "renders_eval"

    def names(self) -> dict[str, str]:
        """uid -> the asset's name in its source (GSO folder, file stem, procedural description)."""
        return {r["uid"]: str(r.get("name") or "") for r in mf.read_rows(mf.manifest_path(self.root, "download"))}

    def failures(self) -> dict[str, str]:
        """uid -> why it has no eval render (download or render failure, or not rendered yet)."""
        down = {r["uid"]: r for r in mf.read_rows(mf.manifest_path(self.root, "download"))}
        rend = {r["uid"]: r for r in mf.read_rows(mf.manifest_path(self.root, "render_eval"))}
        out = {}
        for uid in self.uids:
            d, r = down.get(uid), rend.get(uid)
            if d is None or d["status"] != mf.OK:
                out[uid] = f"download failed: {d['reason'] if d else 'no download row'}"
            elif r is None or r["status"] != mf.OK:
                out[uid] = f"render failed: {r['reason']}" if r else "not rendered (run without --no-render)"
            elif not (self.renders / uid / "orbit" / "cameras.npz").is_file():
                out[uid] = f"render folder {self.renders / uid} is incomplete"
        return out


def parse_eval_source(text: str) -> tuple[str, str]:
    """`gso:/data/gso` -> ("gso", "/abs/data/gso"); `val` -> ("val", ""). Folders must exist."""
    if text.strip() == "val":
        return "val", ""
    from pipelines.sources import SourceError, parse_source

    try:
        return parse_source(text)
    except SourceError as e:
        raise EvalSetError(f"{e} (eval sources: procedural, val, objaverse, local:<dir>, gso:<dir>)") from None


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "root"


def slug_for(kind: str, arg: str, uid_list: str = "") -> str:
    """Folder name of an eval set (module docstring): the kind, a readable name and a hash of the absolute path."""
    if kind in ("procedural", "val"):
        return "procedural-heldout" if kind == "procedural" else "val"
    if kind in ("gso", "local"):
        return f"{kind}-{_safe(Path(arg).name)}-{_hash8(str(Path(arg).resolve()))}"
    if uid_list:  # objaverse with its own uid list: the list's content names the set
        return f"objaverse-{_safe(Path(uid_list).stem)}-{_hash8(Path(uid_list).read_text())}"
    return "objaverse"


def training_uids(out: Path, split: str | None = "train") -> tuple[set[str], str]:
    """Uids training used and where they come from: the `split` shards of OUT/shards/index.parquet (None = all
    splits), else every ok row of OUT/manifest/download.parquet, else none."""
    index = index_path(out)
    if index.is_file():
        return indexed_uids(out, split), str(index)
    down = mf.manifest_path(out, "download")
    if down.is_file():
        return set(mf.ok_uids(down)), str(down)
    return set(), ""


def leak_check(cfg: Config, es: EvalSet) -> dict:
    """Eval uids found in OUT/shards/index.parquet (any split for held-out sets, the train split for `val`)."""
    index = index_path(cfg.out_path)
    if not index.is_file():
        return {"checked": False, "against": str(index), "overlap": [],
                "note": "no shards index: nothing trained from shards under this OUT, nothing to check"}
    split = None if es.held_out else "train"
    shard_uids, _ = training_uids(cfg.out_path, split)
    overlap = sorted(set(es.uids) & shard_uids)
    return {"checked": True, "against": f"{index} ({'all splits' if split is None else 'train split'})",
            "overlap": overlap}


def _order_key(kind: str):
    if kind == "procedural":
        return lambda r: int(r["locator"])
    if kind in ("gso", "local"):
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
    return ecfg


def _write_deny_list(cfg: Config, root: Path, train: set[str]) -> str:
    """Training uids (plus the user's data.uid_denylist) as one deny-list file for the filter."""
    from core.layout import read_uid_list

    deny = set(train) | (read_uid_list(cfg.data.uid_denylist) if cfg.data.uid_denylist else set())
    path = root / "deny-training-uids.txt"
    atomic_write_text(path, "".join(f"{u}\n" for u in sorted(deny)))
    return str(path)


def _select_from_source(cfg: Config, ecfg: Config, kind: str, root: Path) -> tuple[list[dict], int]:
    """Filter (the source's candidates), keep the first N; returns (chosen filter rows, excluded as training)."""
    from pipelines.data import FILTER_SCHEMA, run_filter

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
    from pipelines.download import DOWNLOAD_SCHEMA

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


def resolve(cfg: Config, source: str) -> EvalSet:
    """The eval set a source names (nothing is built): slug, root, kind; uids from evalset.json if built."""
    kind, arg = parse_eval_source(source)
    slug = slug_for(kind, arg, cfg.eval.uids if kind == "objaverse" else "")
    root = cfg.out_path / "evalsets" / slug
    es = EvalSet(source=f"{kind}:{arg}" if arg else kind, kind=kind, slug=slug, root=root, uids=[],
                 held_out=kind != "val")
    meta = root / "evalset.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        es.uids, es.excluded_training = [str(u) for u in m["uids"]], int(m.get("excluded_training", 0))
    return es


def prepare(cfg: Config, source: str, render: bool = True, progress: bool = True) -> EvalSet:
    """Choose, fetch and (with `render`) render the eval set of `source`; returns it with its uids.

    Without `render` nothing is built: the set must exist (an earlier `make eval`), else EvalSetError.
    """
    es = resolve(cfg, source)
    if not render:
        if not (es.root / "evalset.json").is_file():
            raise EvalSetError(f"eval set {es.root} is not built yet: run without --no-render")
        return es
    es.root.mkdir(parents=True, exist_ok=True)
    ecfg = eval_config(cfg, es.kind, parse_eval_source(source)[1], es.root)
    if es.kind == "val":
        es.uids = _select_val(cfg, es.root)
    else:
        from pipelines.download import download

        chosen, es.excluded_training = _select_from_source(cfg, ecfg, es.kind, es.root)
        es.uids = [r["uid"] for r in chosen]
        download(ecfg, chosen)
    atomic_write_text(es.root / "evalset.json", json.dumps(
        {"source": es.source, "slug": es.slug, "kind": es.kind, "uids": es.uids, "held_out": es.held_out,
         "excluded_training": es.excluded_training, "max_assets": cfg.eval.max_assets}, indent=1))
    if mf.ok_uids(mf.manifest_path(es.root, "download")):  # the render stage renders exactly these rows
        from pipelines.render import run as render_run

        render_run(ecfg, eval_mode=True, progress=progress)
    return es


def describe(es: EvalSet, leak: dict) -> dict:
    """What the report prints about the set (JSON-safe)."""
    return {**{k: v for k, v in dataclasses.asdict(es).items() if k != "uids"}, "root": str(es.root),
            "assets": len(es.uids), "uids": list(es.uids), "leak_check": leak}


def main(argv: list[str] | None = None) -> int:
    """`make render-eval`: build (fetch + render in eval mode) the eval set of SOURCE / eval.source, no scoring."""
    import sys

    from core.cli import EXIT_PARTIAL, config_from_args, save_resolved, stage_parser

    p = stage_parser(main.__doc__ or "")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    save_resolved(cfg, "evalset")
    try:
        es = prepare(cfg, args.source or cfg.eval.source)
    except EvalSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = mf.read_rows(mf.manifest_path(es.root, "render_eval"))
    print(f"eval set {es.slug}: {len(es.uids)} assets, renders {mf.summary(rows)} -> {es.root / 'renders_eval'}")
    return 0 if rows and all(r["status"] == mf.OK for r in rows) else EXIT_PARTIAL


if __name__ == "__main__":
    raise SystemExit(main())
