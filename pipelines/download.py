"""The download stage: fetch, generate or link every kept asset into OUT/assets, verified, one row per uid.

`download(cfg, kept)` runs the source's fetch step over the kept candidates through the executor and
writes `OUT/manifest/download.parquet` (schema `DOWNLOAD_SCHEMA`). A rerun keeps rows that are `ok` and
whose file is still there, and redoes the rest. The manifest is flushed while the job runs, and every asset
is written under a temporary name and renamed, so a SIGKILL leaves nothing a rerun would take as done.

Also here: the checks every source uses (`verify_file`: zero bytes, glTF binary magic and length, a file
that is not what its extension says, a size against the annotation) and `place_file` / `place_folder`
(hard link or copy into OUT/assets, atomically).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from core import manifest
from core.config import Config
from core.io import atomic_dir, atomic_path, clean_temporaries, sha256_file

DOWNLOAD_SCHEMA = pa.schema([
    ("uid", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("source", pa.string()), ("name", pa.string()), ("license", pa.string()), ("attribution", pa.string()),
    ("format", pa.string()), ("path", pa.string()),  # path: the main file later stages open
    ("bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.float64()),
    ("description", pa.string()),  # procedural: JSON of parts, kinds, augmentations, textures, ... (else null)
])
FORMATS = ("glb", "gltf", "obj", "ply", "stl", "fbx")
_MAGICS = [(b"glTF", "glb"), (b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"PK\x03\x04", "zip"),
           (b"\x1f\x8b", "gzip"), (b"Kaydara FBX Binary", "fbx"), (b"ply", "ply"), (b"<!DOCTYPE html", "html"),
           (b"<html", "html"), (b"{", "json")]


class VerifyError(ValueError):
    """A file that is not a usable asset; the message is the manifest reason."""

    reason_only = True  # the executor writes the message without the class name


def sniff(head: bytes) -> str:
    """Best guess of what `head` (the first bytes of a file) is, for error messages."""
    for magic, name in _MAGICS:
        if head.startswith(magic) or head.lstrip().lower().startswith(magic.lower()):
            return name
    if b"\x00" in head[:1024]:
        return "binary data"
    return "text"


def verify_file(path: str | Path, fmt: str, expected_bytes: int | None = None, max_bytes: int | None = None) -> int:
    """Check that `path` is a plausible `fmt` file; return its size or raise `VerifyError` with the reason.

    Checks, in order: readable, not zero bytes, size equal to `expected_bytes` (from the annotation),
    not above `max_bytes`, and the format's signature: glb magic `glTF` + version 2 + declared length equal
    to the size; gltf JSON with an `asset` object; obj text with `v` and `f` records; ply header; binary STL
    length `84 + 50 n` or ASCII `solid ... facet`; fbx binary or ASCII header.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise VerifyError(f"unreadable file: {type(e).__name__}: {e.strerror or e}") from None
    if size == 0:
        raise VerifyError("zero-byte file")
    if expected_bytes is not None and expected_bytes > 0 and size != expected_bytes:
        raise VerifyError(f"size {size} bytes != {expected_bytes} in the annotation (truncated or wrong file)")
    if max_bytes and size > max_bytes:
        raise VerifyError(f"file of {size} bytes is above the {max_bytes}-byte cap")
    looks = sniff(head)
    if fmt == "glb":
        if head[:4] != b"glTF":
            raise VerifyError(f"not a glb: no glTF magic (looks like {looks})")
        if len(head) < 12:
            raise VerifyError("truncated glb header")
        version, length = struct.unpack("<II", head[4:12])
        if version != 2:
            raise VerifyError(f"glb version {version}, expected 2")
        if length != size:
            raise VerifyError(f"glb header says {length} bytes, file has {size} (truncated)")
    elif fmt == "gltf":
        if size > 256 * 2**20:
            raise VerifyError("gltf JSON above 256 MiB")
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise VerifyError(f"not a gltf: not JSON (looks like {looks})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("asset"), dict):
            raise VerifyError("not a gltf: no 'asset' object")
    elif fmt == "obj":
        if looks != "text":
            raise VerifyError(f"not an obj: binary content (looks like {looks})")
        if not _obj_has_records(path):
            raise VerifyError("not an obj: no 'v' and 'f' records")
    elif fmt == "ply":
        if not (head.startswith(b"ply\n") or head.startswith(b"ply\r\n")):
            raise VerifyError(f"not a ply: no 'ply' header (looks like {looks})")
    elif fmt == "stl":
        n = struct.unpack("<I", head[80:84])[0] if len(head) >= 84 else -1
        ascii_ok = head.lstrip().lower().startswith(b"solid") and b"facet" in head.lower()
        if not (ascii_ok or size == 84 + 50 * n):
            raise VerifyError(f"not an stl: neither ASCII 'solid/facet' nor binary length (looks like {looks})")
    elif fmt == "fbx":
        if not (head.startswith(b"Kaydara FBX Binary") or head.lstrip().startswith(b"; FBX")):
            raise VerifyError(f"not an fbx: no FBX header (looks like {looks})")
    else:
        raise VerifyError(f"unsupported format '{fmt}' (supported: {', '.join(FORMATS)})")
    return size


def _obj_has_records(path: Path) -> bool:
    has_v = has_f = False
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"v "):
                has_v = True
            elif line.startswith(b"f "):
                has_f = True
            if has_v and has_f:
                return True
    return False


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy, and the source cannot be half-read
    except OSError:
        shutil.copyfile(src, dst)


