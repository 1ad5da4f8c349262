"""training/data/tario.py: the streaming tar reader against Python's own `tarfile` (an independent reader), and
hostile shards built with `tarfile` (oversize, too many members, bad keys/fields, links, base-256 sizes)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from training.data import tario
from training.data.tario import DataStalled, SkipCounter, tar_members, tar_samples


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


# ----------------------------------------------------------------------------------------------------------
# Hostile shards: every case is skipped and counted, the good samples around it survive, nothing is written.
# ----------------------------------------------------------------------------------------------------------


def _member(t: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _good(t: tarfile.TarFile, key: str) -> None:
    _member(t, f"{key}.meta.json", b'{"uid": "%s"}' % key.encode())
    _member(t, f"{key}.00.rgba.png", b"png bytes of " + key.encode())


def _tar(tmp_path, build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        build(t)
    return buf.getvalue()


class CountingStream(io.BytesIO):
    """A seekable stream that counts the bytes handed out by read() (seeks past members are not reads)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


def _samples(data: bytes, stream_cls=io.BytesIO, max_consecutive: int = 0):
    handler = SkipCounter(max_warnings=0, max_consecutive=max_consecutive)
    stream = stream_cls(data)
    got = list(tar_samples(iter([{"url": "mem.tar", "stream": stream}]), handler))
    return got, handler, stream


def _keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def test_oversize_member_skips_its_sample_without_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tario, "MAX_FIELD_BYTES", 1000)
    big = bytes(5000)

    def build(t):
        _good(t, "a")
        _member(t, "b.meta.json", b"{}")
        _member(t, "b.00.rgba.png", big)
        _good(t, "c")

    data = _tar(tmp_path, build)
    for cls in (CountingStream, NonSeekable):  # local file (seek) and pipe/HTTP (chunked read) paths
        got, handler, stream = _samples(data, cls)
        assert _keys(got) == ["a", "c"] and handler.count == 1
        assert got[1]["00.rgba.png"] == b"png bytes of c"
    got, handler, stream = _samples(data, CountingStream)
    assert stream.bytes_read < len(data) - len(big)  # the oversize member was seeked over, never read


class NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        out = self._b.read(n)
        self.bytes_read += len(out)
        return out


def test_too_many_members_per_sample_stops_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tario, "MAX_FIELDS", 10)
    payload = bytes(range(256)) * 8

    def build(t):
        _good(t, "a")
        for i in range(40):
            _member(t, f"many.{i:02d}.rgba.png", payload)
        _good(t, "z")

    data = _tar(tmp_path, build)
    got, handler, stream = _samples(data, CountingStream)
    assert _keys(got) == ["a", "z"] and handler.count == 1
    # at most the first 10 members of "many" were read; the other 30 were seeked over
    assert stream.bytes_read < len(data) - 30 * len(payload)


@pytest.mark.parametrize("names", [
    ["../evil.meta.json", "../evil.00.rgba.png"],
    ["a/b.meta.json", "a/b.00.rgba.png"],
    ["x/../../etc/passwd.meta.json"],
    ["/abs.meta.json"],
    ["ok.script.py"],  # a field name docs/CONTRACTS.md does not have
    ["ok.00.rgba.png", "ok.00.rgba.png"],  # a duplicate field
    ["ok.1000.rgba.png"],  # view index beyond MAX_VIEWS
])
def test_bad_keys_and_field_names_are_skipped_and_never_written(tmp_path, monkeypatch, names):
    monkeypatch.chdir(tmp_path)

    def build(t):
        _good(t, "a")
        for n in names:
            _member(t, n, b"payload")
        _good(t, "c")

    data = _tar(tmp_path, build)
    before = sorted(p for p in tmp_path.rglob("*"))
    got, handler, _ = _samples(data)
    assert _keys(got) == ["a", "c"] and handler.count >= 1
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing extracted anywhere
    assert not (tmp_path.parent / "evil.meta.json").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE])
def test_link_and_special_members_reject_their_sample(tmp_path, kind):
    target = tmp_path / "secret.txt"
    target.write_text("secret")

    def build(t):
        _good(t, "a")
        _member(t, "b.meta.json", b"{}")
        _member(t, "b.00.rgba.png", kind=kind, link=str(target))
        _good(t, "c")

    data = _tar(tmp_path, build)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:  # the independent reader sees the link member
        assert [m.type for m in t.getmembers() if m.name == "b.00.rgba.png"] == [kind]
    got, handler, _ = _samples(data)
    assert _keys(got) == ["a", "c"] and handler.count == 1
    assert all(b"secret" not in v for s in got for k, v in s.items() if not k.startswith("__"))


