"""What an asset file may read, decided before Blender opens it, and the private folder it is imported from.

One resolver per format lists every file the importer could load, parsing the file here: `.glb` only
embedded data (buffer 0 as the BIN chunk, base64 `data:` URIs); `.gltf` its `buffers[].uri` and
`images[].uri` (the only URIs Blender's importer opens; texture extensions name images by index); `.obj`
every `mtllib` and, in each MTL, every `map_*` / `bump` / `disp` / `decal` / `refl` / `norm` line; binary
`.fbx` every Video / Texture node's path (Blender's own FBX parser, importable once bpy is); `.ply` and
`.stl` none. Every path is checked lexically (no absolute path, scheme or `..` above the folder) and with
symlinks resolved; a single-file asset may read nothing but itself. Outside references fail the asset
(glb anything, glTF buffers, MTL libraries) or are dropped from the sandbox's rewritten copy of the MTL /
.gltf and recorded as missing textures (the binary FBX is not rewritten: its outside references are
recorded, and the import's own safeguards apply, render.scene). `build_sandbox` links exactly the allowed
files into a private folder, so a reference these parsers missed finds nothing. The table of what is
checked and what happens: docs/render.md "Containment".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 256 * 2**20  # a glTF's JSON (a .gltf, a glb's JSON chunk); real ones are a few MB
MAX_MTL_BYTES = 16 * 2**20  # one MTL library
HEADER_BYTES = 1 << 20  # bytes of an image handed to the header readers (render.files.header_size)
GLB_MAGIC, CHUNK_JSON, CHUNK_BIN = b"glTF", 0x4E4F534A, 0x004E4942
# MTL statements that name a file (lower case; any `map_*` too) and those that only hold numbers or names
MTL_FILE_KEYS = ("bump", "disp", "decal", "refl", "norm")
MTL_VALUE_KEYS = ("newmtl", "ka", "kd", "ks", "ke", "ns", "ni", "d", "tr", "tf", "illum", "sharpness", "pr", "pm",
                  "ps", "pc", "pcr", "aniso", "anisor")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MTLLIB = re.compile(rb"(?m)^[ \t]*mtllib[ \t]+([^\r\n]*)")


class ContainmentError(ValueError):
    """An asset that would read outside its folder, or whose references cannot be parsed; the reason."""

    reason_only = True


ImageSource = Path | bytes | Callable[[], bytes]  # a file, its first bytes, or how to get them


@dataclass
class AssetFiles:
    """The complete list of what one asset may read: the sandbox is built from exactly this."""

    main: str  # sandbox-relative name of the main file
    files: dict[str, Path] = field(default_factory=dict)  # sandbox-relative name -> real file inside the folder
    rewrites: dict[str, bytes] = field(default_factory=dict)  # name -> content replacing the file's own
    refused: list[str] = field(default_factory=list)  # references not provided (become missing_textures)
    images: list[tuple[str, ImageSource]] = field(default_factory=list)  # textures, for the header checks
    triangles: int | None = None  # glTF: triangles after node instancing, from the file's own counts
    instances: int | None = None  # glTF: mesh instances (objects the importer would create)


class _Scope:
    """The folder an asset may read from, and the check every reference goes through."""

    def __init__(self, main: Path, folder: Path | None):
        self.main_real = main.resolve()
        self.single = folder is None  # a single-file asset: no companion file is provided
        self.root = (folder if folder is not None else main.parent).resolve()
        if not self.main_real.is_relative_to(self.root):
            raise ContainmentError(f"the asset file resolves outside its folder ({main.name} is a link elsewhere)")
        self.main_rel = self.main_real.relative_to(self.root).as_posix()

    def lexical(self, base_rel: str, ref: str) -> str | None:
        """`ref` (a relative path as the importer joins it to folder `base_rel`) as a folder-relative name,
        or None when it is absolute, has a scheme or a drive, or climbs above the folder."""
        ref = ref.strip().replace("\\", "/")
        if not ref or ref.startswith("/") or _SCHEME.match(ref):
            return None
        joined = os.path.normpath(os.path.join(base_rel, ref)) if base_rel else os.path.normpath(ref)
        if joined == ".." or joined.startswith("../") or joined.startswith("/"):
            return None
        return Path(joined).as_posix()

    def provide(self, rel: str) -> Path | None | bool:
        """The real file behind folder-relative `rel`: a Path when it is a regular file inside the folder,
        None when it does not exist (nothing to read), False when it resolves (symlinks) outside."""
        real = (self.root / rel).resolve()
        if not real.is_relative_to(self.root):
            return False
        if self.single and real != self.main_real:
            return None
        return real if real.is_file() else None


def _base(rel: str) -> str:
    parent = Path(rel).parent.as_posix()
    return "" if parent == "." else parent


def _glb_parts(path: Path) -> tuple[dict, int, int]:
    """(JSON document, BIN chunk offset, BIN chunk length; 0, 0 without one) of a .glb."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != GLB_MAGIC:
            raise ContainmentError("not a glb: no glTF header")
        json_len, json_type = struct.unpack("<II", head[12:20])
        if json_type != CHUNK_JSON or json_len > min(MAX_JSON_BYTES, size - 20):
            raise ContainmentError(f"glb JSON chunk of {json_len} bytes (type {json_type:#x}) is not a plausible "
                                   f"glTF (at most {MAX_JSON_BYTES} bytes, inside the file)")
        doc = _json(f.read(json_len), "glb JSON chunk")
        bin_off = bin_len = 0
        nxt = f.read(8)
        if len(nxt) == 8:
            length, kind = struct.unpack("<II", nxt)
            if kind == CHUNK_BIN and 28 + json_len + length <= size:
                bin_off, bin_len = 28 + json_len, length
    return doc, bin_off, bin_len


