"""core/io.py: what a reader sees on disk after success, after an exception and after SIGKILL of the
writing process, and that a read-only file hard-linked into place is published (checked with real
permissions: the writer runs without CAP_DAC_OVERRIDE when the tests run as root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.io import (
    TMP_PREFIX,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    clean_temporaries,
)

ROOT = Path(__file__).resolve().parents[2]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_and_text_publish_exactly_the_data(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01payload")
    assert p.read_bytes() == b"\x00\x01payload"
    atomic_write_text(tmp_path / "sub" / "a.bin", "second")  # replaces
    assert (tmp_path / "sub" / "a.bin").read_text() == "second"
    assert _names(tmp_path / "sub") == ["a.bin"]  # no temporary left behind


def test_failed_block_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and _names(tmp_path) == ["t.txt"]

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as d:
            (d / "x").write_text("x")
            raise RuntimeError("boom")
    assert _names(tmp_path) == ["t.txt"]


def test_atomic_dir_publishes_and_overwrites_only_when_asked(tmp_path):
    with atomic_dir(tmp_path / "f") as d:
        (d / "a").write_text("1")
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("2")
    assert (tmp_path / "f" / "sub" / "b").read_text() == "2"
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "f") as d:
            (d / "a").write_text("new")
    assert (tmp_path / "f" / "a").read_text() == "1"
    with atomic_dir(tmp_path / "f", overwrite=True) as d:
        (d / "c").write_text("3")
    assert _names(tmp_path / "f") == ["c"] and _names(tmp_path) == ["f"]


WRITER = """
import sys, time
from pathlib import Path
from core.io import atomic_path, atomic_dir
target, kind = Path(sys.argv[1]), sys.argv[2]
if kind == "file":
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x" * 100000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
else:
    with atomic_dir(target) as d:
        (d / "part").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_write_leaves_no_final_entry_and_cleanup_removes_the_temporary(tmp_path, kind):
    target = tmp_path / "out" / "result"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # the process is inside the block, data on disk
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    left = _names(tmp_path / "out")
    assert "result" not in left and len(left) == 1 and left[0].startswith(TMP_PREFIX)
    (tmp_path / "out" / "keep.txt").write_text("not a temporary")
    assert clean_temporaries(tmp_path / "out") == 1
    assert _names(tmp_path / "out") == ["keep.txt"]
    assert clean_temporaries(tmp_path / "missing") == 0


HARDLINK = """
import os, sys
from pathlib import Path
from core.io import atomic_path
src, target = Path(sys.argv[1]), Path(sys.argv[2])
try:
    open(src, "rb+").close()
    print("write access to the read-only file: the test would prove nothing", file=sys.stderr)
    sys.exit(3)
except PermissionError:
    pass
with atomic_path(target) as tmp:
    os.link(src, tmp)  # how download/objaverse publish a cached file without copying it
"""


def test_read_only_hard_linked_file_is_published(tmp_path):
    src = tmp_path / "cache.glb"
    src.write_bytes(b"glTF read-only cached asset")
    src.chmod(0o444)
    target = tmp_path / "assets" / "uid.glb"
    cmd = [sys.executable, "-c", HARDLINK, str(src), str(target)]
    if os.geteuid() == 0:  # root ignores permission bits; drop the capabilities that let it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without util-linux setpriv to drop CAP_DAC_OVERRIDE")
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert target.read_bytes() == b"glTF read-only cached asset"
    assert os.stat(target).st_ino == os.stat(src).st_ino  # the link itself, not a copy
    assert _names(target.parent) == ["uid.glb"]


def test_clean_temporaries_removes_only_dot_tmp_entries(tmp_path):
    (tmp_path / f"{TMP_PREFIX}a.1.x").write_text("1")
    (tmp_path / f"{TMP_PREFIX}dir.2.y").mkdir()
    (tmp_path / f"{TMP_PREFIX}dir.2.y" / "inner").write_text("2")
    (tmp_path / "done.tar").write_text("3")
    (tmp_path / "tmp-not-ours").write_text("4")
    assert clean_temporaries(tmp_path) == 2
    assert _names(tmp_path) == ["done.tar", "tmp-not-ours"]


def test_clean_temporaries_of_one_name_spares_live_writers_and_other_names(tmp_path):
    """In a folder we do not own (e.g. /tmp beside a user's --output): only the named path's temporaries of
    processes that are gone are removed; a live writer's, another name's and foreign `.tmp-*` entries stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    gone = tmp_path / f"{TMP_PREFIX}report.{dead}.0123abcd"
    gone.mkdir()
    (gone / "index.html").write_text("partial")
    live = tmp_path / f"{TMP_PREFIX}report.{os.getpid()}.89abcdef"
    live.mkdir()
    other = tmp_path / f"{TMP_PREFIX}sandbox-{dead}.0123abcd"
    other.mkdir()
    foreign = tmp_path / f"{TMP_PREFIX}report.not-a-pid"
    foreign.write_text("someone else's")
    assert clean_temporaries(tmp_path, of="report") == 1
    assert _names(tmp_path) == sorted(p.name for p in (live, other, foreign))
