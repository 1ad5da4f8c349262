"""The procedural texture family: solid colours, gradients, stripes, checkers, dots, noise, Voronoi cells,
printed text and portrait-like images, each a deterministic function of (kind, side, seed, detail).

`detail` in [0, 1] moves a kind from coarse to fine (stripe period, checker cells, noise octaves, Voronoi
cell count, text sizes): what reconstruction finds hard is fine detail and text, and a small model needs
plenty of easy ones too, so the recipe draws it (`pipelines.procedural.recipe`). Every function returns an
RGB image of side S and draws its randomness only from its own generator.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXTURE_KINDS = ("solid", "gradient", "stripes", "checker", "dots", "noise", "voronoi", "text", "portrait")
EASY_KINDS = ("solid", "gradient", "stripes", "checker", "dots", "noise")  # smooth or coarse at low detail
HARD_KINDS = ("voronoi", "text", "portrait")  # fine edges, glyphs, high-frequency detail at any detail
WORDS = ("GTR", "mesh", "triplane", "NeRF", "texture", "render", "42", "refine", "PSNR", "x0.5", "Blender",
         "Ray", "LPIPS", "SSIM", "DiffMC", "CC0", "voxel", "normal", "albedo", "UV", "atlas", "2024", "Zero",
         "shape", "light", "view", "#7", "A4", "kg", "mm", "OK", "dE", "->", "fig. 3")  # ASCII: the font has it all


def colour(rng: np.random.Generator, sat: tuple[float, float] = (0.2, 0.9),
           val: tuple[float, float] = (0.25, 0.95)) -> np.ndarray:
    """A random colour [3] float32 in [0, 1], drawn in HSV so that hues are uniform."""
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in _u8(np.asarray(c)))
    return r, g, b


def _indexed(idx: np.ndarray, palette: list[np.ndarray]) -> Image.Image:
    """Index map [S, S] (values < len(palette)) -> RGB image, through PIL's palette mode (a C lookup)."""
    size = idx.shape[0]
    img = Image.frombytes("P", (size, size), np.ascontiguousarray(idx, np.uint8).tobytes())
    img.putpalette(b"".join(bytes(_rgb(c)) for c in palette))
    return img.convert("RGB")


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): column vector (rows) and row vector (columns), for broadcasting."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return t[:, None], t[None, :]


