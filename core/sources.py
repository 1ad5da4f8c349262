"""The `SOURCE=` vocabulary (`procedural`, `objaverse`, `local:<dir>`, `gso:<dir>`, `omniobject3d:<dir>`),
parsed in one place.

The data stage (pipelines.sources) and evaluation's reading side (core.evalsets) both name sources by
these strings; nothing here lists or fetches anything.
"""

from __future__ import annotations

from pathlib import Path

SOURCE_KINDS = ("procedural", "objaverse", "local", "gso", "omniobject3d")
FOLDER_KINDS = ("local", "gso", "omniobject3d")  # the sources that take a folder


class SourceError(ValueError):
    """A `SOURCE=` value that names no usable source; the message says why."""


def parse_source(text: str) -> tuple[str, str]:
    """`local:/data/meshes` -> ("local", "/abs/data/meshes"); `procedural` -> ("procedural", "").

    Folders must exist; they come back absolute (a relative path names the same folder from anywhere)."""
    kind, _, arg = text.partition(":")
    kind = kind.strip()
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source '{text}' (known: procedural, objaverse, local:<dir>, gso:<dir>, "
                          "omniobject3d:<dir>)")
    if kind in FOLDER_KINDS:
        if not arg:
            raise SourceError(f"source '{kind}' needs a folder: {kind}:<dir>")
        if not Path(arg).expanduser().is_dir():
            raise SourceError(f"source folder not found or not a folder: {arg}")
    elif arg:
        raise SourceError(f"source '{kind}' takes no argument, got '{text}'")
    return kind, str(Path(arg).expanduser().resolve()) if arg else ""
