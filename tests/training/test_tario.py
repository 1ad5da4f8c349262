"""training/tario.py: the streaming tar reader against Python's own `tarfile` (an independent reader)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from training.tario import tar_members


def test_tar_reader_matches_tarfile_on_pax_and_long_names(tmp_path):
    path = tmp_path / "pax.tar"
    rng = np.random.default_rng(0)
    samples = [{"__key__": "k" * 120, "a.bin": rng.bytes(700), "b.txt": b"x"},
               {"__key__": "short", "a.bin": rng.bytes(0), "b.txt": rng.bytes(513)}]
    with wds.TarWriter(str(path), mtime=1.5) as w:  # float mtime + a 120-char name: pax headers
        for s in samples:
            w.write(s)
    with tarfile.open(path) as t:
        want = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]
    with open(path, "rb") as f:
        got = list(tar_members(f))
    assert got == want and len(got) == 4
    with open(path, "rb") as f:
        assert [d for _, d in tar_members(f, skip=lambda n: n.endswith(".bin"))][0::2] == [None, None]
    with open(path, "rb") as f:  # a flipped header byte fails the checksum instead of yielding garbage
        data = bytearray(f.read())
    data[10] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))
