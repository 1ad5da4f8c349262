"""Shard reading for the loader: shard URLs -> raw samples {"__key__", field: bytes}, nothing decoded.

A small streaming tar reader (Python's `tarfile` is slower than decoding the picked PNGs at demo size) that
keeps only the members a sample needs, URL expansion and opening (local, `pipe:`, http(s), fsspec), the
handler that skips and counts corrupt shards and samples, and a bounded `.npz` reader. `training.data.stream`
builds its pipeline on it.

Shards are untrusted input (they may come from anywhere by URL), so memory is bounded before anything is
read: a member over MAX_FIELD_BYTES, a sample with more than MAX_FIELDS members or MAX_SAMPLE_BYTES of kept
data, a field name outside the contract's (FIELD_RE), a key that is not a uid (core.layout.UID_RE: no `/`, no
`..`), a duplicate field, or a member that is not a regular file (symlink, hard link, device, folder) makes
the sample skipped and counted; its members are never extracted anywhere. `.npz` members are sized from the
zip directory and the `.npy` headers before any array is allocated (no zip or shape bombs).
"""

from __future__ import annotations

import glob
import io
import math
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np

from core.layout import FIELD_RE, MAX_FIELD_BYTES, MAX_VIEWS, UID_RE

MAX_FIELDS = 3 + len(("rgba", "depth", "normal")) * MAX_VIEWS  # members of one sample, kept or not
MAX_SAMPLE_BYTES = 512 << 20  # kept (read) bytes of one sample
MAX_HEADER_RECORD = 64 << 10  # a pax / GNU long-name record; ours are a few hundred bytes
SKIP_CHUNK = 1 << 20  # skipping a member on a stream reads it in pieces of this size, never at once


class Rejected:
    """`tar_members`' data for a member that must not be read (not a regular file, or oversize)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Rejected({self.reason!r})"


class DataStalled(RuntimeError):
    """Too many shards/samples in a row failed: the data (or the config asking it) is broken, not one sample."""


class SkipCounter:
    """A WebDataset handler: warn about a corrupt shard or sample, count it, keep going.

    With `max_consecutive` > 0, that many failures in a row with no good sample between them (`ok()` resets
    the run) raise DataStalled naming the last reason: a resampled stream is infinite, so a systematic error
    (every sample fails, e.g. more views asked than rendered, or every shard URL unreachable) would otherwise
    loop forever printing warnings.
    """

    def __init__(self, max_warnings: int = 20, max_consecutive: int = 0):
        self.count = 0
        self.consecutive = 0
        self.max_warnings = max_warnings
        self.max_consecutive = max_consecutive

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        self.consecutive += 1
        if self.count <= self.max_warnings:
            warnings.warn(f"skipping corrupt shard/sample ({type(exn).__name__}: {str(exn)[:300]})", stacklevel=2)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise DataStalled(f"{self.consecutive} shards/samples in a row failed and none decoded; the last: "
                              f"{type(exn).__name__}: {str(exn)[:500]}") from exn
        return True

    def ok(self) -> None:
        """A sample decoded: the run of failures is over."""
        self.consecutive = 0


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A list, a `::`-separated string, brace notation (`train-{000000..000009}.tar`) or a local glob."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for u in items:
        for e in wds_expand(u):
            if urlparse(e).scheme in ("", "file") and any(c in e for c in "*?["):
                out.extend(sorted(glob.glob(e.removeprefix("file:"))))
            else:
                out.append(e)
    return out


def open_url(url: str) -> Any:
    """Local path / `file:` / `pipe:cmd` / http(s) etc. through WebDataset's gopen; other schemes via fsspec."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # object storage (s3://, gcs://, ...) where the matching fsspec backend is installed

    return fsspec.open(url, "rb").open()


def open_stage(src: Iterator[dict], handler: SkipCounter) -> Iterator[dict]:
    for s in src:
        try:
            yield {**s, "stream": open_url(s["url"])}
        except Exception as e:
            handler(e)


