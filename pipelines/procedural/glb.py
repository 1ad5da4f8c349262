"""A minimal, deterministic glTF 2.0 binary (.glb) writer: one mesh, one primitive per material, one image.

Written here rather than through trimesh's exporter because a procedural asset needs exactly this and
nothing else: several materials (own roughness / metallic) sharing one embedded JPEG atlas, smooth and
sharp normals as given, and the same bytes for the same arrays (no timestamps, no dict-order surprises:
the JSON is built in a fixed order and written with sorted keys). Readers check it independently
(trimesh's glTF loader and Blender's importer in the tests).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

FLOAT, UINT16, UINT32 = 5126, 5123, 5125  # glTF componentType
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963  # bufferView targets
LINEAR, LINEAR_MIPMAP_LINEAR, CLAMP_TO_EDGE = 9729, 9987, 33071


@dataclass(frozen=True)
class GlbMaterial:
    name: str
    roughness: float
    metallic: float


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def write_glb(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray,
              face_material: np.ndarray, materials: list[GlbMaterial], image: bytes, mime: str,
              generator: str = "GTR toolkit procedural") -> bytes:
    """The .glb bytes of a textured mesh.

    positions, normals [V, 3] float32 (glTF frame: Y up), uvs [V, 2] (v down), faces [F, 3], face_material
    [F] (index into `materials`; a material no face uses gets no primitive). `image` is the encoded
    base-colour texture (`mime`: image/jpeg or image/png), shared by every material.
    """
    positions = np.ascontiguousarray(positions, np.float32)
    normals = np.ascontiguousarray(normals, np.float32)
    uvs = np.ascontiguousarray(uvs, np.float32)
    n = len(positions)
    assert positions.shape == (n, 3) and normals.shape == (n, 3) and uvs.shape == (n, 2), "vertex arrays differ"
    assert faces.ndim == 2 and faces.shape[1] == 3 and len(face_material) == len(faces)
    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def add(data: bytes, target: int | None) -> int:
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data),
                      **({"target": target} if target else {})})  # an image's view has no target
        blob.extend(_pad(data, b"\x00"))
        return len(views) - 1

    def accessor(data: np.ndarray, ctype: int, kind: str, target: int, bounds: bool = False) -> int:
        extra = {"min": [float(x) for x in data.min(0)], "max": [float(x) for x in data.max(0)]} if bounds else {}
        accessors.append({"bufferView": add(data.tobytes(), target), "componentType": ctype, "count": len(data),
                          "type": kind, **extra})
        return len(accessors) - 1

    primitives = []
    for k in range(len(materials)):  # each primitive owns the vertices it uses: readers need not share
        tri = faces[face_material == k]
        if len(tri) == 0:
            continue
        used, local = np.unique(tri, return_inverse=True)
        idx_dtype, idx_type = (np.uint16, UINT16) if len(used) < 65536 else (np.uint32, UINT32)
        attributes = {"POSITION": accessor(positions[used], FLOAT, "VEC3", ARRAY_BUFFER, bounds=True),
                      "NORMAL": accessor(normals[used], FLOAT, "VEC3", ARRAY_BUFFER),
                      "TEXCOORD_0": accessor(uvs[used], FLOAT, "VEC2", ARRAY_BUFFER)}
        indices = accessor(local.astype(idx_dtype).reshape(-1), idx_type, "SCALAR", ELEMENT_ARRAY_BUFFER)
        primitives.append({"attributes": attributes, "indices": indices, "material": k, "mode": 4})
    if not primitives:
        raise ValueError("no faces to write")
    image_view = add(image, None)
    doc = {
        "asset": {"version": "2.0", "generator": generator},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "asset"}],
        "meshes": [{"name": "asset", "primitives": primitives}],
        "materials": [{"name": m.name, "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0}, "metallicFactor": round(float(m.metallic), 4),
            "roughnessFactor": round(float(m.roughness), 4)}} for m in materials],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR, "wrapS": CLAMP_TO_EDGE,
                      "wrapT": CLAMP_TO_EDGE}],
        "images": [{"bufferView": image_view, "mimeType": mime}],
        "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": len(blob)}],
    }
    text = _pad(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8"), b" ")
    body = bytes(blob)
    total = 12 + 8 + len(text) + 8 + len(body)
    return b"".join([struct.pack("<4sII", b"glTF", 2, total), struct.pack("<I4s", len(text), b"JSON"), text,
                     struct.pack("<I4s", len(body), b"BIN\x00"), body])
