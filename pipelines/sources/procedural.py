"""Procedural demo assets: deterministic textured meshes with the textures the paper calls hard, as .glb.

The embedded default source (`SOURCE=procedural`, `make demo`): needs no download. Asset `i` is a fixed
function of `i` and the texture size: a shape (box, sphere, cylinder, torus, cone, capsule, annulus or a
composite of several) carrying one of four hard textures (printed text in PIL's default font at several
sizes, a fine checker, fine stripes, a portrait-like image with high-frequency detail). UVs are a
per-face cube projection (no mirroring on opposite faces), so text stays legible on most sides.
License cc0, attribution "GTR toolkit procedural".
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from core.io import atomic_write_bytes
from pipelines.assets import ok_row

LICENSE = "cc0"
ATTRIBUTION = "GTR toolkit procedural"
SHAPES = ("box", "sphere", "cylinder", "torus", "cone", "capsule", "annulus", "composite")
TEXTURES = ("text", "checker", "stripes", "portrait")
WORDS = ("GTR", "mesh", "triplane", "NeRF", "texture", "Objaverse", "render", "42", "refine", "PSNR", "x0.5",
         "Blender", "Ray", "LPIPS", "SSIM", "DiffMC")


def uid_for(index: int) -> str:
    """Stable uid of procedural asset `index` (no dots: it is a WebDataset key)."""
    return f"procedural-{index:04d}"


def _shape(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    c = trimesh.creation
    if kind == "box":
        return c.box(extents=rng.uniform(0.5, 1.0, 3))
    if kind == "sphere":
        return c.uv_sphere(radius=0.5, count=[32, 32])
    if kind == "cylinder":
        return c.cylinder(radius=rng.uniform(0.25, 0.45), height=rng.uniform(0.6, 1.0), sections=48)
    if kind == "torus":
        return c.torus(major_radius=0.35, minor_radius=rng.uniform(0.08, 0.16), major_sections=48,
                       minor_sections=24)
    if kind == "cone":
        return c.cone(radius=rng.uniform(0.3, 0.5), height=rng.uniform(0.6, 1.0), sections=48)
    if kind == "capsule":
        return c.capsule(height=rng.uniform(0.3, 0.6), radius=0.25, count=[32, 32])
    if kind == "annulus":
        return c.annulus(r_min=0.2, r_max=0.45, height=rng.uniform(0.2, 0.5), sections=48)
    # composite: a small "robot" of parts, so there is self-occlusion and several separate components
    body = c.box(extents=[0.5, 0.35, 0.6])
    head = c.uv_sphere(radius=0.18, count=[24, 24])
    head.apply_translation([0, 0, 0.48])
    arm_l = c.cylinder(radius=0.06, height=0.5, sections=24)
    arm_l.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    arm_l.apply_translation([0.45, 0, 0.1])
    arm_r = arm_l.copy()
    arm_r.apply_translation([-0.9, 0, 0])
    base = c.cone(radius=0.3, height=0.25, sections=32)
    base.apply_translation([0, 0, -0.55])
    ring = c.torus(major_radius=0.22, minor_radius=0.04, major_sections=32, minor_sections=12)
    ring.apply_translation([0, 0, 0.62])
    return trimesh.util.concatenate([body, head, arm_l, arm_r, base, ring])


def cube_uv(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Per-face cube projection. Returns the mesh with unshared vertices ([3F,3]) and its UVs ([3F,2]).

    Each face is projected on the plane of its dominant normal axis; the in-plane axes flip with the sign
    of the normal so that images are not mirrored when seen from outside.
    """
    tri = mesh.triangles  # [F,3,3]
    normals = mesh.face_normals  # [F,3]
    axis = np.abs(normals).argmax(1)
    sign = np.sign(normals[np.arange(len(normals)), axis])
    lo, hi = mesh.bounds
    p = (tri - lo) / np.maximum(hi - lo, 1e-9).max()  # [F,3,3] in [0,1], isotropic so text keeps its aspect
    u = np.empty(tri.shape[:2])
    v = np.empty(tri.shape[:2])
    for a, (ua, va) in enumerate([(1, 2), (0, 2), (0, 1)]):
        m = axis == a
        s = sign[m][:, None]
        # +X: u=y, -X: u=-y ; +Y: u=-x, -Y: u=x ; +Z (top): u=x, -Z: u=-x (v = the remaining axis)
        flip = -s if a == 1 else s
        u[m] = np.where(flip > 0, p[m][..., ua], 1 - p[m][..., ua])
        v[m] = p[m][..., va]
    faces = np.arange(3 * len(tri)).reshape(-1, 3)
    out = trimesh.Trimesh(vertices=tri.reshape(-1, 3), faces=faces, process=False)
    uv = np.stack([u.reshape(-1), v.reshape(-1)], 1)
    return out, uv


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def texture_text(size: int, rng: np.random.Generator) -> Image.Image:
    """Printed text at several sizes (large headline down to ~1% of the side), dark on a light tint."""
    bg = tuple(int(x) for x in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    y = 2
    for frac in (0.12, 0.08, 0.05, 0.035, 0.025, 0.018, 0.012):
        px = max(6, int(size * frac))
        font = _font(px)
        colour = tuple(int(x) for x in rng.integers(0, 90, 3))
        while y + px < size:
            words = " ".join(rng.choice(WORDS, 12))
            d.text((2, y), words, fill=colour, font=font)
            y += int(px * 1.25)
            if rng.random() < 0.5:
                break
        if y >= size - 6:
            break
    return img


def texture_checker(size: int, rng: np.random.Generator) -> Image.Image:
    """A fine two-colour checker (period 4-16 px) with a coarser colour checker over it."""
    period = int(rng.choice([4, 6, 8, 12, 16]))
    yy, xx = np.mgrid[0:size, 0:size]
    fine = ((xx // period + yy // period) % 2).astype(np.float32)
    coarse = ((xx // (period * 8) + yy // (period * 8)) % 2).astype(np.float32)
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    col = np.where(coarse[..., None] > 0, a, b)
    img = col * (0.35 + 0.65 * fine[..., None])
    return Image.fromarray((img * 255).round().astype(np.uint8))


def texture_stripes(size: int, rng: np.random.Generator) -> Image.Image:
    """Fine oriented stripes (period 3-10 px) mixed with a chirp, three colour channels out of phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3, 10)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    chirp = np.sin((xx / size) ** 2 * size * rng.uniform(0.5, 1.5))
    chans = [0.5 + 0.5 * np.sin(2 * np.pi * t / period + ph) * (0.7 + 0.3 * chirp) for ph in (0, 2.1, 4.2)]
    return Image.fromarray((np.stack(chans, -1) * 255).clip(0, 255).astype(np.uint8))


def texture_portrait(size: int, rng: np.random.Generator) -> Image.Image:
    """A portrait-like image: face oval, eyes, mouth, hair of fine random strands, noisy skin and background."""
    bg = rng.uniform(0.2, 0.8, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = bg * (0.8 + 0.2 * yy[..., None])
    img = img + rng.normal(0, 0.04, (size, size, 3))  # film grain: per-pixel high frequency
    pil = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    s = size
    skin = tuple(int(x) for x in rng.integers(150, 235, 3))
    d.ellipse([0.25 * s, 0.18 * s, 0.75 * s, 0.85 * s], fill=skin)
    hair = tuple(int(x) for x in rng.integers(10, 90, 3))
    for _ in range(max(200, s)):  # hair: many thin strands over the top of the head
        x0 = rng.uniform(0.2, 0.8) * s
        y0 = rng.uniform(0.08, 0.3) * s
        d.line([x0, y0, x0 + rng.normal(0, 0.05) * s, y0 + rng.uniform(0.05, 0.25) * s],
               fill=tuple(int(max(0, c + rng.integers(-20, 20))) for c in hair), width=1)
    for ex in (0.4, 0.6):
        d.ellipse([(ex - 0.05) * s, 0.42 * s, (ex + 0.05) * s, 0.48 * s], fill=(250, 250, 250))
        d.ellipse([(ex - 0.02) * s, 0.43 * s, (ex + 0.02) * s, 0.47 * s], fill=(30, 40, 60))
    d.arc([0.4 * s, 0.6 * s, 0.6 * s, 0.72 * s], 20, 160, fill=(140, 40, 40), width=max(1, s // 128))
    d.line([0.5 * s, 0.48 * s, 0.48 * s, 0.6 * s], fill=tuple(int(c * 0.8) for c in skin), width=max(1, s // 256))
    arr = np.asarray(pil).astype(np.float32) / 255
    pores = rng.normal(0, 0.03, (size, size, 1))  # skin texture: fine noise everywhere
    arr = (arr + pores).clip(0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8)).filter(ImageFilter.SHARPEN)


_TEXTURE_FNS = {"text": texture_text, "checker": texture_checker, "stripes": texture_stripes,
                "portrait": texture_portrait}


def describe(index: int) -> tuple[str, str]:
    """(shape, texture) of asset `index`: every shape meets every texture within 8 x 4 consecutive indices."""
    return SHAPES[index % len(SHAPES)], TEXTURES[(index + index // len(SHAPES)) % len(TEXTURES)]


def make_procedural_asset(index: int, path: Path, texture_size: int) -> dict[str, Any]:
    """Write procedural asset `index` as a textured .glb at `path` (atomically) and describe it.

    Deterministic: the same (index, texture_size) gives the same geometry and texture. Returns
    {uid, name, shape, texture, faces, vertices, texture_size, bytes, path, license, attribution}.
    """
    if index < 0:
        raise ValueError(f"procedural index must be >= 0, got {index}")
    if texture_size < 16:
        raise ValueError(f"procedural texture_size must be >= 16, got {texture_size}")
    shape, tex = describe(index)
    rng = np.random.default_rng(1000 + index)
    base = _shape(shape, rng)
    mesh, uv = cube_uv(base)
    image = _TEXTURE_FNS[tex](texture_size, np.random.default_rng(2000 + index))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, metallicFactor=0.0,
                                                   roughnessFactor=0.8, name=f"{tex}_material")
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    # glTF is Y-up; trimesh writes our Z-up coordinates as they are. Rotate +Z to +Y so that Blender's
    # glTF importer (Y-up -> Z-up) stands the object upright again.
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
    scene = trimesh.Scene(geometry={f"{shape}": mesh})
    buf = io.BytesIO()
    scene.export(file_obj=buf, file_type="glb")
    data = buf.getvalue()
    path = Path(path)
    atomic_write_bytes(path, data)
    return {"uid": uid_for(index), "name": f"{shape} with {tex} texture #{index}", "shape": shape, "texture": tex,
            "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)), "texture_size": int(texture_size),
            "bytes": len(data), "path": str(path), "license": LICENSE, "attribution": ATTRIBUTION}


def candidates(count: int, start: int = 0) -> list[dict[str, Any]]:
    """Candidate rows (the filter's input) for assets `start` .. `start + count - 1`; nothing is generated yet.

    Training uses `start = 0`; the evaluation's held-out set starts after the training indices, and since
    `describe` pairs shape `i % 8` with texture `(i + i // 8) % 4`, indices 8-31 carry (shape, texture)
    combinations that indices 0-7 do not (and every index has its own random proportions and texture).
    """
    if start < 0 or count < 0:
        raise ValueError(f"procedural start and count must be >= 0, got start={start}, count={count}")
    rows = []
    for i in range(start, start + count):
        shape, tex = describe(i)
        rows.append({"uid": uid_for(i), "source": "procedural", "name": f"{shape} with {tex} texture #{i}",
                     "license": LICENSE, "attribution": ATTRIBUTION, "author": ATTRIBUTION, "source_url": "",
                     "format": "glb", "locator": str(i),
                     "texture_count": 1, "animation_count": 0, "age_restricted": False})
    return rows


def fetch(item: dict, assets_dir: str, texture_size: int = 512) -> dict[str, Any]:
    """Download step for the procedural source: generate the asset into `assets_dir/<uid>.glb`."""
    t0 = time.perf_counter()
    index = int(item["locator"])
    path = Path(assets_dir) / f"{uid_for(index)}.glb"
    make_procedural_asset(index, path, texture_size)
    return ok_row({**item, "uid": uid_for(index)}, path, t0)
