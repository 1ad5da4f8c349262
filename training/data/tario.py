"""Shard reading for the loader: shard URLs -> raw samples {"__key__", field: bytes}, nothing decoded.

A small streaming tar reader (Python's `tarfile` is slower than decoding the picked PNGs at demo size) that
keeps only the members a sample needs, URL expansion and opening (local, http(s) with a read timeout,
`pipe:` only when allowed, fsspec), the handler that skips and counts corrupt shards and samples (and
skips a shard for the rest of a pass once it failed `shard_failure_budget` times), a shuffle buffer
bounded in bytes, and a bounded `.npz` reader. `training.data.stream` builds its pipeline on it.

What opening a URL runs: a local path or `file:` is opened; `http(s)://` is read by urllib in this
process (no subprocess), each read waiting at most `read_timeout_s`; `pipe:<command>` runs `<command>`
through `/bin/sh` (WebDataset's gopen_pipe) and is refused unless `loader.allow_pipe` is true; any other
scheme goes to fsspec (its backend's own timeouts apply). Nothing else is executed.

Shards are untrusted input (they may come from anywhere by URL), so memory is bounded before anything is
read: a member over MAX_FIELD_BYTES, a sample with more than MAX_FIELDS members or MAX_SAMPLE_BYTES of kept
data, a field name outside the contract's (FIELD_RE), a key that is not a uid (core.layout.UID_RE: no `/`, no
`..`), a duplicate field, or a member that is not a regular file (symlink, hard link, device, folder) makes
the sample skipped and counted; its members are never extracted anywhere. `.npz` members are sized from the
zip directory and the `.npy` headers before any array is allocated, and each member is inflated in pieces
that stop at its declared size (a directory that lies about a size never inflates more).
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

    Failures are counted per shard (the URL travels on the exception as `shard_url`): a shard with
    `shard_failure_budget` failures (> 0) is `excluded` for the rest of this stream, with one warning
    naming it, so a poisoned shard costs a few samples, not the run. With `max_consecutive` > 0, that many
    failures before any sample decoded raise DataStalled naming the last reason: a resampled stream is
    infinite, so a systematic error (every sample fails, e.g. more views asked than rendered, or every
    shard URL unreachable) would otherwise loop forever printing warnings.
    """

    def __init__(self, max_warnings: int = 20, max_consecutive: int = 0, shard_failure_budget: int = 0):
        self.count = 0
        self.consecutive = 0
        self.decoded = 0
        self.max_warnings = max_warnings
        self.max_consecutive = max_consecutive
        self.shard_failure_budget = shard_failure_budget
        self.per_shard: dict[str, int] = {}
        self.excluded: dict[str, str] = {}  # shard URL -> its last failure
        self.last = ""

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        self.consecutive += 1
        self.last = f"{type(exn).__name__}: {str(exn)[:500]}"
        url = getattr(exn, "shard_url", None)
        if url:
            n = self.per_shard[url] = self.per_shard.get(url, 0) + 1
            if self.shard_failure_budget and n >= self.shard_failure_budget and url not in self.excluded:
                self.excluded[url] = self.last
                warnings.warn(f"skipping shard {url} for the rest of this pass: {n} failures "
                              f"(loader.shard_failure_budget); the last: {self.last[:300]}", stacklevel=2)
        if self.count <= self.max_warnings:
            warnings.warn(f"skipping corrupt shard/sample ({self.last[:300]})", stacklevel=2)
        if self.max_consecutive and self.consecutive >= self.max_consecutive and not self.decoded:
            raise DataStalled(f"{self.consecutive} shards/samples in a row failed and none decoded; the last: "
                              f"{self.last}") from exn
        return True

    def ok(self) -> None:
        """A sample decoded: the run of failures is over."""
        self.consecutive = 0
        self.decoded += 1


def failed_at(exn: BaseException, url: str | None) -> BaseException:
    """`exn` tagged with the shard it came from (SkipCounter counts failures per shard)."""
    if url and getattr(exn, "shard_url", None) is None:
        try:
            exn.shard_url = url  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without a __dict__: counted, not per shard
            pass
    return exn


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