def _base256_size(data: bytes, member_index: int, size: int) -> bytes:
    """Rewrite the size field of the member_index-th header as GNU base-256, fixing the checksum."""
    buf = bytearray(data)
    off = 0
    for _ in range(member_index):
        old = tarfile.TarInfo.frombuf(bytes(buf[off:off + 512]), "utf-8", "surrogateescape")
        off += 512 + -(-old.size // 512) * 512
    buf[off + 124:off + 136] = b"\x80" + size.to_bytes(11, "big")
    buf[off + 148:off + 156] = b" " * 8
    buf[off + 148:off + 155] = b"%06o\0" % sum(buf[off:off + 512])
    return bytes(buf)


def test_base256_size_fields_read_as_tarfile_reads_them(tmp_path):
    def build(t):
        _good(t, "a")
        _good(t, "c")

    data = _tar(tmp_path, build)
    # a small size in base-256 (legal): both readers agree on the member
    same = _base256_size(data, 1, len(b"png bytes of a"))
    with tarfile.open(fileobj=io.BytesIO(same)) as t:
        want = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    assert list(tar_members(io.BytesIO(same))) == want
    # a huge one (2**40 bytes): tarfile agrees on the size; ours refuses to read it, the sample is lost and
    # the shard ends there (the data it claims is not there), counted
    huge = _base256_size(data, 1, 2**40)
    hdr = huge[512 + 512:512 + 1024]  # member 1 follows member 0's header and one data block
    assert tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape").size == 2**40
    got, handler, _ = _samples(huge)
    assert _keys(got) == [] and handler.count >= 1


def test_systematic_failures_raise_instead_of_looping(tmp_path):
    def build(t):
        for i in range(8):
            _member(t, f"k{i}.bogus.txt", b"x")

    got, handler, _ = _samples(_tar(tmp_path, build))
    assert got == [] and handler.count == 8  # finite pass: all counted, no error
    with pytest.raises(DataStalled, match="5 shards/samples in a row.*bogus.txt"):
        _samples(_tar(tmp_path, build), max_consecutive=5)
    h = SkipCounter(max_warnings=0, max_consecutive=3)
    h(ValueError("1"))
    h(ValueError("2"))
    with pytest.raises(DataStalled, match="ValueError: 3"):  # three failures and nothing decoded at all
        h(ValueError("3"))
    h = SkipCounter(max_warnings=0, max_consecutive=3)
    h.ok()  # something decodes: a run of failures after it is bad shards, handled by the shard budget
    for i in range(10):
        assert h(ValueError(str(i)))


def test_npz_reader_matches_numpy_on_every_header_form():
    """read_npz (fast header path and numpy's fallback) returns what np.load returns: dtypes, byte orders,
    Fortran order, scalars, empty and long shapes, .npy 2.0; object arrays and lying headers are refused."""
    arrays = {"f4": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "big": np.arange(5, dtype=">f8"),
              "scalar": np.int32(7), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "bool": np.array([True, False]), "empty": np.zeros((0, 4), np.uint16),
              "long": np.zeros((1,) * 20, np.int8), "u": np.array(["ab", "c"])}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    got, ref = tario.read_npz(buf.getvalue(), 1 << 20), np.load(io.BytesIO(buf.getvalue()))
    assert got.keys() == set(ref.files)
    for k in ref.files:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and np.array_equal(got[k], ref[k]), k
        assert got[k].flags.f_contiguous == ref[k].flags.f_contiguous
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, arrays["f4"], version=(2, 0))
    assert np.array_equal(tario._npy(v2.getvalue(), "v2"), arrays["f4"])
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        tario._npy(pickled.getvalue(), "obj")
    one = io.BytesIO()
    np.save(one, arrays["f4"])
    with pytest.raises(ValueError, match="header says"):
        tario._npy(one.getvalue()[:-4], "short")
    with pytest.raises(ValueError, match="not a .npy"):
        tario._npy(b"\x93NUMPY\x03\x00" + one.getvalue()[8:], "v3")


def test_npz_member_whose_directory_lies_is_never_inflated_past_its_declared_size():
    """An .npz whose zip directory (central and local headers) declares 1 kB for a member that deflates to
    64 MB: refused, having inflated about the declared size (tracemalloc: the peak stays far below 64 MB;
    zipfile's own read() inflates the whole stream before cutting it)."""
    import tracemalloc
    import zipfile

    big = np.zeros(64 << 20, np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, a=big)
    data = bytearray(buf.getvalue())
    real = (64 << 20) + 128  # the .npy header
    declared = struct_le(1024)
    n = 0
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory entry
        at = data.find(sig)
        while at >= 0:
            size = int.from_bytes(data[at + off:at + off + 4], "little")
            if size >= real - 1024:
                data[at + off:at + off + 4] = declared
                n += 1
            at = data.find(sig, at + 1)
    assert n == 2
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert zf.infolist()[0].file_size == 1024  # the lie, as every reader sees it
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            tario.read_npz(bytes(data), limit=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data) + (8 << 20), peak  # the input and small pieces; never the 64 MB


def struct_le(n: int) -> bytes:
    return n.to_bytes(4, "little")


def test_shuffle_buffer_holds_at_most_its_byte_budget():
    """10 MB samples through a 1000-sample buffer with a 35 MB budget: never more than 4 held (the
    producer/consumer count, independent of the buffer's own bookkeeping), every sample comes out once,
    in another order."""
    import random

    produced = [0]

    def source():
        for i in range(40):
            produced[0] += 1
            yield {"__key__": f"s{i}", "x.png": bytes(10 << 20)}

    out, held = [], []
    for s in tario.shuffle_bounded(source(), max_samples=1000, max_bytes=35 << 20, rng=random.Random(0)):
        held.append(produced[0] - len(out))
        out.append(s["__key__"])
    assert max(held) <= 4 and sorted(out) == sorted(f"s{i}" for i in range(40)) and out != sorted(out)
    small = list(tario.shuffle_bounded(({"__key__": str(i)} for i in range(50)), 8, 0, random.Random(1)))
    assert sorted(small, key=lambda s: int(s["__key__"])) == [{"__key__": str(i)} for i in range(50)]
