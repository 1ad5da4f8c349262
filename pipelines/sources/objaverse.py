"""`SOURCE=objaverse`: Objaverse 1.0 through the real `objaverse` package, with a configurable cache root.

The package (0.1.7) keeps everything under `objaverse._VERSIONED_PATH` (`<root>/hf-objaverse-v1/`):
`object-paths.json.gz` (uid -> `glbs/<shard>/<uid>.glb`), `metadata/<shard>.json.gz` (annotations),
`lvis-annotations.json.gz` and `glbs/`. Its own readers download a missing annotation file straight to its
final path (a cut-off or concurrent download leaves a truncated file, then EOFError), read it whole (a
gzip bomb is read whole) and trust what it says (an object path is joined to the cache root as given).
So annotation files are read here, never by the package: `load_annotation` fetches a missing or corrupt
one under a temporary name and renames it only once it parses, and decompresses it in pieces up to
`data.max_annotation_bytes`; a bad one is moved aside and fetched again, and if that fails the uids it
covers become failed rows with the reason.

Every uid must be Objaverse's (32 lower-case hex digits) and every object path the real layout
(`glbs/NNN-NNN/<uid>.glb`): anything else, and any annotation that is not the JSON object it should be,
is a failed row with its reason, before any file is touched. The package is then called for downloads
only (`load_objects`), with its uid -> path lookup answered from the checked object path, so it never
writes or deletes outside its cache. GLBs (which the package writes via `.tmp` + rename) are verified
after `load_objects` (glTF magic, header length, size against the annotation); a bad cached file (at the
checked path) is removed and fetched again, up to `retries` times.

`data.objaverse_mirror` replaces the Hugging Face base URL (a mirror, or a local server in tests): it is
installed as a urllib opener, urllib's own extension point, so the package's downloads go there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.config import DataConfig
from core.io import atomic_path
from core.layout import path_inside, read_uid_list
from pipelines.assets import VerifyError, ok_row, place_file, verify_file
from pipelines.filter import annotation_problem, annotations_to_table

HF_BASE = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
OBJECT_PATHS = "object-paths.json.gz"
LVIS = "lvis-annotations.json.gz"
UID_RE = re.compile(r"^[0-9a-f]{32}$")  # Objaverse 1.0 uids
OBJECT_PATH_RE = re.compile(r"^glbs/(\d{3}-\d{3})/([0-9a-f]{32})\.glb$")  # the dataset's layout
MAX_ANNOTATION_BYTES = 256 * 2**20  # default of data.max_annotation_bytes


class AnnotationError(RuntimeError):
    """An annotation file that is missing and cannot be fetched, or is corrupt; the message is the reason."""

    reason_only = True


def configure(cache: str = "") -> Path:
    """Point the package at `cache` (the folder holding `hf-objaverse-v1/`); return the versioned path."""
    import objaverse

    root = Path(cache).expanduser() if cache else Path(os.path.expanduser("~")) / ".objaverse"
    objaverse.BASE_PATH = str(root)
    objaverse._VERSIONED_PATH = str(root / "hf-objaverse-v1")
    return Path(objaverse._VERSIONED_PATH)


class _MirrorHandler(urllib.request.BaseHandler):
    """Rewrites Hugging Face URLs of the dataset to a mirror before any request is opened."""

    def __init__(self, mirror: str):
        self.mirror = mirror.rstrip("/")

    def _rewrite(self, req: urllib.request.Request) -> urllib.request.Request:
        if req.full_url.startswith(HF_BASE):
            req.full_url = self.mirror + req.full_url[len(HF_BASE):]
        return req

    http_request = https_request = _rewrite


def install_network(mirror: str = "", timeout_s: float | None = None) -> None:
    """Route the package's urllib downloads through `mirror` (if set); bound each socket wait by `timeout_s`."""
    if timeout_s:
        socket.setdefaulttimeout(timeout_s)  # urlretrieve has no timeout argument; a hang becomes an error
    handlers: list[Any] = [_MirrorHandler(mirror)] if mirror else []
    urllib.request.install_opener(urllib.request.build_opener(*handlers))


def url_for(rel: str, mirror: str = "") -> str:
    return f"{(mirror.rstrip('/') if mirror else HF_BASE)}/{rel}"


def read_json_gz(path: Path, max_bytes: int = MAX_ANNOTATION_BYTES) -> Any:
    """A .json.gz decompressed in pieces, never past `max_bytes` (a gzip bomb stops there), then parsed.
    Raises AnnotationError naming the file: corrupt, truncated, too large or not JSON."""
    out = bytearray()
    try:
        with open(path, "rb") as f:
            d, data, in_member = zlib.decompressobj(wbits=31), b"", False
            while True:
                if not data:
                    data = f.read(1 << 20)
                    if not data:
                        break
                in_member = True
                out += d.decompress(data, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise AnnotationError(f"annotation file {path.name} decompresses to more than {max_bytes} "
                                          "bytes (data.max_annotation_bytes); refused")
                data = d.unconsumed_tail
                if d.eof:  # a member ended; another may follow (gzip allows several), or zero padding
                    data, d, in_member = d.unused_data + data, zlib.decompressobj(wbits=31), False
                    if not data.strip(b"\0"):
                        data = b""
            if in_member:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
        return json.loads(out)
    except AnnotationError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"corrupt annotation file {path.name}: {type(e).__name__}: {e}") from None


