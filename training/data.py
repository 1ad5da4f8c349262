"""Streaming training loader: WebDataset shards -> batches of picked views, decoding only the picked PNGs.

Per sample (one asset, DESIGN "Shards") it draws `Vi` input and `Vs` supervision views (disjoint, seeded),
decodes just those PNGs from the raw tar bytes, composites RGBA on a background, resizes inputs to
`loader.input_size` (K scaled), brings supervision views to the stage's `render_size` with an optional random
patch (K shifted), and collates the batch documented in docs/ARCHITECTURE.md.

Streams: `resampled=True` is the training mode (each node draws from its own share of the shards, each
DataLoader worker with its own seeded RNG, `with_epoch` cuts the infinite stream into epochs);
`resampled=False` visits every sample of the shards exactly once per epoch across nodes x workers (shards
are split, after one seeded shuffle that all ranks agree on). A corrupt shard or sample is skipped with a
warning and counted, never raised. Everything random comes from one numpy RNG per (seed, epoch, rank, worker),
so the same seed gives the same batches.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.config import Config
from core.layout import MAX_META_BYTES, read_index_file, view_name
from training.tario import (  # noqa: F401 - expand_urls, tar_members: part of this module's API
    MAX_FIELD_BYTES,
    MAX_VIEWS,
    SkipCounter,
    expand_urls,
    open_stage,
    open_url,
    read_npz,
    tar_members,
    tar_samples,
)

try:  # libspng: the fast path for the render stage's 8-bit RGBA PNGs (optional; PIL decodes everything)
    import pyspng
except ImportError:  # pragma: no cover - pinned in requirements.txt; the GPU machine may lack it
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CAMERAS_BYTES = 1 << 20  # cameras.npz unpacked: c2w + K of MAX_VIEWS views in float64 is ~0.8 MB
BACKGROUNDS = ("white", "black", "random")


@dataclass(frozen=True)
class ViewSpec:
    """What one sample becomes. Sizes are square sides in pixels; `patch` 0 = the whole supervision view."""

    input_views: int = 4
    sup_views: int = 4
    input_size: int = 128
    sup_size: int = 64
    patch: int = 0
    background: str = "white"
    depths: bool = False  # sup_depth
    max_side: int = 4096  # stored views larger than max_side² are refused before decoding (loader.max_side)


def view_spec(cfg: Config, stage: str = "nerf", **overrides: Any) -> ViewSpec:
    """The stage's ViewSpec from the config: NeRF = patches of the render, mesh = full views with depth."""
    if stage == "nerf":
        s = ViewSpec(cfg.loader.input_views, cfg.nerf.sup_views, cfg.loader.input_size, cfg.nerf.render_size,
                     cfg.nerf.patch_size, cfg.loader.background, depths=False)
    elif stage == "mesh":
        s = ViewSpec(cfg.loader.input_views, cfg.mesh.sup_views, cfg.loader.input_size, cfg.mesh.render_size,
                     0, cfg.loader.background, depths=True)
    else:
        raise ValueError(f"stage must be 'nerf' or 'mesh', got {stage!r}")
    s = replace(s, max_side=cfg.loader.max_side)
    s = replace(s, **overrides)
    if s.background not in BACKGROUNDS:
        raise ValueError(f"loader.background must be one of {BACKGROUNDS}, got {s.background!r}")
    if s.patch and s.patch > s.sup_size:
        raise ValueError(f"patch {s.patch} larger than the supervision size {s.sup_size}")
    return s


# ----------------------------------------------------------------------------------------------------------
# Decoding one sample (raw field bytes -> tensors).
# ----------------------------------------------------------------------------------------------------------


def _field(raw: Mapping[str, bytes], name: str, limit: int = MAX_FIELD_BYTES) -> bytes:
    if name not in raw:
        raise KeyError(f"sample {raw.get('__key__', '?')}: field {name} missing")
    data = raw[name]
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise ValueError(f"sample {raw.get('__key__', '?')}: field {name} is not bytes under {limit} B")
    return data  # no copy: PIL and np.load read it through a BytesIO