def _read_exact(f: Any, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        c = f.read(n - got)
        if not c:
            raise EOFError(f"truncated tar: wanted {n} bytes, got {got}")
        chunks.append(c)
        got += len(c)
    return b"".join(chunks)


def _skip_bytes(f: Any, n: int) -> None:
    """Move n bytes on: a seek on local files (unread members never leave the disk cache), a read in
    SKIP_CHUNK pieces on streams (pipes, HTTP). Seeking past the end is caught by the next header read."""
    if n <= 0:
        return
    seekable = getattr(f, "seekable", None)
    if seekable is not None and seekable():
        f.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        n -= len(_read_exact(f, min(n, SKIP_CHUNK)))


def _number(field: bytes) -> int:
    """A tar numeric field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80, as tarfile reads it)."""
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:
            raise ValueError("negative base-256 number in a tar header")
        return int.from_bytes(field[1:], "big")
    text = field.strip(b" \0")
    return int(text, 8) if text else 0


def tar_members(f: Any, skip: Any = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the members of a tar stream: data is the bytes of a regular file, None where
    `skip(name)` is true (not read), or a `Rejected` for a member that is never read (not a regular file:
    symlink, hard link, device, folder; or over MAX_FIELD_BYTES). Callers decide what a rejection means.

    A small ustar/pax/GNU-longname reader: Python's `tarfile` spends ~0.3 ms per member building TarInfo
    objects, which at ~100 members per sample costs more than decoding the 8 picked PNGs at demo size.
    Checksums are verified; a short read, a bad checksum or an oversize pax record raises (the handler
    skips the rest of the shard).
    """
    long_name: str | None = None
    while True:
        hdr = f.read(512)
        if not hdr:
            raise EOFError("truncated tar: no end-of-archive blocks")
        if len(hdr) < 512:
            hdr += _read_exact(f, 512 - len(hdr))
        if hdr == bytes(512):
            return
        chk = hdr[148:156]
        if _number(chk) != sum(hdr) - sum(chk) + 256:  # the checksum field counts as 8 spaces
            raise ValueError("tar header checksum mismatch (corrupt shard)")
        size, kind = _number(hdr[124:136]), hdr[156:157]
        padded = -(-size // 512) * 512
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        if kind in (b"x", b"L", b"g"):  # pax / GNU long-name records describe the next member
            if size > MAX_HEADER_RECORD:
                raise ValueError(f"tar {kind.decode()} record of {size} bytes exceeds {MAX_HEADER_RECORD}")
            data = _read_exact(f, padded)[:size]
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8")
            elif kind == b"x":
                for rec in data.decode("utf-8").split("\n"):
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
            continue
        name, long_name = long_name or name, None
        regular = kind in (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader
        if not regular or size > MAX_FIELD_BYTES:
            _skip_bytes(f, padded)
            why = (f"member of {size} bytes exceeds {MAX_FIELD_BYTES}" if regular
                   else f"not a regular file (tar type {kind!r})")
            yield name, Rejected(why)
            continue
        if skip is not None and skip(name):
            _skip_bytes(f, padded)
            yield name, None
            continue
        data = _read_exact(f, size)  # exactly the member: slicing off the padding would copy it again
        _skip_bytes(f, padded - size)
        yield name, data


def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, field), split at the first dot as WebDataset does (the key keeps any folder)."""
    key, _, field = name.partition(".")
    return key, field


def check_member(key: str, field: str) -> str | None:
    """Why a member may not be part of a sample (None if it may): key a uid, field one of the contract's names."""
    if not UID_RE.match(key):
        return f"key {key[:80]!r} is not a uid ([A-Za-z0-9_-]{{1,64}}: no '/', no '..')"
    m = FIELD_RE.match(field)
    if m is None:
        return f"field {field[:80]!r} is not one of the contract's sample fields"
    if m.group(2) is not None and int(m.group(2)) >= MAX_VIEWS:
        return f"view index {m.group(2)} >= {MAX_VIEWS}"
    return None


class _Sample:
    """The sample being assembled from consecutive members of one key, with its bounds."""

    def __init__(self, key: str, url: str):
        self.fields: dict[str, Any] = {"__key__": key, "__url__": url}
        self.key, self.url = key, url
        self.bad: str | None = None
        self.members, self.bytes = 0, 0
        self.seen: set[str] = set()

    def add(self, field: str, data: bytes | Rejected | None, why: str | None) -> None:
        """Add a member; `why` is check_member(key, field) of it."""
        self.members += 1
        if self.bad is not None:
            return
        if why is None and isinstance(data, Rejected):
            why = f"{field}: {data.reason}"
        elif why is None and field in self.seen:
            why = f"field {field} appears twice"
        elif why is None and self.members > MAX_FIELDS:
            why = f"more than {MAX_FIELDS} members"
        elif why is None and data is not None:
            self.bytes += len(data)
            if self.bytes > MAX_SAMPLE_BYTES:
                why = f"more than {MAX_SAMPLE_BYTES} bytes of fields"
        if why is not None:
            self.bad = why
            self.fields = {"__key__": self.key, "__url__": self.url}  # drop what was kept: free it now
            return
        self.seen.add(field)
        if data is not None:
            self.fields[field] = data

    def finish(self, handler: SkipCounter) -> dict | None:
        """The sample's fields, or None after handing a bad sample to `handler`."""
        if self.bad is None:
            return self.fields
        handler(ValueError(f"sample {self.key[:80]!r} in {self.url}: {self.bad}"))
        return None


def _shard_samples(stream: Any, url: str, handler: SkipCounter, skip: Any) -> Iterator[dict]:
    cur: _Sample | None = None
    parsed: tuple[str, str, str, str | None] = ("", "", "", None)  # the last name's (name, key, field, why)

    def parse(name: str) -> tuple[str, str, str, str | None]:
        nonlocal parsed
        if parsed[0] != name or not name:
            key, field = _split_name(name)
            parsed = (name, key, field, check_member(key, field))
        return parsed

    def skip_member(name: str) -> bool:
        _, key, field, why = parse(name)
        if cur is not None and key == cur.key and cur.bad is not None:
            return True  # the sample is already lost: read nothing more of it
        if why is not None:
            return True  # never read a foreign member; its sample is rejected in _Sample.add
        return skip is not None and skip(name)

    for name, data in tar_members(stream, skip_member):
        _, key, field, why = parse(name)
        if key.startswith("__") and "/" not in key:
            continue  # WebDataset's own bookkeeping members (e.g. __index__) are not samples
        if cur is not None and key != cur.key:
            done = cur.finish(handler)
            if done is not None:
                yield done
            cur = None
        if cur is None:
            cur = _Sample(key, url)
        cur.add(field, data, why)
    if cur is not None:
        done = cur.finish(handler)
        if done is not None:
            yield done


def tar_samples(src: Iterator[dict], handler: SkipCounter, skip: Any = None) -> Iterator[dict]:
    """Opened shards -> samples {"__key__", "__url__", field: bytes}, consecutive members grouped by key.

    Keys split at the first dot of the name, as WebDataset does. A sample breaking a bound (module
    docstring) is dropped and handed to `handler`; members after the breach are not read. A shard that
    breaks mid-way yields the samples before the break and drops the incomplete one.
    """
    for s in src:
        try:
            yield from _shard_samples(s["stream"], s["url"], handler, skip)
        except DataStalled:
            raise
        except Exception as e:
            handler(e)
        finally:
            close = getattr(s["stream"], "close", None)
            if close:
                close()


# The header numpy writes, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (32, 4, 4), }: read by a
# regular expression (numpy's reader runs ast.literal_eval, ~40 µs a header, four per sample); anything
# else goes to numpy's reader.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[A-Za-z]\d{0,2})', 'fortran_order': (True|False), "
                         r"'shape': \(((?:\d{1,18}, ?){0,32}\d{0,18})\), \} *\n?")


def _npy(buf: bytes, name: str) -> np.ndarray:
    """One `.npy` image -> array, its header checked against the bytes there before anything is allocated."""
    if buf[:6] != b"\x93NUMPY" or buf[6:8] not in (b"\x01\x00", b"\x02\x00"):
        raise ValueError(f"{name}: not a .npy of version 1.0 or 2.0")
    n = 2 if buf[6] == 1 else 4
    start = 8 + n + int.from_bytes(buf[8:8 + n], "little")
    m = _NPY_HEADER.fullmatch(buf[8 + n:start].decode("latin1"))
    if m is not None:
        shape = tuple(int(x) for x in m[3].split(",") if x.strip())
        fortran, dtype = m[2] == "True", np.dtype(m[1])
    else:
        f = io.BytesIO(buf)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        start = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}: object arrays are not data")
    count = math.prod(shape)  # Python ints: no overflow on a crafted shape
    if count * dtype.itemsize != len(buf) - start:
        raise ValueError(f"{name}: header says {shape} {dtype}, {len(buf) - start} bytes follow")
    return np.frombuffer(buf, dtype, count=count, offset=start).reshape(shape, order="F" if fortran else "C")


def read_npz(data: bytes, limit: int, name: str = "npz", max_members: int = 16) -> dict[str, np.ndarray]:
    """An `.npz` (zip of `.npy`) from untrusted bytes -> {key: read-only array}, at most `limit` bytes unpacked.

    The zip directory's uncompressed sizes are summed before anything is inflated (a zip bomb is refused
    from its directory), zipfile never returns more than a member's declared size (a lying directory fails
    its CRC), and each `.npy` header must match its data exactly; no pickles.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ValueError(f"{name}: {len(infos)} members, at most {max_members}")
            total = sum(i.file_size for i in infos)
            if total > limit:
                raise ValueError(f"{name}: {total} bytes uncompressed, above the {limit}-byte bound")
            out = {}
            for info in infos:
                key = info.filename.removesuffix(".npy")
                out[key] = _npy(zf.read(info), f"{name}:{info.filename}")
            return out
    except zipfile.BadZipFile as e:
        raise ValueError(f"{name}: not a readable npz ({e})") from None
