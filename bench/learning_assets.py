"""A real textured mesh for the learning ladder that a PyPI package ships: the duck of pybullet's `pybullet_data`.

`pybullet_data/duck.obj` (4,212 triangles, UV-mapped), `duck.mtl` and its 32 KB texture `duckCM.png`: the
COLLADA sample duck, "Copyright 2006 Sony Computer Entertainment Inc., licensed under the SCEA Shared Source
License, Version 1.0" (its `duck.dae` says so; the pybullet wheel as a whole is zlib). That licence is not
one of ours, so the files are not copied into the repository: they are read from an installed
`pybullet_data`, or straight out of a pybullet wheel (`pip download pybullet==3.2.7 --no-deps -d DIR`, ~100
MB) named by GTR_PYBULLET_WHEEL or found in a wheel folder, and extracted into a scratch folder at run time.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

DUCK_FILES = ("duck.obj", "duck.mtl", "duckCM.png")
DUCK_UID = "pybullet-duck"
DUCK_LICENSE = "SCEA Shared Source License 1.0 (Sony Computer Entertainment 2006), via pybullet_data (zlib)"
# Where a pybullet wheel may lie besides GTR_PYBULLET_WHEEL: a pip wheel cache / download folder of this machine.
WHEEL_GLOBS = ("/opt/pypi-more/files/pybullet-*.whl", "/tmp/*/pybullet-*.whl")
MISSING = ("the pybullet duck needs pybullet_data: install pybullet, or `pip download pybullet==3.2.7 --no-deps "
           "-d DIR` and set GTR_PYBULLET_WHEEL=DIR/pybullet-3.2.7-....whl")


def _wheel() -> Path | None:
    env = os.environ.get("GTR_PYBULLET_WHEEL", "")
    candidates = [env] if env else []
    for pattern in WHEEL_GLOBS:
        candidates += sorted(glob.glob(pattern))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def pybullet_duck(dest: str | Path) -> dict[str, Any] | None:
    """Put the duck's three files into `dest/pybullet-duck/` and return its render job, or None when neither
    an installed pybullet_data nor a pybullet wheel is at hand (`MISSING` says how to get one)."""
    folder = Path(dest) / DUCK_UID
    if not all((folder / f).is_file() for f in DUCK_FILES):
        folder.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.find_spec("pybullet_data")
        if spec is not None and spec.submodule_search_locations:
            src = Path(list(spec.submodule_search_locations)[0])
            for f in DUCK_FILES:
                shutil.copyfile(src / f, folder / f)
        else:
            wheel = _wheel()
            if wheel is None:
                return None
            with zipfile.ZipFile(wheel) as z:
                for f in DUCK_FILES:
                    (folder / f).write_bytes(z.read(f"pybullet_data/{f}"))
    return {"uid": DUCK_UID, "path": str(folder / "duck.obj"), "format": "obj", "source": "pybullet_data",
            "license": DUCK_LICENSE, "attribution": "Sony Computer Entertainment Inc. (COLLADA sample duck)",
            "name": "pybullet duck"}
