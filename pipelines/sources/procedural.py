"""The procedural source: candidates (indices, nothing generated yet) and the fetch step that generates one.

`data.procedural_preset` picks the generator: `world` (`pipelines.procedural.world`, the default) or
`basic` (`pipelines.procedural.basic`, 8 shapes x 4 textures). Candidates of indices `start` ..
`start + count - 1`; the evaluation's held-out set takes the indices after training's, so their uids
never meet. Uids: basic `procedural-0042` (as before), world `procedural-w50-s0-000042` (difficulty x 100,
seed, index). The fetch row carries the asset's `description` (JSON: parts, kinds, augmentations,
textures, faces, watertight, ...) and a readable `name`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.sources import SourceError
from pipelines.assets import ok_row
from pipelines.procedural import world
from pipelines.procedural.basic import ATTRIBUTION, LICENSE, describe, make_procedural_asset
from pipelines.procedural.basic import uid_for as basic_uid
from pipelines.procedural.recipe import quantise_difficulty

PRESETS = ("world", "basic")


def check_settings(preset: str, seed: int = 0, difficulty: float = 0.5) -> str:
    """The preset, once its settings are known to be usable; else SourceError with the reason."""
    if preset not in PRESETS:
        raise SourceError(f"unknown data.procedural_preset '{preset}' (known: {', '.join(PRESETS)})")
    if seed < 0:
        raise SourceError(f"data.procedural_seed must be >= 0, got {seed}")
    try:
        quantise_difficulty(difficulty)
    except ValueError as e:
        raise SourceError(f"data.{e}") from None
    return preset


def uid_for(index: int, preset: str = "basic", seed: int = 0, difficulty: float = 0.5) -> str:
    """Uid of procedural asset `index` under a preset (no dots: it is a WebDataset key)."""
    if check_settings(preset, seed, difficulty) == "basic":
        return basic_uid(index)
    return world.uid_for(seed, index, difficulty)


def candidates(count: int, start: int = 0, preset: str = "basic", seed: int = 0,
               difficulty: float = 0.5) -> list[dict[str, Any]]:
    """Candidate rows (the filter's input) for assets `start` .. `start + count - 1`; nothing is generated yet.

    Training uses `start = 0`; the evaluation's held-out set starts after the training indices. Basic:
    `describe` pairs shape `i % 8` with texture `(i + i // 8) % 4`, so indices 8-31 carry (shape, texture)
    combinations that indices 0-7 do not. World: every index is its own recipe.
    """
    if start < 0 or count < 0:
        raise ValueError(f"procedural start and count must be >= 0, got start={start}, count={count}")
    check_settings(preset, seed, difficulty)
    rows = []
    for i in range(start, start + count):
        if preset == "basic":
            shape, tex = describe(i)
            uid, name = basic_uid(i), f"{shape} with {tex} texture #{i}"
        else:
            uid, name = world.uid_for(seed, i, difficulty), f"procedural world asset #{i}"
        rows.append({"uid": uid, "source": "procedural", "name": name, "license": LICENSE,
                     "attribution": ATTRIBUTION, "author": ATTRIBUTION, "source_url": "", "format": "glb",
                     "locator": str(i), "texture_count": 1, "animation_count": 0, "age_restricted": False})
    return rows


def fetch(item: dict, assets_dir: str, texture_size: int = 512, preset: str = "basic", seed: int = 0,
          difficulty: float = 0.5) -> dict[str, Any]:
    """Download step for the procedural source: generate the asset into `assets_dir/<uid>.glb`."""
    t0 = time.perf_counter()
    index = int(item["locator"])
    uid = uid_for(index, preset, seed, difficulty)
    path = Path(assets_dir) / f"{uid}.glb"
    if preset == "basic":
        info = make_procedural_asset(index, path, texture_size)
    else:
        info = world.make_world_asset(seed, index, difficulty, path, texture_size)
    row = ok_row({**item, "uid": uid}, path, t0)
    return {**row, "name": info["name"], "description": world.description_json(info["description"])}
