"""One run per stage and output root at a time: an exclusive `flock` on `<root>/.locks/<stage>.lock`.

Two runs on one OUT would otherwise delete each other's temporaries (each stage removes `.tmp-*` leftovers
when it starts) and rewrite each other's manifests. The second run waits, saying who holds the lock, and
then finds the first one's work done (every stage skips what is done). The lock is the kernel's: it
goes with the process that holds it, so a crash or SIGKILL never leaves a stale lock behind. Re-entrant
within one process (the demo and the eval-set build call stage functions that lock themselves).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_DIR = ".locks"
_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth) held by this process


class LockTimeout(RuntimeError):
    """The stage's lock was not free within the time asked for."""


def lock_path(root: str | Path, stage: str) -> Path:
    return Path(root) / LOCK_DIR / f"{stage}.lock"


@contextlib.contextmanager
def stage_lock(root: str | Path, stage: str, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold `<root>/.locks/<stage>.lock` for the block; wait for another holder (with one message on stderr),
    at most `timeout_s` seconds (None: as long as it takes; then LockTimeout)."""
    path = lock_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:  # this process holds it already
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            print(f"{stage}: {path} is held by {holder}; waiting for that run to finish", file=sys.stderr,
                  flush=True)
            _wait(fd, timeout_s, path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        _held[key] = (fd, 1)
        try:
            yield path
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wait(fd: int, timeout_s: float | None, path: Path) -> None:
    if timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockTimeout(f"{path} still held after {timeout_s:g} s") from None
            time.sleep(0.2)
