"""Inputs of the reconstruction command: a folder of posed images → arrays in our canonical frame.

Three ways to give the cameras (checked in this order):

1. a render folder of this project (`cameras.npz` + `NN.rgba.png`, docs/CONTRACTS.md "What is rendered"), e.g.
   `OUT/renders_eval/<uid>/inputs/`;
2. `cameras.json`: `{"frames": [{"file": "a.png", "c2w": 4x4, "K": 3x3, "mask": "a_mask.png"?}, ...]}` with
   OpenCV `c2w` in our normalised Z-up frame (object inside [-0.5, 0.5]^3) and `K` in pixels of that file;
3. the released inference folder (snap_gtr `scripts/inference.py: load_eval_data`): `rgb_NNN.png` with
   `cam_NNN.txt` beside each (the released `save_camera` format: a world-to-camera OpenCV extrinsic in their
   Y-up [−1, 1] frame and fx fy cx cy height width), converted into ours by the inverse of the fixed
   similarity (`RELEASED_FRAME_SCALE` = 2, Y-up → Z-up);
4. a named layout (`--layout`): `eval4` — the contract's 4 evaluation input views (azimuth 0/90/180/270,
   elevation 20°, distance 2.6, FoV 40°), images taken in sorted file-name order; `zero123pp` — the
   Zero123++ v1.2 6-view output, one 3×2 grid image (3 rows, 2 columns, read row by row) or 6 images: the
   released `prepare_mv` cameras (elevations 20°/−10° alternating, azimuths 30° + 60°·k measured from +Z
   towards +X in their Y-up frame, FoV 30°, radius 4 for an object in [−1, 1]^3), which in our frame (Z up,
   azimuth from +X towards +Y, data in [−0.5, 0.5]^3) are azimuths −60° + 60°·k at radius 2.

Images are RGBA (straight alpha), or RGB with a mask file beside them (`NAME.mask.png`, `NAME_mask.png` or
`masks/NAME.png`). Everything that does not fit raises `InputError` naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.cameras import eval_input_views, intrinsics, look_at, spherical_position

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SIDE = 8192  # refuse larger images (bounded memory; PIL's bomb guard is per pixel count)
MAX_VIEWS = 64  # the transformer's sequence grows with views; more than this is a mistake
MAX_JSON_BYTES = 4 << 20

# The released data's frame: Y-up, objects in [-1, 1]^3, i.e. ours x 2 (the official preset's
# official_frame_scale; pinned by the fixture's Zero123++ cameras, tests/training/test_released_cameras.py).
RELEASED_FRAME_SCALE = 2.0
# Zero123++ v1.2 output layout, the released prepare_mv cameras (docs/CONTRACTS.md), in our frame: their
# azimuth φ runs from +Z towards +X in Y-up, ours from +X towards +Y in Z-up, so ours = φ − 90°.
ZERO123PP_AZIMUTHS = tuple(30.0 + 60.0 * k - 90.0 for k in range(6))
ZERO123PP_ELEVATIONS = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
ZERO123PP_DISTANCE = 4.0 / RELEASED_FRAME_SCALE  # radius 4 around an object in [-1, 1]^3
ZERO123PP_FOV = 30.0
ZERO123PP_GRID = (3, 2)  # rows, columns

LAYOUTS = ("eval4", "zero123pp")
RELEASED_IMAGE, RELEASED_CAMERA = "rgb_", "cam_"  # the released inference folder's file names


class InputError(ValueError):
    """Input images or cameras that cannot be used; the message names the file and the problem."""


@dataclass
class Views:
    """Posed input views, all at one square size."""

    rgb: np.ndarray  # [V,S,S,3] float32 in [0,1], composited on `background`
    mask: np.ndarray  # [V,S,S] float32 in [0,1] (alpha)
    c2w: np.ndarray  # [V,4,4] float32, OpenCV, canonical frame
    K: np.ndarray  # [V,3,3] float32, pixels of S
    names: list[str]
    source: str  # render | json | released | eval4 | zero123pp

    def __len__(self) -> int:
        return len(self.c2w)


# ----------------------------------------------------------------------------------------------------------
# Named layouts (closed forms, also used by the tests).
# ----------------------------------------------------------------------------------------------------------


def eval4_cameras(size: int, elevation_deg: float = 20.0, distance: float = 2.6, fov_deg: float = 40.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The contract's 4 evaluation input views: c2w [4,4,4], K [4,3,3] for `size`² images."""
    c2w = eval_input_views(elevation_deg, distance)["c2w"]
    return c2w.astype(np.float32), np.stack([intrinsics(fov_deg, size)] * 4)


