"""core/lock.py: one holder of a stage's lock at a time, across processes; the lock dies with its holder
(SIGKILL leaves none behind); re-entrant in one process."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from core.lock import LockTimeout, lock_path, stage_lock


def _hold(root: str, ready) -> None:
    with stage_lock(root, "data"):
        ready.set()
        time.sleep(60)


def test_a_second_holder_waits_and_a_killed_holder_leaves_no_lock(tmp_path: Path, capfd):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), ready), daemon=True)
    child.start()
    try:
        assert ready.wait(60)
        assert f"pid {child.pid}" in lock_path(tmp_path, "data").read_text()
        with pytest.raises(LockTimeout), stage_lock(tmp_path, "data", timeout_s=0.5):
            pass
        assert f"held by pid {child.pid}" in capfd.readouterr().err
        with stage_lock(tmp_path, "render", timeout_s=0.5):  # another stage's lock is another lock
            pass
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        t0 = time.monotonic()
        with stage_lock(tmp_path, "data", timeout_s=5):  # the kernel dropped the dead holder's lock
            assert time.monotonic() - t0 < 5
    finally:
        if child.is_alive():
            child.kill()


def test_reentrant_in_one_process(tmp_path: Path):
    with stage_lock(tmp_path, "data"), stage_lock(tmp_path, "data", timeout_s=0.1):
        pass
    with stage_lock(tmp_path, "data", timeout_s=0.1):  # released after the outer block
        pass