def png_header(data: bytes, size: tuple[int, int], name: str) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk, whose size must be `size` (W, H): checked before
    anything is decoded, so no decompression bombs."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"{name}: not a PNG (no signature / IHDR)")
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    if (w, h) != size:
        raise ValueError(f"{name}: PNG {(w, h)}, expected PNG {size}")
    return depth, ctype


def _png(data: bytes, size: tuple[int, int], name: str) -> Image.Image:
    png_header(data, size, name)
    im = Image.open(io.BytesIO(data), formats=["PNG"])
    if im.size != size:
        raise ValueError(f"{name}: PNG {im.size}, expected PNG {size}")
    im.load()
    return im


def _rgba(data: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    """-> [H,W,4] uint8, straight alpha (an RGB file counts as fully opaque).

    8-bit RGBA (what the render stage writes) decodes with libspng (`pyspng`) where it is installed: 1.6x
    PIL's time at 512² and no copy out of PIL. Every other PNG, or no pyspng, goes through PIL."""
    if pyspng is not None and png_header(data, size, name) == (8, 6):
        px = pyspng.load(data)
        if px.shape != (size[1], size[0], 4) or px.dtype != np.uint8:
            raise ValueError(f"{name}: decoded to {px.dtype} {px.shape}, expected uint8 {(size[1], size[0], 4)}")
        return px
    im = _png(data, size, name)
    return np.asarray(im if im.mode == "RGBA" else im.convert("RGBA"))  # one copy out of PIL, no float image


def _depth_int(data: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    """16-bit PNG -> [H,W] integers, planar z times depth_scale (0 = background), undivided.

    Only 16-bit grayscale: an 8-bit depth would be read as depths 256x too small, without any error."""
    im = _png(data, size, name)
    if im.mode not in ("I;16", "I;16B", "I;16L"):
        raise ValueError(f"{name}: depth PNG mode {im.mode}, expected 16-bit grayscale")
    return np.asarray(im)


def _composite(px: np.ndarray, bg: np.ndarray, rgb_out: np.ndarray, mask_out: np.ndarray) -> None:
    """px [h,w,4] uint8 straight alpha -> rgb_out [3,h,w] = rgb·a + bg·(1-a), mask_out [1,h,w] = a, float32.

    Written in place into the batch buffers: five float32 passes per view and no temporary image (float64 or
    HWC float copies cost as much as decoding the PNG at 512²).
    """
    a = np.multiply(px[..., 3], np.float32(1.0 / 255.0), out=mask_out[0])  # [h,w]
    np.multiply(px[..., :3].transpose(2, 0, 1), np.float32(1.0 / 255.0), out=rgb_out)
    bgc = bg[:, None, None]
    np.subtract(rgb_out, bgc, out=rgb_out)  # (rgb - bg)·a + bg == rgb·a + bg·(1-a)
    np.multiply(rgb_out, a, out=rgb_out)
    np.add(rgb_out, bgc, out=rgb_out)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C,H,W] -> [C,size,size]; antialiased bilinear for colour/alpha, nearest for depth (no mixed surfaces)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x[None], size=(size, size), mode="nearest-exact")[0]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K of the same camera after resizing the image by (sx, sy) (pixel-edge convention, centre at W/2)."""
    K = K.astype(np.float32).copy()
    K[0, :] *= sx
    K[1, :] *= sy
    return K


def _background(spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.background == "white":
        return np.ones(3, np.float32)
    if spec.background == "black":
        return np.zeros(3, np.float32)
    return rng.random(3, dtype=np.float32)


IMAGE_KEYS = ("input_rgb", "input_mask", "sup_rgb", "sup_mask", "sup_depth")
CAMERA_KEYS = ("input_c2w", "input_K", "sup_c2w", "sup_K")
RAW_KEYS = ("input_rgba8", "sup_rgba8")  # [B,V,h,w,4] uint8 straight alpha, as stored; finish_batch composites


def _empty(nbytes: int, shared: bool) -> torch.Tensor:
    """uint8 tensor of `nbytes`; in shared memory when `shared` (a DataLoader worker then sends it without a copy)."""
    if shared and nbytes:
        try:  # the same private call torch's default_collate makes for the same reason
            proto = torch.empty(0, dtype=torch.uint8)
            return proto.new(proto._typed_storage()._new_shared(nbytes, device="cpu")).resize_(nbytes)
        except Exception:  # noqa: BLE001 - an older/newer torch without it: a plain tensor still works
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def raw_mode(spec: ViewSpec, width: int, height: int) -> tuple[bool, bool]:
    """Whether (input, supervision) views travel as the stored uint8 RGBA: yes when they need no resize."""
    return spec.input_size == width == height, spec.sup_size == width == height


def batch_buffers(spec: ViewSpec, batch_size: int, shared: bool = False,
                  raw: tuple[bool, bool] = (False, False)) -> dict[str, torch.Tensor]:
    """Uninitialised image tensors of one batch, filled slot by slot by `decode_into`.

    Per view group g (input, sup) with S = input_size, s = patch or sup_size: when `raw` says so,
    `g_rgba8` [B,V,S|s,S|s,4] uint8 as stored (straight alpha; `finish_batch` composites it, on the GPU in
    training, so a worker only decodes and copies bytes); otherwise `g_rgb` [B,V,3,..] and `g_mask`
    [B,V,1,..] float32, composited and resized here. sup_depth [B,Vs,1,s,s] float32 when depths.
    """
    B, Vi, Vs, S, s = batch_size, spec.input_views, spec.sup_views, spec.input_size, spec.patch or spec.sup_size
    f32, u8 = torch.float32, torch.uint8
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for g, V, n, as_u8 in (("input", Vi, S, raw[0]), ("sup", Vs, s, raw[1])):
        if as_u8:
            shapes[f"{g}_rgba8"] = ((B, V, n, n, 4), u8)
        else:
            shapes[f"{g}_rgb"], shapes[f"{g}_mask"] = ((B, V, 3, n, n), f32), ((B, V, 1, n, n), f32)
    if spec.depths:
        shapes["sup_depth"] = ((B, Vs, 1, s, s), f32)
    # One storage for the whole batch: a worker passes one shared-memory segment per batch, not one per key.
    # Every block's byte size is a multiple of 4 (RGBA, float32), so each float32 view starts aligned.
    nbytes = {k: int(np.prod(shape)) * dt.itemsize for k, (shape, dt) in shapes.items()}
    flat = _empty(sum(nbytes.values()), shared)
    out, at = {}, 0
    for k, (shape, dt) in shapes.items():
        out[k] = flat[at:at + nbytes[k]].view(dt).view(shape)
        at += nbytes[k]
    return out


def finish_batch(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A loader batch -> the float batch of docs/ARCHITECTURE.md, on `device` (None: where it is).

    Tensors move (non-blocking); uint8 RGBA views (RAW_KEYS) are then composited there on the batch's
    backgrounds: g_rgb = rgb·a + bg·(1-a), g_mask = a, float32. Training calls this on the GPU, where it costs
    nothing, and ships a quarter of the bytes a float batch has. A finished batch only moves."""
    dev = None if device is None else torch.device(device)
    out = {k: v.to(dev, non_blocking=True) if dev is not None and isinstance(v, torch.Tensor) else v
           for k, v in batch.items()}
    for g in ("input", "sup"):
        x = out.pop(f"{g}_rgba8", None)
        if x is None:
            continue
        B, V, h, w, _ = x.shape
        xc = x.permute(0, 1, 4, 2, 3)  # [B,V,4,h,w], a view: the copies below convert and transpose at once
        mask = torch.empty((B, V, 1, h, w), device=x.device).copy_(xc[:, :, 3:]).mul_(1.0 / 255.0)
        bg = out["background"].to(x.device, torch.float32)[:, None, :, None, None]
        rgb = torch.empty((B, V, 3, h, w), device=x.device).copy_(xc[:, :, :3]).mul_(1.0 / 255.0)
        out[f"{g}_rgb"] = rgb.sub_(bg).mul_(mask).add_(bg)  # (rgb - bg)·a + bg == rgb·a + bg·(1-a)
        out[f"{g}_mask"] = mask
    return out


