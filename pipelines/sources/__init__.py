"""Asset sources (`SOURCE=`): what candidates exist, and the step that puts one into OUT/assets.

`candidates(cfg)` returns (table, failed): the candidates for the filter (one row per uid,
`pipelines.filter.CANDIDATE_SCHEMA`) and `failed` manifest rows for what could not even be listed
(an unreadable folder, a corrupt annotation shard, no network). `fetch_step(cfg)` returns
`(step, kwargs)`: a plain picklable function `step(item, **kwargs) -> row` run by the executor. Source
strings are parsed by `core.sources.parse_source` (re-exported here), which evaluation shares.

| source | candidates | fetch |
| --- | --- | --- |
| `procedural` | `procedural_count` generated objects from index `procedural_start` | `sources.procedural.fetch` (writes a .glb) |
| `objaverse` | the package's uids + annotations (+ LVIS) | `sources.objaverse.fetch` (load_objects + verify) |
| `local:<dir>` | every mesh file under `<dir>` | `sources.local.fetch` (verify, link or copy) |
| `gso:<dir>` | `<dir>/<name>/meshes/model.obj` | `sources.gso.fetch` (OBJ + MTL + texture folder) |
| `omniobject3d:<dir>` | `<dir>/raw_scans/<category>/<object_id>/Scan/Scan.obj` | `sources.omniobject3d.fetch` (OBJ + MTL + texture) |
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.config import Config
from core.sources import SOURCE_KINDS, SourceError, parse_source
from pipelines.filter import candidate_table

__all__ = ["SOURCE_KINDS", "SourceError", "assets_dir", "candidates", "fetch_step", "parse_source"]


def candidates(cfg: Config) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Candidate table (`pipelines.filter.CANDIDATE_SCHEMA`) and failed rows of the configured source."""
    # Each source's module is imported when that source is used: their dependencies (trimesh, objaverse)
    # cost seconds to import and a run uses one source.
    kind, arg = parse_source(cfg.source)
    if kind == "procedural":
        from pipelines.sources import procedural

        d = cfg.data
        return candidate_table(procedural.candidates(d.procedural_count, d.procedural_start, d.procedural_preset,
                                                     d.procedural_seed, d.procedural_difficulty)), []
    if kind == "local":
        from pipelines.sources import local

        rows, failed = local.candidates(arg, cfg.data)
        return candidate_table(rows), failed
    if kind == "gso":
        from pipelines.sources import gso

        rows, failed = gso.candidates(arg)
        return candidate_table(rows), failed
    if kind == "omniobject3d":
        from pipelines.sources import omniobject3d

        rows, failed = omniobject3d.candidates(arg)
        return candidate_table(rows), failed
    from pipelines.sources import objaverse

    return objaverse.candidates(cfg.data)


def fetch_step(cfg: Config) -> tuple[Callable[..., dict], dict[str, Any]]:
    """The download step of the configured source and its keyword arguments (plain, picklable values)."""
    kind, arg = parse_source(cfg.source)
    d = cfg.data
    out = str(assets_dir(cfg))
    if kind == "procedural":
        from pipelines.sources import procedural

        return procedural.fetch, {"assets_dir": out, "texture_size": d.procedural_texture_size,
                                  "preset": d.procedural_preset, "seed": d.procedural_seed,
                                  "difficulty": d.procedural_difficulty}
    if kind == "local":
        from pipelines.sources import local

        return local.fetch, {"assets_dir": out, "root": arg, "max_bytes": d.max_file_bytes,
                             "license": d.local_license}
    if kind == "gso":
        from pipelines.sources import gso

        return gso.fetch, {"assets_dir": out, "root": arg, "max_bytes": d.max_file_bytes}
    if kind == "omniobject3d":
        from pipelines.sources import omniobject3d

        return omniobject3d.fetch, {"assets_dir": out, "root": arg, "max_bytes": d.max_file_bytes}
    from pipelines.sources import objaverse

    return objaverse.fetch, {"assets_dir": out, "cache": d.objaverse_cache, "mirror": d.objaverse_mirror,
                             "retries": d.download_retries, "timeout_s": d.download_timeout_s,
                             "check_size": d.check_size,
                             # the downloaded glb is the annotated archive: both caps bound it
                             "max_bytes": min((c for c in (d.max_archive_bytes, d.max_file_bytes) if c > 0), default=0)}


def assets_dir(cfg: Config) -> Path:
    return cfg.out_path / "assets"