def load_annotation(rel: str, mirror: str = "", retries: int = 2, timeout_s: float = 60.0,
                    max_bytes: int = MAX_ANNOTATION_BYTES) -> Any:
    """The parsed `<versioned>/<rel>` (.json.gz), fetched first if missing or corrupt.

    An existing file that does not parse is moved aside (`<name>.corrupt`) and fetched again; the fetch
    goes to a temporary name and is renamed only once it parses, so a concurrent or killed worker never
    leaves a truncated file under the final name. Raises `AnnotationError` with the reason.
    """
    import objaverse

    local = Path(objaverse._VERSIONED_PATH) / rel
    if local.exists():
        try:
            return read_json_gz(local, max_bytes)
        except AnnotationError as e:
            first = str(e)
            with contextlib.suppress(FileNotFoundError):  # another worker moved it first
                os.replace(local, local.with_name(local.name + ".corrupt"))
    else:
        first = f"{rel} not in the cache"
    last = ""
    for attempt in range(max(1, retries)):
        try:
            with atomic_path(local) as tmp:
                with urllib.request.urlopen(url_for(rel, mirror), timeout=timeout_s) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                doc = read_json_gz(tmp, max_bytes)
            return doc
        except AnnotationError as e:
            last = str(e)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            last = f"cannot fetch {rel}: {type(e).__name__}: {getattr(e, 'reason', None) or e}"
        if attempt + 1 < retries:
            time.sleep(min(2.0, 0.2 * 2**attempt))
    raise AnnotationError(f"{first}; {last}" if "corrupt" in first or "refused" in first else last)


def ensure_annotation(rel: str, mirror: str = "", retries: int = 2, timeout_s: float = 60.0,
                      max_bytes: int = MAX_ANNOTATION_BYTES) -> Path:
    """Make `<versioned>/<rel>` a complete, parseable .json.gz (see `load_annotation`); return its path."""
    import objaverse

    load_annotation(rel, mirror, retries, timeout_s, max_bytes)
    return Path(objaverse._VERSIONED_PATH) / rel


def object_path_problem(uid: Any, path: Any) -> str | None:
    """Why (uid, object path) from object-paths.json.gz is not Objaverse's (None when it is)."""
    if not isinstance(uid, str) or not UID_RE.match(uid):
        return f"not an Objaverse uid (32 hex digits): {str(uid)[:80]!r}"
    m = OBJECT_PATH_RE.match(path) if isinstance(path, str) else None
    if m is None or m.group(2) != uid:
        return f"object path {str(path)[:120]!r} is not glbs/NNN-NNN/{uid}.glb"
    return None


def _failed(uid: str, reason: str) -> dict[str, Any]:
    return {"uid": uid, "status": "failed", "reason": reason, "source": "objaverse", "locator": uid}