def solid(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """One flat colour (the easiest texture)."""
    return Image.new("RGB", (size, size), _rgb(colour(rng)))


SMOOTH_SIDE = 64  # smooth textures are computed at this side and upsampled (bilinear is exact for a ramp)


def gradient(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """A linear or radial blend of two or three colours."""
    n = min(size, SMOOTH_SIDE)
    y, x = _coords(n)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(a) + y * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / 0.9
    t = np.clip(t, 0, 1)[..., None]
    c0, c1, c2 = colour(rng), colour(rng), colour(rng)
    if rng.random() < 0.5:  # two colours
        img = c0 * (1 - t) + c1 * t
    else:
        lo, hi = np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1)
        img = c0 * (1 - lo) + c1 * (lo - hi) + c2 * hi
    return Image.fromarray(_u8(img)).resize((size, size), Image.Resampling.BILINEAR)


def _period_px(size: int, rng: np.random.Generator, detail: float, coarsest: float, finest: float) -> float:
    """A feature size in pixels, log-uniform from a coarse fraction of the side towards a fine one; the finest
    reachable shrinks with `detail` (at 0: about a third of the way in log scale)."""
    lo = np.log2(coarsest)
    hi = lo + (np.log2(finest) - lo) * (0.35 + 0.65 * detail)
    return max(2.0, size * 2.0 ** rng.uniform(hi, lo))


def stripes(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """Oriented stripes of two or three colours, hard-edged or sinusoidal, at a period of 1/3 to 1/100 of the side."""
    y, x = _coords(size)
    a = rng.uniform(0, np.pi)
    period = _period_px(size, rng, detail, 1 / 3, 1 / 100) / size
    t = (x * np.float32(np.cos(a) / period) + y * np.float32(np.sin(a) / period))
    k = int(rng.integers(2, 4))
    pal = [colour(rng) for _ in range(k)]
    if rng.random() < 0.7:
        return _indexed(np.mod(np.floor(t), np.float32(k)).astype(np.uint8), pal)
    levels = 32  # soft stripes: a sine quantised to 32 levels, blended between two colours
    w = np.floor((0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * t)) * (levels - 1) + 0.5).astype(np.uint8)
    return _indexed(w, [pal[0] * (i / (levels - 1)) + pal[1] * (1 - i / (levels - 1)) for i in range(levels)])


def checker(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """A two-colour checker with 2 to 128 cells per side, sometimes with a coarser colour checker over it."""
    cell = max(2, int(round(_period_px(size, rng, detail, 1 / 2, 1 / 128))))
    i = ((np.arange(size) // cell) % 2).astype(np.uint8)
    idx = i[:, None] ^ i[None, :]
    pal = [colour(rng), colour(rng)]
    if rng.random() < 0.3 and cell * 8 < size:
        j = ((np.arange(size) // (cell * 8)) % 2).astype(np.uint8)
        idx = idx + 2 * (j[:, None] ^ j[None, :])
        tint = colour(rng)
        pal += [p * 0.55 + 0.45 * tint for p in pal]
    return _indexed(idx, pal)


def dots(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """Polka dots on a square or staggered grid (cells of 1/3 to 1/64 of the side)."""
    cell = np.float32(_period_px(size, rng, detail, 1 / 3, 1 / 64))
    r = np.float32(rng.uniform(0.18, 0.45)) * cell
    yy = np.arange(size, dtype=np.float32)[:, None] + np.float32(0.5)
    xx = np.arange(size, dtype=np.float32)[None, :] + np.float32(0.5)
    if rng.random() < 0.5:  # staggered rows
        xx = xx + (np.floor(yy / cell) % 2) * (cell / 2)
    dx = np.mod(xx, cell) - cell / 2
    dy = np.mod(yy, cell) - cell / 2
    return _indexed(dx * dx + dy * dy <= r * r, [colour(rng), colour(rng)])


def noise(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """Fractal value noise (1 to 6 octaves of random grids), in two colours or per channel.

    The octaves are summed at the finest octave's grid (at most a quarter of the side) and upsampled once.
    """
    octaves = 1 + int(rng.integers(0, 2 + round(4 * detail)))
    base = int(rng.integers(2, 6))
    per_channel = rng.random() < 0.35
    g = min(max(2, size // 4), base * 2 ** (octaves - 1))
    acc = np.zeros((g, g, 3 if per_channel else 1), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        n = min(g, base * 2**o)
        grid = rng.random((n, n, acc.shape[2]), dtype=np.float32)
        if n != g:
            grid = np.stack([np.asarray(Image.fromarray(grid[..., c], "F").resize((g, g), Image.Resampling.BICUBIC))
                             for c in range(acc.shape[2])], -1)
        acc += np.float32(amp) * grid
        total += amp
        amp *= 0.55
    t = np.clip((acc / np.float32(total) - 0.5) * np.float32(rng.uniform(1.5, 3.0)) + 0.5, 0, 1)
    if not per_channel:  # stretch the contrast (sums of noise are greyish), then two colours
        t = colour(rng) * (1 - t) + colour(rng) * t
    return Image.fromarray(_u8(t)).resize((size, size), Image.Resampling.BICUBIC)


def voronoi(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """Voronoi cells (6 to 384 seeds) in random colours, with dark borders half of the time.

    The cells are scipy's Voronoi regions (qhull), made finite by mirroring the seeds across the four sides,
    filled as polygons into a cell-id image: no pixel x seed distance table. Borders are where the id
    changes between neighbouring pixels.
    """
    from scipy.spatial import Voronoi

    n = int(round(6 * 2 ** rng.uniform(0, 1.5 + 4.5 * detail)))
    pts = rng.random((n, 2))
    mirrored = np.concatenate([pts, pts * [-1, 1], pts * [1, -1], [2, 0] + pts * [-1, 1], [0, 2] + pts * [1, -1]])
    vor = Voronoi(mirrored)
    ids = Image.new("I", (size, size), 0)
    d = ImageDraw.Draw(ids)
    corners = vor.vertices * size
    for i in range(n):
        d.polygon([tuple(p) for p in corners[vor.regions[vor.point_region[i]]].tolist()], fill=i)
    cell = np.asarray(ids)
    pal = np.stack([_u8(colour(rng)) for _ in range(n)])
    img = np.take(pal, cell, axis=0)  # a plain gather: several times faster than fancy indexing here
    if rng.random() < 0.5:
        width = max(1, int(round(size / rng.uniform(150, 400))))
        edge = np.zeros((size, size), bool)
        for k in range(1, width + 1):
            edge[:, k:] |= cell[:, k:] != cell[:, :-k]
            edge[k:, :] |= cell[k:, :] != cell[:-k, :]
        img[edge] = _u8(colour(rng, val=(0.02, 0.2)))
    return Image.fromarray(img)


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, px))  # Pillow's embedded font: no file, same glyphs everywhere


STRIP_LINES = 4  # pre-rendered lines of words per font size


@lru_cache(maxsize=64)
def _text_strips(px: int, width: int) -> tuple[Image.Image, ...]:
    """Lines of words at `px`, at least `width` wide (masks, 'L'), rendered once per process: the text
    texture pastes crops of them, a copy instead of a FreeType rendering per glyph. Fixed words (seeded by
    the size), so every process makes the same ones."""
    rng = np.random.default_rng([px, width])
    font = _font(px)
    out = []
    for _ in range(STRIP_LINES):
        words = [WORDS[int(rng.integers(0, len(WORDS)))]]
        while font.getlength(" ".join(words)) < width:
            words += [WORDS[int(rng.integers(0, len(WORDS)))] for _ in range(8)]
        line = " ".join(words)
        strip = Image.new("L", (int(font.getlength(line)) + 2, int(px * 1.3) + 2), 0)
        ImageDraw.Draw(strip).text((0, 0), line, fill=255, font=font)
        out.append(strip)
    return tuple(out)


def text(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """Printed text: lines of words at two to four sizes (a headline of 12 % of the side down to 6 px), dark on
    light or light on dark."""
    light_bg = rng.random() < 0.75
    bg = colour(rng, sat=(0.0, 0.35), val=(0.8, 1.0) if light_bg else (0.05, 0.25))
    ink = colour(rng, sat=(0.0, 0.9), val=(0.0, 0.35) if light_bg else (0.75, 1.0))
    img = Image.new("RGB", (size, size), _rgb(bg))
    fracs = (0.12, 0.08, 0.055, 0.04, 0.028, 0.02, 0.015, 0.012)
    first = int(rng.integers(0, 3 + round(3 * detail)))
    sizes = sorted({max(6, int(size * f)) for f in fracs[first:first + int(rng.integers(2, 5))]}, reverse=True)
    ink_img = Image.new("RGB", (size, size), _rgb(ink))
    y = int(rng.integers(0, max(1, size // 50)))
    while y < size:
        px = sizes[int(rng.integers(0, len(sizes)))]
        strip = _text_strips(px, 3 * size)[int(rng.integers(0, STRIP_LINES))]
        x0 = int(rng.integers(0, max(1, strip.width - size)))
        crop = strip.crop((x0, 0, x0 + size, strip.height))
        img.paste(ink_img.crop((0, y, size, y + crop.height)), (0, y), crop)
        y += int(px * rng.uniform(1.15, 1.6))
    return img


def portrait(size: int, rng: np.random.Generator, detail: float) -> Image.Image:
    """A portrait-like image: face oval, eyes, mouth, hair of fine strands, grain on skin and background."""
    bg0, bg1 = colour(rng, sat=(0.1, 0.6), val=(0.3, 0.85)), colour(rng, sat=(0.1, 0.6), val=(0.3, 0.85))
    y, _x = _coords(SMOOTH_SIDE)
    pil = Image.fromarray(_u8(np.broadcast_to(bg0 * (1 - y[..., None]) + bg1 * y[..., None],
                                              (SMOOTH_SIDE, SMOOTH_SIDE, 3)))).resize((size, size))
    d = ImageDraw.Draw(pil)
    s = size
    cx, cy, w = rng.uniform(0.42, 0.58) * s, rng.uniform(0.45, 0.55) * s, rng.uniform(0.22, 0.3) * s
    skin = tuple(int(c) for c in rng.integers(150, 235, 3))
    d.ellipse([cx - w, cy - 1.35 * w, cx + w, cy + 1.35 * w], fill=skin)
    hair = rng.integers(10, 90, 3)
    strands = rng.uniform(0, 1, (max(150, s // 2), 4))
    jitter = rng.integers(-20, 20, (len(strands), 3))
    for (a, b, c, e), j in zip(strands.tolist(), (hair + jitter).clip(0, 255).tolist()):  # thin strands of hair
        x0, y0 = cx + (a - 0.5) * 2.3 * w, cy - 1.35 * w + b * 0.5 * w
        d.line([x0, y0, x0 + (c - 0.5) * 0.3 * w, y0 + e * 0.9 * w], fill=tuple(j), width=1)
    for ex in (-0.4, 0.4):
        ex = cx + ex * w
        d.ellipse([ex - 0.2 * w, cy - 0.25 * w, ex + 0.2 * w, cy], fill=(250, 250, 250))
        d.ellipse([ex - 0.08 * w, cy - 0.2 * w, ex + 0.08 * w, cy - 0.05 * w], fill=(30, 40, 60))
    d.arc([cx - 0.4 * w, cy + 0.45 * w, cx + 0.4 * w, cy + 0.9 * w], 20, 160, fill=(140, 40, 40),
          width=max(1, s // 128))
    arr = np.asarray(pil, np.int16) + rng.integers(-10, 11, (size, size, 1), dtype=np.int16)  # grain everywhere
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


TEXTURE_FNS = {"solid": solid, "gradient": gradient, "stripes": stripes, "checker": checker, "dots": dots,
               "noise": noise, "voronoi": voronoi, "text": text, "portrait": portrait}
assert tuple(TEXTURE_FNS) == TEXTURE_KINDS


def make_texture(kind: str, size: int, seed: tuple[int, ...], detail: float) -> Image.Image:
    """Texture `kind` of side `size` (an RGB image), a fixed function of (kind, size, seed, detail)."""
    if kind not in TEXTURE_FNS:
        raise ValueError(f"unknown texture kind '{kind}' (known: {', '.join(TEXTURE_KINDS)})")
    out = TEXTURE_FNS[kind](int(size), np.random.default_rng(np.random.SeedSequence(list(seed))), float(detail))
    assert out.size == (size, size) and out.mode == "RGB", (kind, out.size, out.mode)
    return out
