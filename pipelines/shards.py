"""`make shards`: pack rendered assets (OUT/renders/<uid>/) into WebDataset shards with an index.

One sample per asset, `__key__` = uid, fields = the render folder's files (`meta.json`, `cameras.npz`, per
view `NN.rgba.png`, `NN.depth.png`, `NN.normal.png`; `geometry.npz` only with `shards.geometry=true`, since
training never reads it and eval takes it from the render folders). Shards are `{split}-NNNNNN.tar`.

How it stays reproducible and resumable:
- The split is a pure function of the uid (sha256 -> [0, 1) < `val_fraction`) plus a forced-val uid list.
- The whole layout (which uid goes into which shard) is *planned* up front from file sizes, because a tar's
  size is a closed form of its members' sizes. Writers then only fill planned shards, so 1 writer and N
  writers (`shards.executor=process` or `ray`, `shards.writers=N`) produce the same, byte-identical files
  (sorted uids, sorted members, fixed mtime/uid/gid/mode).
- A shard is written as `.tmp-*` and renamed when closed; `index.parquet` is rewritten after each close.
  A rerun drops index rows whose file vanished, adopts a closed shard the index does not list (a crash
  between rename and index write) only if it is byte for byte what `write_shard` writes for its samples
  (`matches_plan`: packable assets not yet indexed, every member, the end blocks), removes any other
  file named like a shard (truncated, foreign: never indexed), then plans the uids not yet in a shard,
  numbering on.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core import manifest
from core.cli import config_from_args, save_resolved, stage_parser
from core.config import Config, check_executor
from core.io import atomic_path, clean_temporaries, sha256_file
from core.layout import (
    MAX_META_BYTES,
    SHARD_RE,
    UID_RE,
    VIEW_KINDS,
    read_index,
    read_uid_list,
    view_name,
    write_index,
)
from core.lock import stage_lock
from pipelines.card import write_card
from pipelines.executor import run_step

TAR_BLOCK, TAR_RECORD = 512, 20 * 512  # tarfile's block and default record size

MANIFEST_SCHEMA = pa.schema([
    ("uid", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("split", pa.string()),
    ("shard", pa.string()), ("bytes", pa.int64()), ("views", pa.int64()), ("license", pa.string()),
])


class RenderFolderError(ValueError):
    """A render folder that cannot be packed (missing or malformed files); the reason is the message."""


@dataclass
class Asset:
    """A packable render folder: which files travel (sample field -> path) and what the index needs."""

    uid: str
    split: str
    files: dict[str, Path]  # field name (e.g. "03.rgba.png") -> file
    views: int
    license: str
    attribution: str

    @property
    def tar_bytes(self) -> int:
        return sum(member_bytes(p.stat().st_size) for p in self.files.values())


@dataclass
class ShardPlan:
    name: str  # e.g. "train-000003.tar"
    split: str
    assets: list[Asset]


# ----------------------------------------------------------------------------------------------------------
# Pure pieces: split, sizes, planning.
# ----------------------------------------------------------------------------------------------------------


def uid_fraction(uid: str) -> float:
    """A uniform number in [0, 1) from the uid alone (sha256), so the split never depends on order or run."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") / 2.0**64


def split_of(uid: str, val_fraction: float, forced_val: set[str] | frozenset[str] = frozenset()) -> str:
    return "val" if uid in forced_val or uid_fraction(uid) < val_fraction else "train"


