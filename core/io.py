"""Crash-safe file output: write under a temporary name in the same folder, fsync, then rename.

A reader (or a rerun) only ever sees complete files and folders; a job killed with SIGKILL leaves at most a
`.tmp-*` entry, which is never taken as done and is removed by `clean_temporaries`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    """fsync a finished file through a read-only descriptor: the caller may have hard-linked a read-only file
    into place (a writable open would fail with EACCES), and fsync needs no write access."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it is renamed to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if tmp.exists():
            _fsync_file(tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    With `overwrite`, an existing `path` is replaced (moved aside, then removed) after success.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_temporaries(folder: str | Path, of: str | None = None) -> int:
    """Remove `.tmp-*` leftovers of killed jobs directly inside `folder`; return how many.

    For a folder the caller does not own (a user's `--output` parent, `/tmp`), pass `of=<name>`: then only
    temporaries of that one path are removed, and only those whose writer (the pid in the name) is no longer
    running on this machine, so a concurrent job's or another program's `.tmp-*` entries are never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(f"{TMP_PREFIX}*" if of is None else f"{TMP_PREFIX}{of}.*"):
        if of is not None and _writer_alive(p.name[len(TMP_PREFIX) + len(of) + 1:]):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def _writer_alive(suffix: str) -> bool:
    """Whether the process that made a temporary (`<pid>.<hex>` after its path's name) still runs here."""
    pid, _, tag = suffix.partition(".")
    if not (pid.isascii() and pid.isdigit() and len(tag) == 8):
        return True  # not a name _tmp_sibling makes: not ours to remove
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (the one checksum helper: downloads, shards, weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
