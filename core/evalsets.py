"""Evaluation sets as evaluation reads them: which set a source names, where it lives, whether it is built,
what training used (the leak check), and the names and failures its manifests record.

Building a set (choose, fetch, render) is a data job: pipelines/evalset.py, `make render-eval`. A set lives
in `OUT/evalsets/<slug>/`, laid out like a run of its own:

    manifest/{filter,download,render_eval}.parquet    the stages' status tables for this set only
    assets/                                           fetched / generated / linked source files
    renders_eval/<uid>/{orbit,inputs}/                the 20 orbit views and the 4 input views (docs/CONTRACTS.md)
    evalset.json                                      source, slug, the chosen uids in order, exclusions

| source | slug |
| --- | --- |
| `procedural` | `procedural-heldout` |
| `val` | `val` |
| `gso:<dir>` | `gso-<folder name>-<sha256(abs path)[:8]>` |
| `omniobject3d:<dir>` | `omniobject3d-<folder name>-<sha256(abs path)[:8]>` |
| `local:<dir>` | `local-<folder name>-<hash8>` |
| `objaverse` | `objaverse` or `objaverse-<list name>-<hash8 of eval.uids>` |
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core import manifest as mf
from core.config import Config
from core.layout import index_path, indexed_uids
from core.sources import FOLDER_KINDS, SourceError, parse_source

EVAL_KINDS = ("procedural", "val", "objaverse", "local", "gso", "omniobject3d")


class EvalSetError(ValueError):
    """An evaluation source that cannot be used; the message says why and what to run."""


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

    @property
    def built(self) -> bool:
        """True once `make render-eval` chose the set (evalset.json); renders may still have failed."""
        return (self.root / "evalset.json").is_file()

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
                out[uid] = f"render failed: {r['reason']}" if r else "not rendered (run `make render-eval`)"
            elif not (self.renders / uid / "orbit" / "cameras.npz").is_file():
                out[uid] = f"render folder {self.renders / uid} is incomplete"
        return out


def parse_eval_source(text: str) -> tuple[str, str]:
    """`gso:/data/gso` -> ("gso", "/abs/data/gso"); `val` -> ("val", ""). Folders must exist."""
    if text.strip() == "val":
        return "val", ""
    try:
        return parse_source(text)
    except SourceError as e:
        raise EvalSetError(f"{e} (eval sources: procedural, val, objaverse, local:<dir>, gso:<dir>, "
                           "omniobject3d:<dir>)") from None


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "root"


def slug_for(kind: str, arg: str, uid_list: str = "") -> str:
    """Folder name of an eval set (module docstring): the kind, a readable name and a hash of the absolute path."""
    if kind in ("procedural", "val"):
        return "procedural-heldout" if kind == "procedural" else "val"
    if kind in FOLDER_KINDS:
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


def resolve(cfg: Config, source: str) -> EvalSet:
    """The eval set a source names (nothing is built): slug, root, kind; uids from evalset.json if built."""
    kind, arg = parse_eval_source(source)
    slug = slug_for(kind, arg, cfg.eval.uids if kind == "objaverse" else "")
    root = cfg.out_path / "evalsets" / slug
    es = EvalSet(source=f"{kind}:{arg}" if arg else kind, kind=kind, slug=slug, root=root, uids=[],
                 held_out=kind != "val")
    if es.built:
        m = json.loads((root / "evalset.json").read_text())
        es.uids, es.excluded_training = [str(u) for u in m["uids"]], int(m.get("excluded_training", 0))
    return es


def load_built(cfg: Config, source: str) -> EvalSet:
    """The built eval set of `source`; EvalSetError with the command that builds it when there is none."""
    es = resolve(cfg, source)
    if not es.built:
        raise EvalSetError(f"eval set {es.slug} is not built ({es.root / 'evalset.json'} missing): run "
                           f"`make render-eval SOURCE={source} OUT={cfg.out}` (python -m pipelines.evalset "
                           f"--source {source} --out {cfg.out}) first")
    return es


def describe(es: EvalSet, leak: dict) -> dict:
    """What the report prints about the set (JSON-safe)."""
    return {**{k: v for k, v in dataclasses.asdict(es).items() if k != "uids"}, "root": str(es.root),
            "assets": len(es.uids), "uids": list(es.uids), "leak_check": leak}