def member_bytes(size: int) -> int:
    """Bytes a file of `size` takes in a ustar archive: one header block plus data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_bytes(members_bytes: int) -> int:
    """Archive size from the summed member bytes: two zero end blocks, then padding to a whole record."""
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def plan_shards(assets: list[Asset], max_count: int, max_bytes: int,
                start: dict[str, int] | None = None) -> list[ShardPlan]:
    """Group assets (per split, sorted by uid) into shards of at most `max_count` samples / `max_bytes` bytes.

    A sample larger than `max_bytes` gets a shard of its own. `start` gives the next shard number per split.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"shards.max_count and shards.max_bytes must be positive ({max_count}, {max_bytes})")
    start = dict(start or {})
    plans: list[ShardPlan] = []
    for split in ("train", "val"):
        n = start.get(split, 0)
        cur: list[Asset] = []
        cur_bytes = 0
        for a in sorted((a for a in assets if a.split == split), key=lambda a: a.uid):
            b = a.tar_bytes
            if cur and (len(cur) >= max_count or tar_bytes(cur_bytes + b) > max_bytes):
                plans.append(ShardPlan(f"{split}-{n:06d}.tar", split, cur))
                n, cur, cur_bytes = n + 1, [], 0
            if not cur and tar_bytes(b) > max_bytes:
                warnings.warn(f"{a.uid}: one sample ({tar_bytes(b)} B) exceeds shards.max_bytes; it gets its own shard",
                              stacklevel=2)
            cur.append(a)
            cur_bytes += b
        if cur:
            plans.append(ShardPlan(f"{split}-{n:06d}.tar", split, cur))
    return plans


# ----------------------------------------------------------------------------------------------------------
# Render folders -> assets.
# ----------------------------------------------------------------------------------------------------------


