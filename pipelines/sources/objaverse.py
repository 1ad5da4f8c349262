"""`SOURCE=objaverse`: Objaverse 1.0 through the real `objaverse` package, with a configurable cache root.

The package (0.1.7) keeps everything under `objaverse._VERSIONED_PATH` (`<root>/hf-objaverse-v1/`):
`object-paths.json.gz` (uid -> `glbs/<shard>/<uid>.glb`), `metadata/<shard>.json.gz` (annotations),
`lvis-annotations.json.gz` and `glbs/`. It skips any file that already exists, and writes annotation
files with `urlretrieve` straight to their final path, so a download cut off halfway would be reused as
if it were complete. Guard: before the package reads an annotation file, `ensure_annotation` checks that
it is a complete gzip holding JSON; a bad one is moved aside and fetched again under a temporary name
and renamed; if that fails the uids it covers become failed rows with the reason. The package is then
called only on files that are known good. GLBs (which the package does write via `.tmp` + rename) are
verified after `load_objects` (glTF magic, header length, size against the annotation); a bad cached
file is removed and fetched again, up to `retries` times.

`data.objaverse_mirror` replaces the Hugging Face base URL (a mirror, or a local server in tests): it is
installed as a urllib opener, urllib's own extension point, so the package's downloads go there too.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.config import DataConfig
from core.io import atomic_path
from core.layout import read_uid_list
from pipelines.assets import VerifyError, ok_row, place_file, verify_file
from pipelines.filter import annotations_to_table

HF_BASE = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
OBJECT_PATHS = "object-paths.json.gz"
LVIS = "lvis-annotations.json.gz"


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


def _check_json_gz(path: Path) -> Any:
    try:
        with gzip.open(path, "rb") as f:
            return json.load(f)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"corrupt annotation file {path.name}: {type(e).__name__}: {e}") from None


def ensure_annotation(rel: str, mirror: str = "", retries: int = 2, timeout_s: float = 60.0) -> Path:
    """Make `<versioned>/<rel>` a complete, parseable .json.gz before the package reads it.

    An existing file that does not parse is moved aside (`<name>.corrupt`) and fetched again; the fetch
    goes to a temporary name and is renamed only once it parses. Raises `AnnotationError` with the reason.
    """
    import objaverse

    local = Path(objaverse._VERSIONED_PATH) / rel
    if local.exists():
        try:
            _check_json_gz(local)
            return local
        except AnnotationError as e:
            first = str(e)
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
                _check_json_gz(tmp)
            return local
        except AnnotationError as e:
            last = str(e)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            last = f"cannot fetch {rel}: {type(e).__name__}: {getattr(e, 'reason', None) or e}"
        if attempt + 1 < retries:
            time.sleep(min(2.0, 0.2 * 2**attempt))
    raise AnnotationError(f"{first}; {last}" if "corrupt" in first else last)


def _failed(uid: str, reason: str) -> dict[str, Any]:
    return {"uid": uid, "status": "failed", "reason": reason, "source": "objaverse", "locator": uid}


def candidates(cfg: DataConfig) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Annotations of the candidate uids as a pyarrow table (CANDIDATE_SCHEMA), and failed rows.

    With `uid_allowlist`, only those uids are looked at (unknown ones fail with `unknown uid`); otherwise
    every uid of `load_uids()`. A metadata shard that cannot be fetched or is corrupt fails its uids.
    """
    import objaverse

    configure(cfg.objaverse_cache)
    install_network(cfg.objaverse_mirror, cfg.download_timeout_s)
    allow = read_uid_list(cfg.uid_allowlist) if cfg.uid_allowlist else None
    try:
        ensure_annotation(OBJECT_PATHS, cfg.objaverse_mirror, cfg.download_retries, cfg.download_timeout_s)
    except AnnotationError as e:
        # no uid is known without object-paths: key the failure by the allow-list, or by the file itself
        failed = [_failed(u, str(e)) for u in sorted(allow)] if allow else [_failed(OBJECT_PATHS, str(e))]
        return annotations_to_table({}), failed
    object_paths = objaverse._load_object_paths()
    uids = objaverse.load_uids()
    failed: list[dict[str, Any]] = []
    if allow is not None:
        known = set(uids)
        failed += [_failed(u, "unknown uid (not in object-paths.json.gz)") for u in sorted(allow - known)]
        uids = [u for u in uids if u in allow]
    by_shard: dict[str, list[str]] = {}
    for u in uids:
        by_shard.setdefault(object_paths[u].split("/")[1], []).append(u)
    good: list[str] = []
    for shard, members in sorted(by_shard.items()):
        try:
            ensure_annotation(f"metadata/{shard}.json.gz", cfg.objaverse_mirror, cfg.download_retries,
                              cfg.download_timeout_s)
            good += members
        except AnnotationError as e:
            failed += [_failed(u, str(e)) for u in members]
    annotations = objaverse.load_annotations(good) if good else {}
    failed += [_failed(u, "no annotation for uid in its metadata shard") for u in good if u not in annotations]
    lvis: dict[str, str] = {}
    if cfg.lvis_categories:
        try:
            ensure_annotation(LVIS, cfg.objaverse_mirror, cfg.download_retries, cfg.download_timeout_s)
            wanted = set(cfg.lvis_categories)
            lvis = {u: cat for cat, members in objaverse.load_lvis_annotations().items() if cat in wanted
                    for u in members}
        except AnnotationError as e:
            failed += [_failed(u, str(e)) for u in annotations]
            annotations = {}
    return annotations_to_table(annotations, lvis), failed


def fetch(item: dict, assets_dir: str, cache: str = "", mirror: str = "", retries: int = 3,
          timeout_s: float = 120.0, check_size: bool = True, max_bytes: int | None = None) -> dict[str, Any]:
    """Download step: `objaverse.load_objects([uid])`, verify the glb, hard-link it to `assets_dir/<uid>.glb`."""
    import objaverse

    t0 = time.perf_counter()
    configure(cache)
    install_network(mirror, timeout_s)
    uid = item["uid"]
    expected = item.get("archive_bytes") if check_size else None
    last = ""
    for attempt in range(max(1, retries)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                paths = objaverse.load_objects([uid], download_processes=1)
            if uid not in paths:
                msg = "; ".join(str(w.message) for w in caught) or "load_objects returned nothing"
                raise VerifyError(f"unknown uid ({msg})")
            cached = Path(paths[uid])
            try:
                verify_file(cached, "glb", expected_bytes=expected, max_bytes=max_bytes)
            except VerifyError:
                cached.unlink(missing_ok=True)  # a bad cached file would be reused by the package forever
                raise
            path = place_file(cached, Path(assets_dir) / f"{uid}.glb")
            return ok_row(item, path, t0)
        except VerifyError as e:
            if str(e).startswith("unknown uid"):
                raise
            last = str(e)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            last = f"download failed: {type(e).__name__}: {getattr(e, 'reason', None) or e}"
        if attempt + 1 < retries:
            time.sleep(min(5.0, 0.5 * 2**attempt))
    raise VerifyError(f"{last} (after {max(1, retries)} attempts)")