def open_url(url: str, read_timeout_s: float = 60.0, allow_pipe: bool = False) -> Any:
    """A readable binary stream of `url` (module docstring: what each scheme runs). `read_timeout_s` bounds
    every wait for http(s) bytes: a server that stalls mid-body raises TimeoutError instead of hanging."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return open(url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:"), "rb")
    if scheme in ("http", "https"):
        import urllib.request

        r = urllib.request.urlopen(url, timeout=read_timeout_s)  # the socket timeout holds for every read
        if r.status != 200:
            r.close()
            raise OSError(f"{url}: HTTP {r.status}")
        return r
    if scheme == "pipe":
        if not allow_pipe:
            raise ValueError(f"{url[:200]}: a pipe: URL runs its command through the shell; refused "
                             "(set loader.allow_pipe=true to allow it)")
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec  # object storage (s3://, gcs://, hf://, ...) where the matching fsspec backend is installed

    return fsspec.open(url, "rb").open()


def open_stage(src: Iterator[dict], handler: SkipCounter, read_timeout_s: float = 60.0,
               allow_pipe: bool = False) -> Iterator[dict]:
    for s in src:
        try:
            yield {**s, "stream": open_url(s["url"], read_timeout_s, allow_pipe)}
        except Exception as e:
            handler(failed_at(e, s["url"]))


def shuffle_bounded(src: Iterator[dict], max_samples: int, max_bytes: int, rng: Any) -> Iterator[dict]:
    """A sample shuffle buffer with a budget: it fills up to `max_samples` samples or `max_bytes` bytes of
    their fields (0 = no byte bound), whichever comes first, then releases one sample at random per sample
    that arrives. What the loader holds here is bounded in bytes, whatever the samples weigh."""
    buf: list[tuple[dict, int]] = []
    held = 0

    def release() -> dict:
        nonlocal held
        i = rng.randint(0, len(buf) - 1)
        buf[i], buf[-1] = buf[-1], buf[i]
        sample, size = buf.pop()
        held -= size
        return sample

    for s in src:
        size = sum(len(v) for v in s.values() if isinstance(v, (bytes, bytearray, memoryview)))
        buf.append((s, size))
        held += size
        while buf and (len(buf) >= max_samples or (max_bytes > 0 and held > max_bytes)):
            yield release()
    while buf:
        yield release()


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
        handler(failed_at(ValueError(f"sample {self.key[:80]!r} in {self.url}: {self.bad}"), self.url))
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

    excluded = getattr(handler, "excluded", {})
    for name, data in tar_members(stream, skip_member):
        _, key, field, why = parse(name)
        if key.startswith("__") and "/" not in key:
            continue  # WebDataset's own bookkeeping members (e.g. __index__) are not samples
        if cur is not None and key != cur.key:
            done = cur.finish(handler)
            if done is not None:
                yield done
            cur = None
            if url in excluded:  # this shard used up its failure budget: read no more of it
                return
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
            handler(failed_at(e, s["url"]))
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


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, piece: int = 1 << 16) -> bytes:
    """A zip member's bytes, inflated in `piece`-sized reads that stop at its declared size: `zf.read()`
    inflates the whole compressed stream in one call before cutting it to that size, so a directory that
    lies (declares 1 kB, deflates to 1 GB) would allocate the gigabyte first."""
    chunks, got = [], 0
    with zf.open(info) as f:
        while got <= info.file_size:
            c = f.read(min(piece, info.file_size + 1 - got))
            if not c:
                break
            chunks.append(c)
            got += len(c)
    if got != info.file_size:
        raise ValueError(f"{name}: {got} bytes, the zip directory says {info.file_size}")
    return b"".join(chunks)


def read_npz(data: bytes, limit: int, name: str = "npz", max_members: int = 16) -> dict[str, np.ndarray]:
    """An `.npz` (zip of `.npy`) from untrusted bytes -> {key: read-only array}, at most `limit` bytes unpacked.

    The zip directory's uncompressed sizes are summed before anything is inflated (a zip bomb is refused
    from its directory), each member is inflated in small pieces that stop at its declared size (a lying
    directory fails there, or on its CRC, having inflated at most that size), and each `.npy` header must
    match its data exactly; no pickles.
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
                out[key] = _npy(_read_member(zf, info, f"{name}:{info.filename}"), f"{name}:{info.filename}")
            return out
    except zipfile.BadZipFile as e:
        raise ValueError(f"{name}: not a readable npz ({e})") from None