def zero123pp_cameras(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The Zero123++ v1.2 six views in our frame: c2w [6,4,4], K [6,3,3] for `size`² tiles."""
    c2w = np.stack([look_at(spherical_position(a, e, ZERO123PP_DISTANCE))
                    for a, e in zip(ZERO123PP_AZIMUTHS, ZERO123PP_ELEVATIONS)])
    return c2w.astype(np.float32), np.stack([intrinsics(ZERO123PP_FOV, size)] * 6)


def split_grid(image: np.ndarray, rows: int = 3, cols: int = 2) -> list[np.ndarray]:
    """A grid image [rows·h, cols·w, C] → rows·cols tiles [h, w, C], read row by row."""
    H, W = image.shape[:2]
    if H % rows or W % cols:
        raise InputError(f"a {rows}x{cols} grid image must have a height divisible by {rows} and a width "
                         f"divisible by {cols}; got {W}x{H}")
    h, w = H // rows, W // cols
    return [image[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]


def read_released_camera(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A released `cam_NNN.txt` (`dataset_utils.save_camera`): the world-to-camera OpenCV extrinsic [4,4]
    (their frame), K [3,3] and (height, width) of the image it was written for. InputError if malformed."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
        lines = path.read_text().splitlines()
        w2c = np.array([[float(x) for x in line.split()] for line in lines[1:5]], dtype=np.float64)
        fx, fy, cx, cy, height, width = (float(x) for x in lines[7].split())
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a released camera file (extrinsic 4x4, then fx fy cx cy height width): "
                         f"{e}") from None
    if w2c.shape != (4, 4) or not np.isfinite(w2c).all():
        raise InputError(f"{path}: the extrinsic must be 4 rows of 4 numbers")
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return w2c, K, (int(height), int(width))


def released_to_ours(c2w_theirs: np.ndarray, scale: float = RELEASED_FRAME_SCALE) -> np.ndarray:
    """OpenCV c2w [..., 4, 4] in the released frame → ours: the inverse of `training.cameras.to_official_frame`
    (rotation Aᵀ·R, centre Aᵀ·t / scale, A = Z-up → Y-up)."""
    A = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    out = np.array(c2w_theirs, dtype=np.float64, copy=True)
    out[..., :3, :3] = A.T @ out[..., :3, :3]
    out[..., :3, 3] = out[..., :3, 3] @ A / scale
    return out


# ----------------------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------------------


def _is_mask_name(p: Path) -> bool:
    return p.stem.endswith(".mask") or p.stem.endswith("_mask") or p.parent.name == "masks"


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name, without mask files and non-colour passes."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file() or _is_mask_name(p):
            continue
        if p.name.endswith((".depth.png", ".normal.png")):  # render folders hold these beside the RGBA
            continue
        out.append(p)
    return out


def find_mask(image_path: Path) -> Path | None:
    stem = image_path.name[: -len(image_path.suffix)]
    for cand in (image_path.with_name(f"{stem}.mask.png"), image_path.with_name(f"{stem}_mask.png"),
                 image_path.parent / "masks" / f"{stem}.png", image_path.parent / "masks" / image_path.name):
        if cand.is_file():
            return cand
    return None


def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        if img.width > MAX_SIDE or img.height > MAX_SIDE:
            raise InputError(f"{path}: {img.width}x{img.height} is larger than {MAX_SIDE} pixels a side")
        img.load()
    except InputError:
        raise
    except Exception as e:  # truncated, not an image, decompression bomb
        raise InputError(f"{path}: cannot read the image ({e})") from None
    return img


def load_rgba(path: Path, mask_path: Path | None = None) -> np.ndarray:
    """[H,W,4] float32 in [0,1], straight alpha; the alpha comes from the image or its mask file."""
    img = _open(path)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    mask_path = mask_path or find_mask(path)
    if mask_path is not None:
        m = _open(mask_path)
        if m.size != img.size:
            raise InputError(f"mask {mask_path} is {m.width}x{m.height} but its image {path} is "
                             f"{img.width}x{img.height}")
        alpha = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
    elif has_alpha:
        alpha = np.asarray(img.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
    else:
        raise InputError(f"{path} has no alpha channel and no mask file (looked for {path.stem}.mask.png, "
                         f"{path.stem}_mask.png, masks/{path.stem}.png); give RGBA or a mask")
    if alpha.max() <= 0.0:
        raise InputError(f"{path}: the mask is empty (no foreground pixel)")
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _resize(rgba: np.ndarray, size: int) -> np.ndarray:
    """Resize straight-alpha RGBA [H,W,4] to [size,size,4] by premultiplied area averaging (no halos)."""
    import torch
    import torch.nn.functional as F

    if rgba.shape[0] == size and rgba.shape[1] == size:
        return rgba
    t = torch.from_numpy(rgba).permute(2, 0, 1)[None]
    pre = torch.cat([t[:, :3] * t[:, 3:], t[:, 3:]], dim=1)
    out = F.interpolate(pre, size=(size, size), mode="area" if rgba.shape[0] > size else "bilinear",
                        align_corners=None if rgba.shape[0] > size else False)[0]
    a = out[3:].clamp(0, 1)
    rgb = torch.where(a > 1e-6, out[:3] / a.clamp_min(1e-6), torch.zeros_like(out[:3]))
    return torch.cat([rgb.clamp(0, 1), a], 0).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------
# Cameras.
# ----------------------------------------------------------------------------------------------------------


def check_cameras(c2w: np.ndarray, K: np.ndarray, sizes: list[tuple[int, int]], names: list[str]) -> None:
    """Poses must be rigid and finite, K must describe the image it belongs to, cameras must see the origin."""
    for i, name in enumerate(names):
        P, k = c2w[i], K[i]
        if not (np.isfinite(P).all() and np.isfinite(k).all()):
            raise InputError(f"camera of {name}: c2w or K is not finite")
        R = P[:3, :3].astype(np.float64)
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(R) - 1) > 1e-3 \
                or np.abs(P[3] - [0, 0, 0, 1]).max() > 1e-6:
            raise InputError(f"camera of {name}: c2w is not a rigid 4x4 transform (rotation + translation)")
        w, h = sizes[i]
        if k[0, 0] <= 0 or k[1, 1] <= 0 or abs(k[0, 2] - w / 2) > 0.02 * w or abs(k[1, 2] - h / 2) > 0.02 * h:
            raise InputError(f"camera of {name}: K (f={k[0, 0]:.1f}, c=({k[0, 2]:.1f}, {k[1, 2]:.1f})) does not "
                             f"describe a {w}x{h} image (principal point at its centre) — images and cameras "
                             f"do not match")
        if abs(k[0, 0] - k[1, 1]) > 1e-3 * k[0, 0]:
            raise InputError(f"camera of {name}: fx != fy (pixels must be square)")
        # The object sits at the origin: it must be in front of the camera.
        z = (np.linalg.inv(P.astype(np.float64)) @ np.array([0.0, 0, 0, 1]))[2]
        if z <= 0.0:
            raise InputError(f"camera of {name}: the origin (the object) is behind the camera")


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise InputError(f'{path}: expected {{"frames": [{{"file", "c2w", "K"}}, ...]}}')
    return data


def _inside(folder: Path, rel: str, what: str) -> Path:
    p = (folder / rel).resolve()
    if folder.resolve() not in p.parents:
        raise InputError(f"cameras.json: {what} '{rel}' points outside the input folder")
    if not p.is_file():
        raise InputError(f"cameras.json names {what} '{rel}', which does not exist in {folder}")
    return p


# ----------------------------------------------------------------------------------------------------------
# The folder.
# ----------------------------------------------------------------------------------------------------------


def read_views(folder: str | Path, size: int, layout: str | None = None, background: float = 1.0,
               expected_views: int | None = None) -> Views:
    """Read a folder of posed images (module docstring) resized to `size`² and composited on `background`.

    `expected_views` (e.g. the model's trained input count) is checked when given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"unknown layout '{layout}' (one of: {', '.join(LAYOUTS)})")
    rgba: list[np.ndarray]
    if layout is None and (folder / "cameras.npz").is_file():
        source = "render"
        with np.load(folder / "cameras.npz", allow_pickle=False) as z:
            c2w, K = z["c2w"].astype(np.float32), z["K"].astype(np.float32)
        paths = sorted(folder.glob("*.rgba.png"))
        if len(paths) != len(c2w):
            raise InputError(f"{folder}: cameras.npz has {len(c2w)} cameras but there are {len(paths)} "
                             f"*.rgba.png images")
        rgba = [load_rgba(p) for p in paths]
        names = [p.name for p in paths]
    elif layout is None and (folder / "cameras.json").is_file():
        source = "json"
        data = _read_json(folder / "cameras.json")
        rgba, c2w_l, K_l, names, mask_names = [], [], [], [], []
        for i, fr in enumerate(data["frames"]):
            if not isinstance(fr, dict) or not {"file", "c2w", "K"} <= fr.keys():
                raise InputError(f"cameras.json frame {i}: needs 'file', 'c2w' and 'K'")
            p = _inside(folder, str(fr["file"]), "image")
            m = _inside(folder, str(fr["mask"]), "mask") if fr.get("mask") else None
            try:
                P = np.asarray(fr["c2w"], dtype=np.float32).reshape(4, 4)
                k = np.asarray(fr["K"], dtype=np.float32).reshape(3, 3)
            except (ValueError, TypeError):
                raise InputError(f"cameras.json frame {i} ({p.name}): c2w must be 4x4 and K 3x3") from None
            rgba.append(load_rgba(p, m))
            if m is not None:
                mask_names.append(m.name)
            c2w_l.append(P)
            K_l.append(k)
            names.append(p.name)
        listed = set(names) | set(mask_names)
        extra = [p.name for p in list_images(folder) if p.name not in listed]
        if extra:
            raise InputError(f"images and cameras do not match: {len(extra)} image(s) in {folder} have no "
                             f"camera in cameras.json: {', '.join(extra[:5])}")
        c2w, K = np.stack(c2w_l), np.stack(K_l)
    elif layout is None and any(folder.glob(f"{RELEASED_CAMERA}*.txt")):
        source = "released"
        paths = sorted(folder.glob(f"{RELEASED_IMAGE}*.png"))
        if not paths:
            raise InputError(f"{folder} has released camera files ({RELEASED_CAMERA}*.txt) but no "
                             f"{RELEASED_IMAGE}*.png images")
        rgba, c2w_l, K_l = [], [], []
        for p in paths:
            cam = p.with_name(p.name.replace(RELEASED_IMAGE, RELEASED_CAMERA, 1)).with_suffix(".txt")
            if not cam.is_file():
                raise InputError(f"images and cameras do not match: {p.name} has no {cam.name}")
            w2c, k, (h, w) = read_released_camera(cam)
            img = load_rgba(p)
            if img.shape[:2] != (h, w):  # the released loader rescales K by the image height it reads
                k = k * np.array([[img.shape[1] / w], [img.shape[0] / h], [1.0]])
            rgba.append(img)
            c2w_l.append(released_to_ours(np.linalg.inv(w2c)))
            K_l.append(k)
        names = [p.name for p in paths]
        c2w, K = np.stack(c2w_l).astype(np.float32), np.stack(K_l).astype(np.float32)
    elif layout is None:
        raise InputError(f"{folder} has neither cameras.npz (a render folder) nor cameras.json nor released "
                         f"{RELEASED_CAMERA}*.txt files; name a layout (--layout {' | '.join(LAYOUTS)}) for images "
                         f"without cameras")
    else:
        source = layout
        paths = list_images(folder)
        if layout == "zero123pp" and len(paths) == 1:
            grid = load_rgba(paths[0])
            rgba = split_grid(grid, *ZERO123PP_GRID)
            names = [f"{paths[0].name}[{r},{c}]" for r in range(3) for c in range(2)]
        else:
            want = 4 if layout == "eval4" else 6
            if len(paths) != want:
                hint = " (or one 3x2 grid image)" if layout == "zero123pp" else ""
                raise InputError(f"layout '{layout}' needs {want} images{hint}; {folder} has {len(paths)}: "
                                 f"{', '.join(p.name for p in paths[:8])}")
            rgba = [load_rgba(p) for p in paths]
            names = [p.name for p in paths]
        side = rgba[0].shape[0]
        c2w, K = eval4_cameras(side) if layout == "eval4" else zero123pp_cameras(side)
        # A layout's K assumes square views of one size; a different file is an error, not a guess.
    if not 0 < len(rgba) <= MAX_VIEWS:
        raise InputError(f"{len(rgba)} views; between 1 and {MAX_VIEWS} are supported")
    sizes = [(a.shape[1], a.shape[0]) for a in rgba]
    for n, (w, h) in zip(names, sizes):
        if w != h:
            raise InputError(f"{n} is {w}x{h}; views must be square (pad or crop them first)")
    if source in LAYOUTS and len(set(sizes)) != 1:
        raise InputError(f"layout '{source}' needs images of one size; got {sorted(set(sizes))}")
    check_cameras(c2w, K, sizes, names)
    if expected_views is not None and len(rgba) != expected_views:
        raise InputError(f"{len(rgba)} input views, but this model takes {expected_views} "
                         f"(set loader.input_views to change it)")
    out_rgba = np.stack([_resize(a, size) for a in rgba])
    scale = np.array([size / w for w, _ in sizes], dtype=np.float32)
    K = K.astype(np.float32).copy()
    K[:, :2, :] *= scale[:, None, None]  # square pixels and a centred principal point survive the resize
    a = out_rgba[..., 3]
    rgb = out_rgba[..., :3] * a[..., None] + background * (1.0 - a[..., None])
    return Views(rgb=rgb.astype(np.float32), mask=a.astype(np.float32), c2w=c2w.astype(np.float32),
                 K=K, names=names, source=source)

