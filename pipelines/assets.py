"""What every source does to one asset file: check it is what it claims (`verify_file`), put it into
OUT/assets atomically (`place_file`, `place_folder`) and describe it as an `ok` download row (`ok_row`).

Imported by the download stage and by each source's fetch step (pipelines/sources/*), so neither has to
import the other.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from core import manifest
from core.io import atomic_dir, atomic_path, sha256_file

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


def is_inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks resolved) lies under `root`: what keeps a reference from leaving a folder."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


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
            if not is_inside(tmp, target):
                raise VerifyError(f"refusing to write outside the asset folder: {rel}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(Path(src), target)
    return dst


def ok_row(item: dict, path: Path, t0: float, checksum: bool = True) -> dict[str, Any]:
    """The `ok` download row for `item` whose main file is `path`."""
    return {"uid": item["uid"], "status": manifest.OK, "reason": "", "path": str(path),
            "bytes": path.stat().st_size, "sha256": sha256_file(path) if checksum else "",
            "seconds": time.perf_counter() - t0}