def _json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ContainmentError(f"{what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ContainmentError(f"{what} is not a glTF object")
    return doc


def _entries(doc: dict, key: str) -> list[dict]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(e, dict) for e in items):
        raise ContainmentError(f"malformed glTF: '{key}' is not a list of objects")
    return items


def _data_uri(uri: str) -> bool | None:
    """True for a base64 data: URI, None for another data: URI (Blender's importer would open it as a file
    path), False for anything else."""
    if not uri.startswith("data:"):
        return False
    return True if ";base64," in uri else None


def _b64_head(uri: str, n: int = HEADER_BYTES) -> bytes:
    text = uri[uri.find(";base64,") + len(";base64,"):][: (n // 3 + 1) * 4]
    try:
        return base64.b64decode(text[: len(text) - len(text) % 4])
    except (binascii.Error, ValueError):
        return b""


def _uri_path(uri: str) -> str:
    """What Blender's importer makes of a URI (io_scene_gltf2 uri_to_path): `\\` -> `/`, unquoted."""
    return urllib.parse.unquote(uri.replace("\\", "/"))


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _gltf_counts(doc: dict) -> tuple[int, int]:
    """(triangles, mesh instances) the importer would create: each node once (Blender builds one object per
    node), times its EXT_mesh_gpu_instancing count, times its mesh's triangles from the accessor counts."""
    accessors = doc.get("accessors", []) if isinstance(doc.get("accessors"), list) else []
    meshes = doc.get("meshes", []) if isinstance(doc.get("meshes"), list) else []

    def count(i: Any) -> int:
        return _int(accessors[i].get("count")) if isinstance(i, int) and 0 <= i < len(accessors) and \
            isinstance(accessors[i], dict) else 0

    def mesh_triangles(m: Any) -> int:
        if not (isinstance(m, int) and 0 <= m < len(meshes) and isinstance(meshes[m], dict)):
            return 0
        n = 0
        for p in meshes[m].get("primitives", []) if isinstance(meshes[m].get("primitives"), list) else []:
            if not isinstance(p, dict):
                continue
            attrs = p.get("attributes") if isinstance(p.get("attributes"), dict) else {}
            k = count(p["indices"]) if "indices" in p else count(attrs.get("POSITION"))
            mode = _int(p.get("mode"), 4)
            n += k // 3 if mode == 4 else max(0, k - 2) if mode in (5, 6) else 0
        return n

    triangles = instances = 0
    for node in doc.get("nodes", []) if isinstance(doc.get("nodes"), list) else []:
        if not isinstance(node, dict) or "mesh" not in node:
            continue
        copies = 1
        ext = (node.get("extensions") or {}) if isinstance(node.get("extensions"), dict) else {}
        inst = ext.get("EXT_mesh_gpu_instancing")
        if isinstance(inst, dict) and isinstance(inst.get("attributes"), dict):
            copies = max([count(a) for a in inst["attributes"].values()] or [1])
        instances += copies
        triangles += copies * mesh_triangles(node["mesh"])
    return triangles, instances


def _gltf(scope: _Scope, path: Path, glb: bool) -> AssetFiles:
    out = AssetFiles(main=scope.main_rel)
    if glb:
        doc, bin_off, bin_len = _glb_parts(path)
    else:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ContainmentError(f"gltf JSON above {MAX_JSON_BYTES} bytes")
        doc, bin_off, bin_len = _json(path.read_bytes(), "gltf"), 0, 0
    out.files[scope.main_rel] = scope.main_real
    base = _base(scope.main_rel)
    buffers, images = _entries(doc, "buffers"), _entries(doc, "images")
    views = _entries(doc, "bufferViews")
    for i, b in enumerate(buffers):
        uri = b.get("uri")
        if uri is None:
            if not (glb and i == 0 and bin_len):
                raise ContainmentError(f"buffer {i} has no uri and is not the glb's BIN chunk")
            continue
        if not isinstance(uri, str):
            raise ContainmentError(f"buffer {i}: uri is not a string")
        kind = _data_uri(uri)
        if kind is True:
            continue
        if glb:
            raise ContainmentError(f"a .glb may hold only embedded data: buffer {i} names {uri[:120]!r}")
        _gltf_file(scope, base, uri, f"buffer {i}", out, required=True)
    edited = False
    for i, img in enumerate(images):
        uri = img.get("uri")
        label = str(img.get("name") or f"image {i}")[:120]
        if uri is None:
            view = img.get("bufferView")
            if isinstance(view, int) and 0 <= view < len(views):
                out.images.append((label, _view_head(path, doc, views[view], bin_off, bin_len)))
            continue
        if not isinstance(uri, str):
            raise ContainmentError(f"image {i}: uri is not a string")
        kind = _data_uri(uri)
        if kind is True:
            out.images.append((label, _b64_head(uri)))
            continue
        if glb:
            raise ContainmentError(f"a .glb may hold only embedded data: image {i} names {uri[:120]!r}")
        if not _gltf_file(scope, base, uri, f"image {i}", out, required=False):
            del img["uri"]  # the importer then creates no image for it: nothing to read
            edited = True
    if edited:
        out.rewrites[scope.main_rel] = json.dumps(doc).encode("utf-8")
    out.triangles, out.instances = _gltf_counts(doc)
    return out


def _gltf_file(scope: _Scope, base: str, uri: str, what: str, out: AssetFiles, required: bool) -> bool:
    """Add the file a buffer / image URI names; False (recorded) when it is refused."""
    rel = None if _data_uri(uri) is None else scope.lexical(base, _uri_path(uri))
    real = scope.provide(rel) if rel is not None else False
    if real is False or rel is None:
        reason = f"outside the asset folder: {uri[:200]}"
        if required:
            raise ContainmentError(f"{what} {reason}")
        out.refused.append(reason)
        return False
    if real is None:
        if required:
            raise ContainmentError(f"{what}: {uri[:200]} not found in the asset folder")
        return True  # a missing texture: recorded by the post-import check; nothing to read
    out.files[rel] = real
    if not required:
        out.images.append((rel, real))
    return True


def _view_head(path: Path, doc: dict, view: dict, bin_off: int, bin_len: int) -> Callable[[], bytes]:
    """The first bytes of an image stored in a buffer view (BIN chunk or a data: buffer), read on demand."""
    def read() -> bytes:
        buf, start, length = view.get("buffer"), _int(view.get("byteOffset")), _int(view.get("byteLength"))
        n = min(length, HEADER_BYTES)
        buffers = doc.get("buffers", [])
        if not (isinstance(buf, int) and 0 <= buf < len(buffers)):
            return b""
        uri = buffers[buf].get("uri")
        if uri is None:
            if start + n > bin_len:
                return b""
            with open(path, "rb") as f:
                f.seek(bin_off + start)
                return f.read(n)
        return _b64_head(uri, start + n)[start:]

    return read


def _tails(text: str) -> list[str]:
    """Every tail of a statement's arguments (options come before the file name, which may hold spaces)."""
    tokens = text.split()
    return [" ".join(tokens[i:]).strip().strip('"') for i in range(len(tokens))]


def _obj_mtllibs(path: Path) -> list[str]:
    """Every `mtllib` argument of an OBJ, read in 8 MiB pieces (the file may be hundreds of MB)."""
    found: list[str] = []
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            body, carry = (data[:cut], data[cut:]) if cut else (b"", data)
            found += [m.decode("utf-8", "replace") for m in _MTLLIB.findall(body)]
        found += [m.decode("utf-8", "replace") for m in _MTLLIB.findall(carry)]
    return found


def _obj(scope: _Scope, path: Path) -> AssetFiles:
    out = AssetFiles(main=scope.main_rel, files={scope.main_rel: scope.main_real})
    base = _base(scope.main_rel)
    for arg in _obj_mtllibs(path):
        for cand in dict.fromkeys([arg.strip().strip('"'), *arg.split()]):
            rel = scope.lexical(base, cand)
            real = scope.provide(rel) if rel is not None else False
            if real is False:
                raise ContainmentError(f"mtllib outside the asset folder: {cand[:200]}")
            if real is not None and rel not in out.files:
                out.files[rel] = real
                _mtl(scope, rel, real, out)
    return out


def _mtl(scope: _Scope, rel: str, real: Path, out: AssetFiles) -> None:
    """Add the textures of MTL `rel`; drop (and record) lines naming files outside, and unknown statements."""
    if real.stat().st_size > MAX_MTL_BYTES:
        raise ContainmentError(f"MTL library {rel} is above {MAX_MTL_BYTES} bytes")
    base = _base(rel)
    kept, changed = [], False
    for raw in real.read_bytes().splitlines(keepends=True):
        line = raw.decode("utf-8", "surrogateescape")
        key, _, rest = line.strip().partition(" ")
        low = key.lower()
        if not key or key.startswith("#") or low in MTL_VALUE_KEYS:
            kept.append(raw)
            continue
        if not (low.startswith("map_") or low in MTL_FILE_KEYS):
            changed = True  # not a statement we know: nothing unknown reaches a parser that might open it
            continue
        outside, found = False, []
        for tail in _tails(rest):
            r = scope.lexical(base, tail)
            real_tex = scope.provide(r) if r is not None else False
            if real_tex is False:
                outside = True
                break
            if real_tex is not None:
                found.append((r, real_tex))
        if outside:
            changed = True
            # Blender's MTL reader falls back to the file name beside the MTL (exports often hold an absolute
            # path of the artist's machine): keep that fallback, inside the folder only
            name = rest.split()[-1].replace("\\", "/").rsplit("/", 1)[-1] if rest.split() else ""
            r = scope.lexical(base, name) if name and name not in (".", "..") else None
            real_tex = scope.provide(r) if r is not None else None
            if isinstance(real_tex, Path):
                kept.append(f"{key} {name}\n".encode("utf-8", "surrogateescape"))
                out.files[r] = real_tex
                out.images.append((r, real_tex))
            else:
                out.refused.append(f"outside the asset folder: {rest.strip()[:200]}")
            continue
        kept.append(raw)
        for r, real_tex in found[:1]:  # the longest tail that exists is the file the line names
            out.files[r] = real_tex
            out.images.append((r, real_tex))
    if changed:
        out.rewrites[rel] = b"".join(kept)


def _fbx_nodes(elem: Any, out: list[tuple[str, dict[bytes, Any]]]) -> None:
    """Collect (node kind, {child id: first property}) of every Video / Texture / Geometry node of a parsed FBX."""
    if elem.id in (b"Video", b"Texture", b"Geometry"):
        props = {c.id: c.props[0] for c in elem.elems if c.props}
        out.append((elem.id.decode(), props))
    for child in elem.elems:
        _fbx_nodes(child, out)


def _fbx_triangles(props: dict[bytes, Any]) -> int:
    """Triangles of one FBX Geometry after the subdivision Blender's importer adds for it (a SUBSURF
    modifier with the file's RenderDivisionLevels / PreviewDivisionLevels): 4^levels per face."""
    import numpy as np

    index = props.get(b"PolygonVertexIndex")
    if index is None:
        return 0
    idx = np.asarray(index)
    polygons = int((idx < 0).sum())  # the last vertex of each polygon is stored as -(i + 1)
    levels = max(_int(props.get(b"RenderDivisionLevels")), _int(props.get(b"PreviewDivisionLevels")))
    return max(0, len(idx) - 2 * polygons) * 4 ** min(levels, 32)


def _fbx(scope: _Scope, path: Path) -> AssetFiles:
    out = AssetFiles(main=scope.main_rel, files={scope.main_rel: scope.main_real})
    with open(path, "rb") as f:
        if not f.read(18).startswith(b"Kaydara FBX Binary"):
            raise ContainmentError("ASCII FBX: Blender's importer reads binary FBX only")
    from io_scene_fbx import parse_fbx  # Blender's own parser: importable once bpy is (the renderer)

    try:
        root, _version = parse_fbx.parse(str(path))
    except Exception as e:  # noqa: BLE001 - a file Blender's parser cannot read would not import either
        raise ContainmentError(f"unreadable FBX: {type(e).__name__}: {e}") from None
    nodes: list[tuple[str, dict[bytes, Any]]] = []
    _fbx_nodes(root, nodes)
    base = _base(scope.main_rel)
    out.triangles = sum(_fbx_triangles(p) for kind, p in nodes if kind == "Geometry")
    for kind, props in nodes:
        if kind == "Geometry":
            continue
        content = props.get(b"Content")
        if isinstance(content, (bytes, bytearray)) and content:
            out.images.append((f"embedded {kind}", bytes(content[:HEADER_BYTES])))
        # the importer takes RelativeFilename (joined to the file's folder) if there is one, else FileName,
        # else Filename (blen_read_texture_image); the other keys are never opened
        key = next((k for k in (b"RelativeFilename", b"FileName", b"Filename")
                    if isinstance(props.get(k), (bytes, str)) and props.get(k)), None)
        if key is None:
            continue
        value = props[key]
        text = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).replace("\\", "/")
        if key == b"RelativeFilename":
            text = text.lstrip("/")
        # load_image tries the path itself (from the working directory: the sandbox's root), then the
        # file's folder + the path, then the file's folder + the name
        rels = [scope.lexical("", text), scope.lexical(base, text), scope.lexical(base, Path(text).name)]
        if any(r is None or scope.provide(r) is False for r in rels):
            reason = f"outside the asset folder: {text[:200]}"
            if reason not in out.refused:  # Video and Texture nodes often name the same file
                out.refused.append(reason)
            continue
        for r in rels:
            real = scope.provide(r)
            if isinstance(real, Path):
                out.files[r] = real
                out.images.append((r, real))
                break
    return out


def asset_files(path: str | Path, fmt: str, folder: str | Path | None) -> AssetFiles:
    """Everything asset `path` (format `fmt`, e.g. "glb" or ".glb") may read, resolved inside `folder`
    (None: a single-file asset, which may read no other file). Raises ContainmentError with the reason."""
    path = Path(path)
    ext = fmt.lower().lstrip(".")
    try:
        scope = _Scope(path, Path(folder) if folder is not None else None)
        if not scope.main_real.is_file():
            raise ContainmentError(f"not a regular file: {path.name}")
        if ext in ("glb", "gltf"):
            return _gltf(scope, scope.main_real, ext == "glb")
        if ext == "obj":
            return _obj(scope, scope.main_real)
        if ext == "fbx":
            return _fbx(scope, scope.main_real)
        return AssetFiles(main=scope.main_rel, files={scope.main_rel: scope.main_real})
    except ContainmentError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            struct.error) as e:  # a crafted file is a reason, never a traceback
        raise ContainmentError(f"cannot list the asset's references: {type(e).__name__}: {str(e)[:200]}") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy
    except OSError:
        shutil.copyfile(src, dst)


def build_sandbox(files: AssetFiles, root: str | Path) -> Path:
    """Place exactly `files` (rewritten ones with their new content) under the empty folder `root`; return
    the main file's path there. The import reads from this folder only."""
    root = Path(root)
    for rel in dict.fromkeys([*files.files, *files.rewrites]):
        dst = root / rel
        if not dst.resolve().is_relative_to(root.resolve()):
            raise ContainmentError(f"refusing to place {rel!r} outside the sandbox")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in files.rewrites:
            dst.write_bytes(files.rewrites[rel])
        else:
            _link_or_copy(files.files[rel], dst)
    return root / files.main