def read_header(raw: Mapping[str, Any], spec: ViewSpec, rng: np.random.Generator,
                input_idx: Sequence[int] | None = None, sup_idx: Sequence[int] | None = None) -> dict[str, Any]:
    """A sample's small fields, checked: uid, depth_scale, stored size W x H, cameras, the picked views
    (drawn from `rng` unless given) and the background colour. Raises on anything malformed."""
    uid = raw.get("__key__", "?")
    meta = json.loads(_field(raw, "meta.json", MAX_META_BYTES))
    if not isinstance(meta, dict):
        raise ValueError(f"{uid}: meta.json is not an object")
    depth_scale = np.float32(meta.get("depth_scale", 10000.0))
    if not (np.isfinite(depth_scale) and depth_scale > 0):
        raise ValueError(f"{uid}: depth_scale {meta.get('depth_scale')!r} must be a finite number > 0")
    W, H, c2w_all, K_all = read_cameras(_field(raw, "cameras.npz"), spec.max_side, uid)
    V = len(c2w_all)
    if input_idx is None or sup_idx is None:
        need = spec.input_views + spec.sup_views
        if V < need:
            raise ValueError(f"{uid}: {V} views, need {need} ({spec.input_views} input + {spec.sup_views} supervision)")
        pick = rng.choice(V, size=need, replace=False)
        input_idx, sup_idx = pick[: spec.input_views].tolist(), pick[spec.input_views:].tolist()
    input_idx, sup_idx = [int(i) for i in input_idx], [int(i) for i in sup_idx]
    if (len(input_idx) != spec.input_views or len(sup_idx) != spec.sup_views or set(input_idx) & set(sup_idx)
            or max([*input_idx, *sup_idx], default=0) >= V or min([*input_idx, *sup_idx], default=0) < 0):
        raise ValueError(f"{uid}: bad view choice {input_idx} / {sup_idx} of {V}")
    return {"uid": uid, "depth_scale": depth_scale, "W": W, "H": H, "c2w": c2w_all, "K": K_all,
            "input_idx": input_idx, "sup_idx": sup_idx, "background": _background(spec, rng)}