def place_file(src: str | Path, dst: str | Path) -> Path:
    """Hard-link (or copy) `src` to `dst` atomically; an existing `dst` is replaced."""
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        _link_or_copy(Path(src), tmp)
    return dst


def place_folder(files: dict[str, Path], dst: str | Path) -> Path:
    """Link or copy each source file to `dst/<relative name>` (the dict's keys), as one atomic folder."""
    dst = Path(dst)
    with atomic_dir(dst, overwrite=True) as tmp:
        for rel, src in files.items():
            target = tmp / rel
            if not _inside_dir(tmp, target):
                raise VerifyError(f"refusing to write outside the asset folder: {rel}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(Path(src), target)
    return dst


def _inside_dir(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def ok_row(item: dict, path: Path, t0: float, checksum: bool = True) -> dict[str, Any]:
    """The `ok` download row for `item` whose main file is `path`."""
    return {"uid": item["uid"], "status": manifest.OK, "reason": "", "path": str(path),
            "bytes": path.stat().st_size, "sha256": sha256_file(path) if checksum else "",
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------------------


def _carry(item: dict, row: dict) -> dict:
    """Complete a step's row with the item's identity columns (license and attribution travel on)."""
    out = {k: item.get(k) for k in ("source", "name", "license", "attribution", "format")}
    out.update({k: v for k, v in row.items() if k in DOWNLOAD_SCHEMA.names})
    out["uid"] = item["uid"]
    return out


def done_rows(out: str | Path) -> dict[str, dict]:
    """Rows of an earlier run that are ok and whose file still exists: a rerun keeps them."""
    rows = manifest.read_rows(manifest.manifest_path(out, "download"))
    return {r["uid"]: r for r in rows if r["status"] == manifest.OK and r.get("path") and Path(r["path"]).exists()}


def download(cfg: Config, kept: list[dict], flush_every_s: float = 2.0) -> list[dict]:
    """Fetch every kept candidate (dicts from the filter's `ok` rows); write and return download rows."""
    from pipelines.sources import fetch_step  # late: sources import this module's helpers

    out = cfg.out_path
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    clean_temporaries(assets)  # leftovers of a killed run; never taken as done
    path = manifest.manifest_path(out, "download")
    previous = manifest.read_rows(path)
    keep = done_rows(out)
    todo = [it for it in kept if it["uid"] not in keep]
    step, kwargs = fetch_step(cfg)
    items = {it["uid"]: it for it in kept}
    fresh: list[dict] = []
    last = [time.monotonic(), 0.0]  # end of the last flush, its duration

    def flush() -> None:
        t0 = time.monotonic()
        manifest.write_rows(path, _normalise(manifest.merge(previous, fresh)), schema=DOWNLOAD_SCHEMA)
        last[:] = [time.monotonic(), time.monotonic() - t0]

    def on_rows(new: list[dict]) -> None:
        fresh.extend(_carry(items.get(r["uid"], {"uid": r["uid"]}), r) for r in new)
        # a flush rewrites the whole table (~1.7 s at 10^5 rows): at most ~10 % of the driver's time
        if time.monotonic() - last[0] > max(flush_every_s, 10 * last[1]):
            flush()

    from pipelines.executor import run_step

    d = cfg.data
    run_step(step, todo, backend=d.executor, workers=d.workers, batch_size=d.download_batch,
             timeout_s=d.download_timeout_s * max(1, d.download_retries), kwargs=kwargs,
             desc=f"download ({cfg.source})", on_rows=on_rows)
    rows = manifest.merge(previous, fresh)
    uids = {it["uid"] for it in kept}
    rows = [r for r in rows if r["uid"] in uids]  # the table describes this run's selection
    flush_rows = _normalise(rows)
    manifest.write_rows(path, flush_rows, schema=DOWNLOAD_SCHEMA)
    return flush_rows


def _normalise(rows: list[dict]) -> list[dict]:
    names = DOWNLOAD_SCHEMA.names
    out = []
    for r in rows:
        row = {k: r.get(k) for k in names}
        row["reason"] = row["reason"] or ""
        out.append(row)
    return out
