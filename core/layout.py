"""The on-disk contracts between stages, spelled once: asset uids, render-folder and shard field names, the
shard index, uid lists and the size caps a reader applies before trusting a file (docs/CONTRACTS.md).

The renderer writes these names, the shard packer and the loader read them, evaluation finds its sets by
them; nothing here imports anything else of ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.io import atomic_path

# ----------------------------------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------------------------------

UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # no dots (WebDataset splits keys at the first dot), fits ustar names
SHARD_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")  # {split}-NNNNNN.tar
SPLITS = ("train", "val")
VIEW_KINDS = ("rgba", "depth", "normal")  # the per-view files of a render folder / shard sample
FIELD_RE = re.compile(r"^(meta\.json|cameras\.npz|geometry\.npz|(\d+)\.(rgba|depth|normal)\.png)$")  # sample fields

# ----------------------------------------------------------------------------------------------------------
# Size caps: checked before a file of unknown origin is read or decoded.
# ----------------------------------------------------------------------------------------------------------

MAX_META_BYTES = 1 << 20  # meta.json (render folder, shard sample) and a checkpoint's meta are small JSON
MAX_FIELD_BYTES = 64 << 20  # a single PNG / npz of a shard sample larger than this is not a render of ours
MAX_VIEWS = 1000  # views per asset (the paper renders 32); bounds field names and camera arrays


def view_name(index: int, kind: str, views: int) -> str:
    """File / shard field name of view `index` of `views`: `NN.kind.png` (e.g. `03.rgba.png`), NN zero-padded
    to two digits, or to as many as the largest index needs with 100+ views. The one place this is spelled:
    the renderer writes these names, the shard packer and the loader read them."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {kind!r}")
    if not 0 <= index < views:
        raise ValueError(f"view index {index} outside [0, {views})")
    return f"{index:0{max(2, len(str(views - 1)))}d}.{kind}.png"


def path_inside(root: str | Path, rel: str | Path) -> Path:
    """`root / rel` for a `rel` that came from outside data (a uid, an object path, a locator), asserted to
    stay inside `root` once resolved (no absolute `rel`, no `..` above it, no symlink pointing out).
    Raises ValueError naming both."""
    root = Path(root)
    rel = Path(rel)
    target = root / rel
    if rel.is_absolute() or not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{str(rel)[:200]!r} leaves {root}")
    return target


def read_uid_list(path: str | Path) -> set[str]:
    """Uids of a list file: one per line, blank lines and `#` comments ignored, a `.glb` suffix dropped (lists
    published with Objaverse name files). The one reader of uid lists (allow/deny lists, forced-val, eval)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"uid list not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"uid list {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(line.removesuffix(".glb"))
    return out


# ----------------------------------------------------------------------------------------------------------
# The shard index: OUT/shards/index.parquet, one row per closed shard.
# ----------------------------------------------------------------------------------------------------------

INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()), ("split", pa.string()), ("uids", pa.list_(pa.string())), ("count", pa.int64()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("licenses", pa.list_(pa.string())),
    ("attributions", pa.list_(pa.string())),
])


def shard_dir(out: str | Path) -> Path:
    return Path(out) / "shards"


def index_path(out: str | Path) -> Path:
    """OUT/shards/index.parquet."""
    return shard_dir(out) / "index.parquet"


def read_index(out: str | Path) -> list[dict[str, Any]]:
    """Rows of OUT/shards/index.parquet ([] when there is none)."""
    return read_index_file(index_path(out))


def read_index_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an index.parquet anywhere (the loader finds one beside its local shards)."""
    p = Path(path)
    return pq.read_table(p).to_pylist() if p.is_file() else []


def write_index(out: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the index atomically, sorted by (split, shard)."""
    rows = sorted(rows, key=lambda r: (r["split"], r["shard"]))
    with atomic_path(index_path(out)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)


def shard_urls(out: str | Path, split: str = "train") -> list[str]:
    """Local paths of the closed shards of `split`, from the index (sorted)."""
    return [str(shard_dir(out) / r["shard"]) for r in read_index(out) if r["split"] == split]


def indexed_uids(out: str | Path, split: str | None = "train") -> set[str]:
    """Uids packed in the `split` shards of OUT's index (None = every split)."""
    return {u for r in read_index(out) if split is None or r["split"] == split for u in r["uids"]}