def decode_into(head: dict[str, Any], raw: Mapping[str, Any], spec: ViewSpec, rng: np.random.Generator,
                out: dict[str, torch.Tensor], slot: int) -> dict[str, Any]:
    """Decode the picked views of one sample (its `read_header`) into `out[key][slot]` (`batch_buffers`).

    Only the picked views' PNGs are decoded. A view group in raw buffers gets the stored uint8 RGBA (a NeRF
    patch cut from it); otherwise it is composited in float32 and resized (antialiased bilinear; compositing
    after a uint8 resize would blend background in). Returns the sample's small fields: uid, background [3],
    input_c2w [Vi,4,4], input_K [Vi,3,3], sup_c2w, sup_K (float32 numpy) and the view indices.
    """
    uid, W, H, c2w_all, K_all = head["uid"], head["W"], head["H"], head["c2w"], head["K"]
    input_idx, sup_idx, bg, V = head["input_idx"], head["sup_idx"], head["background"], len(head["c2w"])
    npo = {k: v[slot].numpy() for k, v in out.items()}  # numpy views of this sample's slot
    S = spec.input_size
    for k, i in enumerate(input_idx):
        name = view_name(i, "rgba", V)
        px = _rgba(_field(raw, name), (W, H), name)  # [H,W,4] u8
        if "input_rgba8" in out:
            npo["input_rgba8"][k] = px  # raw_mode: stored size == input size
        else:
            full = np.empty((4, H, W), np.float32)
            _composite(px, bg, full[:3], full[3:])
            x = _resize(torch.from_numpy(full), S, "bilinear")
            out["input_rgb"][slot, k] = x[:3]
            out["input_mask"][slot, k] = x[3:]
    input_K = np.stack([_scale_K(K_all[i], S / W, S / H) for i in input_idx]) if input_idx else np.zeros((0, 3, 3), np.float32)

    s, p = spec.sup_size, spec.patch or spec.sup_size
    Ks = []
    for k, i in enumerate(sup_idx):
        name = view_name(i, "rgba", V)
        px = _rgba(_field(raw, name), (W, H), name)
        d = None
        if spec.depths:
            dname = view_name(i, "depth", V)
            d = _depth_int(_field(raw, dname), (W, H), dname)  # [H,W]
        y0, x0 = (int(v) for v in rng.integers(0, s - p + 1, size=2)) if spec.patch else (0, 0)
        if "sup_rgba8" in out:  # raw_mode: stored size == sup size; only the patch is copied
            npo["sup_rgba8"][k] = px[y0:y0 + p, x0:x0 + p]
            if d is not None:
                np.divide(d[y0:y0 + p, x0:x0 + p], head["depth_scale"], out=npo["sup_depth"][k][0], dtype=np.float32)
        else:
            full = np.empty((4, H, W), np.float32)
            _composite(px, bg, full[:3], full[3:])
            x = _resize(torch.from_numpy(full), s, "bilinear")[:, y0:y0 + p, x0:x0 + p]
            out["sup_rgb"][slot, k] = x[:3]
            out["sup_mask"][slot, k] = x[3:]
            if d is not None:
                dz = torch.from_numpy(np.divide(d, head["depth_scale"], dtype=np.float32))[None]
                out["sup_depth"][slot, k] = _resize(dz, s, "nearest")[:, y0:y0 + p, x0:x0 + p]
        K = _scale_K(K_all[i], s / W, s / H)
        K[0, 2] -= x0  # the patch's pixel (0, 0) is the view's (x0, y0)
        K[1, 2] -= y0
        Ks.append(K)
    return {"uid": uid, "background": bg, "input_c2w": c2w_all[input_idx], "input_K": input_K,
            "sup_c2w": c2w_all[sup_idx], "sup_K": np.stack(Ks) if Ks else np.zeros((0, 3, 3), np.float32),
            "input_views": input_idx, "sup_views": sup_idx}