def candidates(cfg: DataConfig) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Annotations of the candidate uids as a pyarrow table (CANDIDATE_SCHEMA), and failed rows.

    With `uid_allowlist`, only those uids are looked at (unknown ones fail with `unknown uid`); otherwise
    every uid of object-paths.json.gz. A uid or object path that is not Objaverse's, a metadata shard that
    cannot be fetched or is corrupt, an annotation that is not an object: failed rows with the reason.
    The candidates' `locator` is their checked object path (what `fetch` downloads).
    """
    configure(cfg.objaverse_cache)
    install_network(cfg.objaverse_mirror, cfg.download_timeout_s)
    allow = read_uid_list(cfg.uid_allowlist) if cfg.uid_allowlist else None
    get = {"mirror": cfg.objaverse_mirror, "retries": cfg.download_retries, "timeout_s": cfg.download_timeout_s,
           "max_bytes": cfg.max_annotation_bytes}

    def whole_file_failed(reason: str) -> tuple[pa.Table, list[dict[str, Any]]]:
        # no uid is known without object-paths: key the failure by the allow-list, or by the file itself
        failed = [_failed(u, reason) for u in sorted(allow)] if allow else [_failed(OBJECT_PATHS, reason)]
        return annotations_to_table({}), failed

    try:
        object_paths = load_annotation(OBJECT_PATHS, **get)
    except AnnotationError as e:
        return whole_file_failed(str(e))
    if not isinstance(object_paths, dict):
        return whole_file_failed(f"{OBJECT_PATHS} holds a {type(object_paths).__name__}, not an object of "
                                 "uid -> object path")
    failed: list[dict[str, Any]] = []
    if allow is not None:
        failed += [_failed(u, "unknown uid (not in object-paths.json.gz)") for u in sorted(allow - set(object_paths))]
    by_shard: dict[str, list[str]] = {}
    for u, rel in object_paths.items():
        if allow is not None and u not in allow:
            continue
        problem = object_path_problem(u, rel)
        if problem is not None:
            failed.append(_failed(str(u)[:200], problem))
            continue
        by_shard.setdefault(OBJECT_PATH_RE.match(rel).group(1), []).append(u)  # type: ignore[union-attr]
    annotations: dict[str, dict] = {}
    for shard, members in sorted(by_shard.items()):
        try:
            meta = load_annotation(f"metadata/{shard}.json.gz", **get)
            if not isinstance(meta, dict):
                raise AnnotationError(f"metadata/{shard}.json.gz holds a {type(meta).__name__}, not an object "
                                      "of uid -> annotation")
        except AnnotationError as e:
            failed += [_failed(u, str(e)) for u in members]
            continue
        for u in members:
            a = meta.get(u)
            problem = "no annotation for uid in its metadata shard" if a is None else annotation_problem(a)
            if problem is not None:
                failed.append(_failed(u, problem))
            else:
                annotations[u] = a
    lvis: dict[str, str] = {}
    if cfg.lvis_categories:
        try:
            cats = load_annotation(LVIS, **get)
            if not isinstance(cats, dict) or not all(isinstance(m, list) for m in cats.values()):
                raise AnnotationError(f"{LVIS} is not an object of category -> list of uids")
            wanted = set(cfg.lvis_categories)
            lvis = {u: cat for cat, members in cats.items() if cat in wanted for u in members if isinstance(u, str)}
        except AnnotationError as e:
            failed += [_failed(u, str(e)) for u in annotations]
            annotations = {}
    table = annotations_to_table(annotations, lvis)
    located = pa.array([object_paths[u] for u in table["uid"].to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("locator"), "locator", located), failed


@contextlib.contextmanager
def _lookup(uid: str, object_path: str) -> Iterator[None]:
    """Answer the package's uid -> object path lookup with the checked path for the duration of one call:
    `load_objects` would otherwise re-read the whole object-paths file (per call) and join whatever it
    says to the cache root, writing a download there and returning it."""
    import objaverse

    original = objaverse._load_object_paths
    objaverse._load_object_paths = lambda: {uid: object_path}
    try:
        yield
    finally:
        objaverse._load_object_paths = original


def fetch(item: dict, assets_dir: str, cache: str = "", mirror: str = "", retries: int = 3,
          timeout_s: float = 120.0, check_size: bool = True, max_bytes: int | None = None) -> dict[str, Any]:
    """Download step: `objaverse.load_objects([uid])`, verify the glb, hard-link it to `assets_dir/<uid>.glb`.

    The uid and the object path (`item["locator"]`, from `candidates`) are checked first: anything but
    Objaverse's format fails the row before a file is touched."""
    import objaverse

    t0 = time.perf_counter()
    uid = item["uid"]
    object_path = item.get("locator") or ""
    problem = object_path_problem(uid, object_path)
    if problem is not None:
        raise VerifyError(problem)
    ver = configure(cache)
    expected_path = path_inside(ver, object_path)
    dest = path_inside(Path(assets_dir), f"{uid}.glb")
    install_network(mirror, timeout_s)
    expected = item.get("archive_bytes") if check_size else None
    last = ""
    for attempt in range(max(1, retries)):
        try:
            with warnings.catch_warnings(record=True) as caught, _lookup(uid, object_path):
                warnings.simplefilter("always")
                paths = objaverse.load_objects([uid], download_processes=1)
            if uid not in paths:
                msg = "; ".join(str(w.message) for w in caught) or "load_objects returned nothing"
                raise VerifyError(f"unknown uid ({msg})")
            cached = Path(paths[uid])
            if cached.resolve() != expected_path.resolve():  # never act on a path the package made up
                raise VerifyError(f"load_objects returned {str(cached)[:200]!r}, not {expected_path}")
            try:
                verify_file(cached, "glb", expected_bytes=expected, max_bytes=max_bytes)
            except VerifyError:
                cached.unlink(missing_ok=True)  # a bad cached file would be reused by the package forever
                raise
            path = place_file(cached, dest)
            return ok_row(item, path, t0)
        except VerifyError as e:
            if str(e).startswith(("unknown uid", "load_objects returned")):
                raise
            last = str(e)
        except (urllib.error.URLError, OSError, TimeoutError, EOFError) as e:
            last = f"download failed: {type(e).__name__}: {getattr(e, 'reason', None) or e}"
        if attempt + 1 < retries:
            time.sleep(min(5.0, 0.5 * 2**attempt))
    raise VerifyError(f"{last} (after {max(1, retries)} attempts)")