def inspect_render_folder(folder: Path, uid: str, geometry: bool = False) -> tuple[dict[str, Path], dict]:
    """Check a render folder has every file a sample needs; return (field -> path, meta).

    Raises RenderFolderError with the reason when something is missing or malformed.
    """
    if not folder.is_dir():
        raise RenderFolderError(f"render folder {folder} missing")
    meta_p, cams_p = folder / "meta.json", folder / "cameras.npz"
    for p in (meta_p, cams_p):
        if not p.is_file():
            raise RenderFolderError(f"{p.name} missing")
    if meta_p.stat().st_size > MAX_META_BYTES:
        raise RenderFolderError(f"meta.json larger than {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(meta_p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RenderFolderError(f"meta.json unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("uid") != uid:
        raise RenderFolderError(f"meta.json uid {meta.get('uid') if isinstance(meta, dict) else None!r} != {uid!r}")
    try:
        with np.load(cams_p, allow_pickle=False) as z:
            c2w, K = z["c2w"], z["K"]
    except Exception as e:  # a truncated zip raises many kinds of error; all mean "unreadable"
        raise RenderFolderError(f"cameras.npz unreadable: {type(e).__name__}: {e}") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or K.shape != (len(c2w), 3, 3) or len(c2w) == 0:
        raise RenderFolderError(f"cameras.npz shapes c2w {c2w.shape}, K {K.shape} (want [V,4,4], [V,3,3])")
    views = len(c2w)
    files = {"meta.json": meta_p, "cameras.npz": cams_p}
    for i in range(views):
        for kind in VIEW_KINDS:
            name = view_name(i, kind, views)
            if not (folder / name).is_file():
                raise RenderFolderError(f"{name} missing")
            files[name] = folder / name
    if geometry:
        if not (folder / "geometry.npz").is_file():
            raise RenderFolderError("geometry.npz missing (shards.geometry=true)")
        files["geometry.npz"] = folder / "geometry.npz"
    return files, meta


def collect_assets(cfg: Config, packed: dict[str, dict[str, Any]] | None = None
                   ) -> tuple[list[Asset], list[dict[str, Any]]]:
    """Read the render manifest and folders; return packable assets and manifest rows for the rest.

    `packed` maps uids already in a closed shard to that shard's index row. Index membership is checked
    before the render row: a uid whose render later failed (or whose folder went away or got flagged) is
    still in its shard, so its row stays `ok` and names the shard, with the render's new verdict as a note.
    """
    packed = packed or {}
    out = cfg.out_path
    render_rows = manifest.read_rows(manifest.manifest_path(out, "render"))
    if not render_rows:
        raise FileNotFoundError(f"{manifest.manifest_path(out, 'render')} missing or empty: run `make render` first")
    forced_val = read_uid_list(cfg.shards.val_uids) if cfg.shards.val_uids else set()
    assets: list[Asset] = []
    rows: list[dict[str, Any]] = []

    def row(uid: str, status: str, reason: str, split: str = "", **kw: Any) -> dict[str, Any]:
        return {"uid": uid, "status": status, "reason": reason, "split": split, "shard": "", "bytes": 0,
                "views": 0, "license": "", **kw}

    def not_packable(uid: str, status: str, reason: str) -> None:
        if uid in packed:
            shard = packed[uid]
            rows.append(row(uid, manifest.OK, f"in closed shard {shard['shard']} (packed earlier; now: {reason}); "
                            "remove that shard and rerun to drop it", shard["split"], shard=shard["shard"]))
        else:
            rows.append(row(uid, status, reason))

    for r in sorted(render_rows, key=lambda r: r["uid"]):
        uid = r["uid"]
        if not UID_RE.match(uid):
            rows.append(row(uid, manifest.FAILED, "uid is not [A-Za-z0-9_-]{1,64} (WebDataset keys have no dots)"))
            continue
        if r["status"] != manifest.OK:
            not_packable(uid, manifest.SKIPPED, f"render {r['status']}: {r.get('reason', '')}")
            continue
        try:
            files, meta = inspect_render_folder(out / "renders" / uid, uid, cfg.shards.geometry)
        except RenderFolderError as e:
            not_packable(uid, manifest.FAILED, str(e))
            continue
        quality = meta.get("quality", {})
        if not isinstance(quality, dict) or quality.get("ok") is not True:
            flags = quality.get("flags", []) if isinstance(quality, dict) else []
            not_packable(uid, manifest.SKIPPED, f"quality not ok: {', '.join(map(str, flags)) or 'no quality record'}")
            continue
        split = split_of(uid, cfg.shards.val_fraction, forced_val)
        views = (len(files) - 2 - int("geometry.npz" in files)) // len(VIEW_KINDS)
        assets.append(Asset(uid, split, files, views, str(meta.get("license", "")), str(meta.get("attribution", ""))))
    return assets, rows


# ----------------------------------------------------------------------------------------------------------
# Writing one shard (a plain function: the executor's step calls it, in this process, a worker or Ray).
# ----------------------------------------------------------------------------------------------------------


def _members(plan: ShardPlan, mtime: float) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """The shard's members in order, with the one header convention both the writer and the adoption check
    use: `<uid>.<field>`, samples contiguous and sorted, fixed owner/mode, integer mtime."""
    for a in plan.assets:
        for name in sorted(a.files):
            data = a.files[name].read_bytes()
            ti = tarfile.TarInfo(f"{a.uid}.{name}")
            ti.size, ti.mtime, ti.mode = len(data), int(mtime), 0o444
            ti.uname = ti.gname = "gtr"
            yield ti, data


def write_shard(plan: ShardPlan, shard_dir: str | Path, mtime: float) -> dict[str, Any]:
    """Write `plan` to `shard_dir/plan.name` (temporary name, renamed when closed); return its index row."""
    path = Path(shard_dir) / plan.name
    with atomic_path(path) as tmp:
        # ustar (no pax headers) with fixed owner/group/mode/integer mtime: the archive depends on the bytes
        # only. Members of a sample are contiguous and sorted, as WebDataset's TarWriter writes them.
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for ti, data in _members(plan, mtime):
                t.addfile(ti, io.BytesIO(data))
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return index_row(plan, size, digest)


def shard_chunks(plan: ShardPlan, mtime: float) -> Iterator[bytes]:
    """The exact bytes `write_shard` writes for `plan`, as pieces (ustar header, data, padding per member;
    two zero blocks and the padding to a whole record at the end): what a closed shard must be."""
    total = 0
    for ti, data in _members(plan, mtime):
        header = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        pad = -len(data) % TAR_BLOCK
        yield header
        yield data
        yield bytes(pad)
        total += len(header) + len(data) + pad
    yield bytes(tar_bytes(total) - total)


def matches_plan(path: Path, plan: ShardPlan, mtime: float) -> tuple[bool, str]:
    """(True, sha256) when the file at `path` is byte for byte the shard `plan` describes (every sample of
    the plan, in order, each member's bytes those of the render folder, the end blocks and padding); else
    (False, what differs). What a rerun checks before adopting a closed shard the index does not list."""
    h = hashlib.sha256()
    at = 0
    with open(path, "rb") as f:
        for piece in shard_chunks(plan, mtime):
            got = f.read(len(piece))
            if got != piece:
                return False, (f"differs from the plan at byte {at}" if len(got) == len(piece)
                               else f"ends at byte {at + len(got)} (truncated)")
            h.update(got)
            at += len(got)
        if f.read(1):
            return False, f"longer than the plan's {at} bytes"
    return True, h.hexdigest()


def adopt_closed(shard_dir: Path, index: list[dict[str, Any]], todo: dict[str, Asset],
                 mtime: float) -> list[dict[str, Any]]:
    """Closed shards on disk that the index does not list (a crash between a rename and the index write).

    One is adopted only if its samples are packable assets not yet in an indexed shard (of its split, in
    sorted order) and the file is byte for byte the shard `write_shard` writes for exactly them
    (`matches_plan`: every member, the end blocks and padding); their assets leave `todo`. Any other file
    named like a shard (truncated, foreign, stale) is not trusted: removed with a warning, its samples
    packed again. Returns the adopted shards' index rows."""
    known = {r["shard"] for r in index}
    adopted = []
    for path in sorted(shard_dir.glob("*.tar")):
        m = SHARD_RE.match(path.name)
        if not m or path.name in known:
            continue
        plan, why = _plan_of(path, m.group(1), todo)
        if plan is not None:
            ok, why = matches_plan(path, plan, mtime)
            if ok:
                adopted.append(index_row(plan, path.stat().st_size, why))
                for a in plan.assets:
                    del todo[a.uid]
                continue
        warnings.warn(f"{path} is not adopted ({why}); removed, its samples are packed again", stacklevel=2)
        path.unlink()
    return adopted


def _plan_of(path: Path, split: str, todo: dict[str, Asset]) -> tuple[ShardPlan | None, str]:
    """The plan a closed shard claims to be (its samples' assets, in its order), or (None, why not)."""
    try:
        with tarfile.open(path, "r:") as t:
            keys = [m.name.partition(".")[0] for m in t]
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"not a readable tar: {e}"
    uids = list(dict.fromkeys(keys))
    if not uids:
        return None, "no samples"
    for u in uids:
        if u not in todo or todo[u].split != split:
            return None, f"holds {u[:80]!r}, not a packable {split} asset outside the index"
    return ShardPlan(path.name, split, [todo[u] for u in uids]), ""


def index_row(plan: ShardPlan, size: int, digest: str) -> dict[str, Any]:
    return {"shard": plan.name, "split": plan.split, "uids": [a.uid for a in plan.assets],
            "count": len(plan.assets), "bytes": size, "sha256": digest,
            "licenses": [a.license for a in plan.assets], "attributions": [a.attribution for a in plan.assets]}


def indexed_on_disk(shard_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Index rows whose shard file is still there (a vanished one's uids are packed again)."""
    kept = []
    for r in rows:
        if (shard_dir / r["shard"]).is_file():
            kept.append(r)
        else:
            warnings.warn(f"index lists {r['shard']} but the file is gone; its uids will be packed again", stacklevel=2)
    return kept


def write_shard_step(item: dict[str, Any], shard_dir: str, mtime: float) -> dict[str, Any]:
    """The executor's step: `item["plan"]` -> a row whose `index` is the closed shard's index row."""
    return {"uid": item["uid"], "status": manifest.OK, "index": write_shard(item["plan"], shard_dir, mtime)}


# ----------------------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------------------


def pack(cfg: Config, executor: str | None = None) -> dict[str, Any]:
    """Pack every ok render into shards; resumable. Returns a summary (counts, shard names written).

    `executor` overrides shards.executor (local | process | ray). One run per OUT at a time (core.lock)."""
    with stage_lock(cfg.out_path, "shards"):
        return _pack(cfg, executor)


def _pack(cfg: Config, executor: str | None) -> dict[str, Any]:
    sc = cfg.shards
    kind = check_executor(executor or sc.executor, "shards.executor")
    if sc.writers > 1 and kind == "local":
        raise ValueError(f"shards.writers={sc.writers} needs shards.executor=process or ray "
                         "(local writes one shard at a time)")
    out = cfg.out_path
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(shard_dir)
    index = indexed_on_disk(shard_dir, read_index(out))
    done = {u: r for r in index for u in r["uids"]}
    assets, rows = collect_assets(cfg, done)
    forced_val = read_uid_list(sc.val_uids) if sc.val_uids else set()
    leaked = sorted(u for u in forced_val if u in done and done[u]["split"] == "train")
    if leaked:
        raise RuntimeError(f"forced-val uids already packed in train shards: {leaked[:5]}... ; remove "
                           f"{shard_dir} (or those shards) and rerun, or the eval set leaks into training")
    todo = {a.uid: a for a in assets if a.uid not in done}
    index += adopt_closed(shard_dir, index, todo, sc.mtime)
    start = {s: 1 + max((int(SHARD_RE.match(r["shard"]).group(2)) for r in index if r["split"] == s), default=-1)
             for s in ("train", "val")}
    plans = plan_shards(list(todo.values()), sc.max_count, sc.max_bytes, start)
    write_index(out, index)

    def on_row(item: dict[str, Any], row: dict[str, Any]) -> None:
        if row["status"] == manifest.OK:  # index each shard as it closes: a crash later loses none of them
            index.append(row["index"])
            write_index(out, index)

    # Shards are built from our own render folders (no untrusted parsing): no per-item timeout.
    results = run_step(write_shard_step, [{"uid": p.name, "plan": p} for p in plans], executor=kind,
                       workers=sc.writers, kwargs={"shard_dir": str(shard_dir), "mtime": sc.mtime},
                       desc=f"shards ({kind})", on_row=on_row)
    failed = [r for r in results if r["status"] != manifest.OK]
    if failed:  # a task-level error (disk full, a render file that vanished): the closed shards stay indexed
        raise RuntimeError(f"{len(failed)} shard(s) not written, e.g. {failed[0]['uid']}: {failed[0]['reason']}; "
                           "fix the cause and rerun (closed shards are kept)")

    where = {u: r for r in index for u in r["uids"]}
    for a in assets:
        r = where.get(a.uid)
        if r is None:  # cannot happen unless a writer silently dropped it; record rather than hide
            rows.append({"uid": a.uid, "status": manifest.FAILED, "reason": "not in any shard after packing",
                         "split": a.split, "shard": "", "bytes": 0, "views": a.views, "license": a.license})
        else:
            rows.append({"uid": a.uid, "status": manifest.OK, "reason": "", "split": r["split"], "shard": r["shard"],
                         "bytes": a.tar_bytes, "views": a.views, "license": a.license})
    # uids packed by an earlier run whose render row is gone stay ok in the manifest: their shard is still there
    mpath = manifest.manifest_path(out, "shards")
    merged = manifest.merge(manifest.read_rows(mpath), rows)
    manifest.write_rows(mpath, [{f: r.get(f, d) for f, d in _MANIFEST_DEFAULTS.items()} for r in merged],
                        schema=MANIFEST_SCHEMA)
    return {"written": [p.name for p in plans], "shards": len(index), "ok": len(assets),
            "skipped": sum(r["status"] == manifest.SKIPPED for r in rows),
            "failed": sum(r["status"] == manifest.FAILED for r in rows),
            "train": sum(r["count"] for r in index if r["split"] == "train"),
            "val": sum(r["count"] for r in index if r["split"] == "val")}


_MANIFEST_DEFAULTS = {"uid": "", "status": manifest.FAILED, "reason": "", "split": "", "shard": "", "bytes": 0,
                      "views": 0, "license": ""}


def main(argv: Iterable[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n\n")[0] + "\n\n" + "Reads OUT/manifest/render.parquet and OUT/renders/; "
                     "writes OUT/shards/{train,val}-NNNNNN.tar, OUT/shards/index.parquet, OUT/manifest/shards.parquet and the "
                     "dataset card OUT/shards/README.md with ATTRIBUTION.{md,csv} (pipelines/card.py).")
    args = p.parse_args(list(argv) if argv is not None else None)
    cfg = config_from_args(args)
    save_resolved(cfg, "shards")
    try:
        s = pack(cfg)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    card = write_card(cfg)
    print(f"shards: wrote {len(s['written'])} new shard(s); {s['shards']} in the index "
          f"({s['train']} train / {s['val']} val samples); assets {s['ok']} ok, {s['skipped']} skipped, "
          f"{s['failed']} failed -> {cfg.out_path / 'shards'}; dataset card {card['card'].name}, "
          f"credits {card['attribution_md'].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