def read_cameras(data: bytes, max_side: int, uid: str = "?") -> tuple[int, int, np.ndarray, np.ndarray]:
    """cameras.npz bytes -> (W, H, c2w [V,4,4] float32, K [V,3,3] float32), every bound checked first:
    unpacked size (read_npz), 1 <= V <= MAX_VIEWS, W == H in [1, max_side], finite poses."""
    z = read_npz(data, MAX_CAMERAS_BYTES, f"{uid}: cameras.npz")
    for k in ("c2w", "K", "width", "height"):
        if k not in z:
            raise ValueError(f"{uid}: cameras.npz has no {k!r}")
    c2w, K = z["c2w"], z["K"]
    V = len(c2w) if c2w.ndim else 0
    if c2w.shape != (V, 4, 4) or K.shape != (V, 3, 3) or not 1 <= V <= MAX_VIEWS:
        raise ValueError(f"{uid}: cameras.npz shapes c2w {c2w.shape}, K {K.shape} (want [V,4,4], [V,3,3], "
                         f"1 <= V <= {MAX_VIEWS})")
    if z["width"].size != 1 or z["height"].size != 1 or z["width"].dtype.kind not in "iu" \
            or z["height"].dtype.kind not in "iu":
        raise ValueError(f"{uid}: cameras.npz width/height must be integer scalars")
    W, H = int(z["width"].reshape(())), int(z["height"].reshape(()))
    if W != H or not 1 <= W <= max_side:
        raise ValueError(f"{uid}: views are {W}x{H}; the loader takes square views of side 1..{max_side} "
                         "(loader.max_side)")
    c2w, K = c2w.astype(np.float32), K.astype(np.float32)
    if not (np.isfinite(c2w).all() and np.isfinite(K).all()):
        raise ValueError(f"{uid}: non-finite camera values")
    return W, H, c2w, K


def assemble(out: dict[str, torch.Tensor], infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch buffers + the per-sample small fields of their first len(infos) slots -> the batch dict.

    The small fields (background, cameras) stay numpy until `as_tensors` in the receiving process: a worker
    pickles them by value, where every tensor would cost its own shared-memory segment and file-descriptor
    handshake (~0.4 ms each; five of them doubled the per-batch transfer at demo size)."""
    n = len(infos)
    batch: dict[str, Any] = {"uid": [i["uid"] for i in infos],
                             "background": np.stack([i["background"] for i in infos])}
    for k, v in out.items():
        batch[k] = v if len(v) == n else v[:n]
    for k in CAMERA_KEYS:
        batch[k] = np.stack([i[k] for i in infos])
    batch["input_views"] = [i["input_views"] for i in infos]
    batch["sup_views"] = [i["sup_views"] for i in infos]
    return batch


def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """numpy fields of a batch -> tensors sharing their memory (no copy)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _identity(x: Any) -> Any:  # the DataLoader's collate_fn: no default_convert of numpy fields in the worker
    return x


def decode_sample(raw: Mapping[str, Any], spec: ViewSpec, rng: np.random.Generator,
                  input_idx: Sequence[int] | None = None, sup_idx: Sequence[int] | None = None) -> dict[str, Any]:
    """One sample of raw field bytes -> unbatched float tensors (the finished batch dict without the B axis).

    Views are drawn from `rng` unless given. Only the picked views' PNGs are decoded. Shapes:
    input_rgb [Vi,3,S,S], input_mask [Vi,1,S,S], input_c2w [Vi,4,4], input_K [Vi,3,3] (S = input_size);
    sup_rgb [Vs,3,s,s], sup_mask [Vs,1,s,s], sup_depth [Vs,1,s,s], sup_c2w, sup_K (s = patch or sup_size);
    background [3].
    """
    if input_idx is not None and sup_idx is not None:
        spec = replace(spec, input_views=len(input_idx), sup_views=len(sup_idx))
    head = read_header(raw, spec, rng, input_idx, sup_idx)
    out = batch_buffers(spec, 1, raw=raw_mode(spec, head["W"], head["H"]))
    b = finish_batch(as_tensors(assemble(out, [decode_into(head, raw, spec, rng, out, 0)])))
    return {k: v[0] for k, v in b.items()}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts into the batch dict (tensors get a leading B axis; lists stay lists)."""
    batch: dict[str, Any] = {}
    for k in samples[0]:
        if k.startswith("__"):  # WebDataset's bookkeeping (__key__, __url__); uid carries the key
            continue
        vals = [s[k] for s in samples]
        batch[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return batch


def decode_batches(src: Iterator[Mapping[str, Any]], spec: ViewSpec, rng: np.random.Generator, batch_size: int,
                   handler: Any, partial: bool = True, shared: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples -> batch dicts, each sample decoded straight into its batch slot (no per-sample tensors,
    no stacking copy). A sample that fails is handed to `handler` (True = skip it) and its slot reused.

    A batch's buffers are laid out for its first sample's stored size (`raw_mode`); a sample stored at a
    size that needs the other layout closes the batch early (shards of mixed resolutions)."""
    out: dict[str, torch.Tensor] | None = None
    mode: tuple[bool, bool] | None = None
    infos: list[dict[str, Any]] = []
    for raw in src:
        try:
            head = read_header(raw, spec, rng)
            m = raw_mode(spec, head["W"], head["H"])
        except Exception as e:
            if handler(e):
                continue
            raise
        if out is not None and m != mode:
            if infos:
                yield assemble(out, infos)
            out, infos = None, []
        if out is None:
            out, mode = batch_buffers(spec, batch_size, shared, m), m
        try:
            infos.append(decode_into(head, raw, spec, rng, out, len(infos)))
        except Exception as e:
            if handler(e):
                continue
            raise
        ok = getattr(handler, "ok", None)
        if ok is not None:
            ok()  # a run of failures is over (SkipCounter raises after too many in a row)
        if len(infos) == batch_size:
            yield assemble(out, infos)
            out, infos = None, []
    if infos and partial:
        yield assemble(out, infos)


# ----------------------------------------------------------------------------------------------------------
# A render folder as a sample (eval / reconstruct read the same way as training).
# ----------------------------------------------------------------------------------------------------------


class RenderFolder(Mapping):
    """A render folder (`renders/<uid>/` or `renders_eval/<uid>/orbit/`) as a lazy raw sample: field -> bytes."""

    def __init__(self, folder: str | Path, uid: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / "cameras.npz").is_file():
            raise FileNotFoundError(f"{self.folder}: no cameras.npz (not a render folder)")
        self.uid = uid or self.folder.name

    def __getitem__(self, name: str) -> Any:
        if name == "__key__":
            return self.uid
        p = self.folder / name
        if "/" in name or not p.is_file():
            raise KeyError(name)
        return p.read_bytes()

    def __contains__(self, name: object) -> bool:
        return name == "__key__" or (isinstance(name, str) and "/" not in name and (self.folder / name).is_file())

    def __iter__(self) -> Iterator[str]:
        return iter(["__key__", *sorted(p.name for p in self.folder.iterdir() if p.is_file())])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def load_render_folder(folder: str | Path, input_views: Sequence[int], sup_views: Sequence[int] = (),
                       spec: ViewSpec | None = None, uid: str | None = None) -> dict[str, Any]:
    """Read chosen views of one render folder into the per-sample dict `decode_sample` gives.

    `spec` sets sizes and background (default: the stored size, white, depths, no patch).
    """
    raw = RenderFolder(folder, uid)
    if spec is None:
        side = read_cameras(raw["cameras.npz"], ViewSpec.max_side, raw.uid)[0]
        spec = ViewSpec(len(input_views), len(sup_views), side, side, 0, "white", True)
    return decode_sample(raw, spec, np.random.default_rng(0), list(input_views), list(sup_views))


# ----------------------------------------------------------------------------------------------------------
# Streams: shard URLs -> tar samples -> decoded samples -> batches.
# ----------------------------------------------------------------------------------------------------------


def skip_unused(spec: ViewSpec) -> Any:
    """Members the loader never reads for `spec` (normals; depth unless asked; geometry): not kept in memory."""
    def skip(name: str) -> bool:
        return name.endswith((".normal.png", ".geometry.npz")) or (not spec.depths and name.endswith(".depth.png"))

    return skip


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class SampleStream(torch.utils.data.IterableDataset):
    """The per-process pipeline; built inside each DataLoader worker so it knows its own worker id."""

    def __init__(self, urls: list[str], spec: ViewSpec, batch_size: int, *, resampled: bool, seed: int,
                 rank: int, world_size: int, shuffle_buffer: int, batches_per_epoch: int = 0,
                 max_consecutive_failures: int = 100):
        super().__init__()
        if not urls:
            raise ValueError("no shard URLs")
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.resampled, self.seed, self.rank, self.world_size = resampled, seed, rank, world_size
        self.shuffle_buffer, self.batches_per_epoch = shuffle_buffer, batches_per_epoch
        self.max_consecutive_failures = max_consecutive_failures
        self.epoch = 0

    def node_shards(self) -> list[str]:
        """This node's shards: one seeded shuffle every rank agrees on, then every world_size-th shard."""
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if self.resampled and len(order) < self.world_size:
            return order  # too few shards to split; ranks still differ through their RNG seeds
        return order[self.rank::self.world_size]

    def _shards(self, worker: int, workers: int, rng: random.Random) -> Iterator[dict]:
        shards = self.node_shards()
        if self.resampled:
            if not shards:
                return
            while True:  # with_epoch cuts this
                yield {"url": rng.choice(shards)}
        else:
            for u in shards[worker::workers]:
                yield {"url": u}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # One seed per (seed, epoch, rank, worker): numpy's SeedSequence, not hash(), so it is the same everywhere.
        ss = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker])
        rng = np.random.default_rng(ss)
        py_rng = random.Random(int(ss.generate_state(1)[0]))
        # A resampled stream never ends: a systematic failure must raise instead of warning forever. A
        # finite pass (resampled=False) just skips what is bad and ends.
        handler = SkipCounter(max_consecutive=self.max_consecutive_failures if self.resampled else 0)

        def tagged(batches: Iterator[dict]) -> Iterator[dict]:
            for b in batches:
                b["_worker"], b["_skipped"] = worker, handler.count
                yield b

        stages: list[Any] = [
            lambda: self._shards(worker, workers, py_rng),
            partial(open_stage, handler=handler),
            partial(tar_samples, handler=handler, skip=skip_unused(self.spec)),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 16), rng=py_rng))
        # Batches are decoded straight into (shared-memory, in a worker) buffers: no per-sample stack, no copy
        # into shared memory when the DataLoader sends them to the trainer.
        stages += [partial(decode_batches, spec=self.spec, rng=rng, batch_size=self.batch_size, handler=handler,
                           partial=not self.resampled, shared=info is not None), tagged]
        pipe = wds.DataPipeline(*stages)
        if self.resampled:
            pipe = pipe.with_epoch(nbatches=self.batches_per_epoch)
        yield from pipe


class ShardLoader:
    """Iterable of batches (dicts, see docs/ARCHITECTURE.md). `set_epoch(e)` reseeds; `skipped` counts skips.

    `raw=True` leaves views that need no resize as uint8 RGBA (RAW_KEYS) for `finish_batch(b, device)` to
    composite on the GPU (batches are then pinned when CUDA is there); otherwise batches come finished, float32
    on the CPU, composited in this process."""

    def __init__(self, stream: SampleStream, workers: int, raw: bool = False):
        self.stream, self.workers, self.raw = stream, workers, raw
        self._skipped: dict[int, int] = {}

    @property
    def skipped(self) -> int:
        """Corrupt shards/samples skipped so far in this epoch (summed over workers)."""
        return sum(self._skipped.values())

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._skipped = {}
        if self.workers > 0:
            it: Any = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                                  persistent_workers=False, collate_fn=_identity,
                                                  pin_memory=self.raw and torch.cuda.is_available())
        else:
            it = self.stream
        for b in it:
            self._skipped[b.pop("_worker")] = b.pop("_skipped")
            b = as_tensors(b)
            yield b if self.raw else finish_batch(b)


def make_loader(cfg: Config, urls: str | Sequence[str], stage: str = "nerf", *, batch_size: int | None = None,
                resampled: bool | None = None, epoch_samples: int | None = None, workers: int | None = None,
                seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                raw: bool = False, **spec_overrides: Any) -> ShardLoader:
    """Batches for `stage` ("nerf" | "mesh") from shard `urls` (`raw`: see ShardLoader).

    Arguments left None come from the config (`loader.*`, the stage's `batch_size`); rank/world size from
    torch.distributed or RANK/WORLD_SIZE. `epoch_samples` is per worker for the resampled stream (0 = the
    number of samples the index lists for these shards, spread over ranks x workers). `spec_overrides` are
    ViewSpec fields (e.g. `depths=True`, `patch=0`, `background="random"`).
    """
    spec = view_spec(cfg, stage, **spec_overrides)
    lc = cfg.loader
    batch_size = batch_size or (cfg.nerf.batch_size if stage == "nerf" else cfg.mesh.batch_size)
    resampled = lc.resampled if resampled is None else resampled
    workers = lc.workers if workers is None else workers
    seed = lc.seed if seed is None else seed
    rank, world_size = dist_info(rank, world_size)
    shard_list = expand_urls(urls)
    if not shard_list:
        raise FileNotFoundError(f"no shards match {urls!r}")
    per_epoch = 0
    if resampled:
        n = lc.epoch_samples if epoch_samples is None else epoch_samples
        if n <= 0:
            n = -(-_indexed_samples(shard_list) // (world_size * max(1, workers)))
        per_epoch = max(1, n // batch_size)
    stream = SampleStream(shard_list, spec, batch_size, resampled=resampled, seed=seed, rank=rank,
                          world_size=world_size, shuffle_buffer=lc.shuffle_buffer, batches_per_epoch=per_epoch,
                          max_consecutive_failures=lc.max_consecutive_failures)
    return ShardLoader(stream, workers, raw)


def _indexed_samples(urls: list[str]) -> int:
    """Samples in these shards according to the index.parquet beside them (local shards only)."""
    first = Path(urls[0].removeprefix("file:"))
    index = first.parent / "index.parquet"
    if urlparse(urls[0]).scheme not in ("", "file") or not index.is_file():
        raise ValueError("loader.epoch_samples=0 needs index.parquet beside local shards; set loader.epoch_samples")
    names = {Path(u.removeprefix("file:")).name for u in urls}
    return sum(r["count"] for r in read_index_file(index) if r["shard"] in names)
