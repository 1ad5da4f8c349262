"""Batches: decoded samples written straight into one batch's buffers, composited, and finished on a device.

A batch is the dict of docs/ARCHITECTURE.md ("Loader batch"). Its images travel in one of two forms per
view group (input, supervision):

- **finished**: `g_rgb` [B,V,3,h,w] and `g_mask` [B,V,1,h,w] float32, composited on the background (and
  resized) in the loader's process;
- **uint8 views** (UINT8_KEYS): `g_rgba8` [B,V,h,w,4] uint8 straight alpha, exactly the stored pixels (a
  NeRF patch cut from them), for views that need no resize. `finish_batch(batch, device)` composites them
  on the training device, so a loader worker only decodes and copies bytes and ships a quarter of the
  bytes a float batch has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.layout import view_name
from training.data.decode import ViewSpec, depth_png, field, read_header, rgba_png, scale_K
from training.data.tario import failed_at

CAMERA_KEYS = ("input_c2w", "input_K", "sup_c2w", "sup_K")
UINT8_KEYS = ("input_rgba8", "sup_rgba8")  # [B,V,h,w,4] uint8 straight alpha, as stored; finish_batch composites


def _empty(nbytes: int, shared: bool) -> torch.Tensor:
    """uint8 tensor of `nbytes`; in shared memory when `shared` (a DataLoader worker then sends it without a copy)."""
    if shared and nbytes:
        try:  # the same private call torch's default_collate makes for the same reason
            proto = torch.empty(0, dtype=torch.uint8)
            return proto.new(proto._typed_storage()._new_shared(nbytes, device="cpu")).resize_(nbytes)
        except Exception:  # noqa: BLE001 - an older/newer torch without it: a plain tensor still works
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def uint8_groups(spec: ViewSpec, width: int, height: int) -> tuple[bool, bool]:
    """Whether (input, supervision) views of a sample stored at width x height travel as uint8 views: yes
    when the group needs no resize."""
    return spec.input_size == width == height, spec.sup_size == width == height


def batch_buffers(spec: ViewSpec, batch_size: int, shared: bool = False,
                  uint8: tuple[bool, bool] = (False, False)) -> dict[str, torch.Tensor]:
    """Uninitialised image tensors of one batch, filled slot by slot by `decode_into`.

    Per view group g (input, sup) with S = input_size, s = patch or sup_size: when `uint8` says so,
    `g_rgba8` [B,V,S|s,S|s,4] uint8 as stored; otherwise `g_rgb` [B,V,3,..] and `g_mask` [B,V,1,..]
    float32. sup_depth [B,Vs,1,s,s] float32 when depths.
    """
    B, Vi, Vs, S, s = batch_size, spec.input_views, spec.sup_views, spec.input_size, spec.patch or spec.sup_size
    f32, u8 = torch.float32, torch.uint8
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for g, V, n, as_u8 in (("input", Vi, S, uint8[0]), ("sup", Vs, s, uint8[1])):
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


def decode_into(head: dict[str, Any], sample: Mapping[str, Any], spec: ViewSpec, rng: np.random.Generator,
                out: dict[str, torch.Tensor], slot: int) -> dict[str, Any]:
    """Decode the picked views of one raw sample (its `read_header`) into `out[key][slot]` (`batch_buffers`).

    Only the picked views' PNGs are decoded. A view group in uint8 buffers gets the stored RGBA (a NeRF
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
        px = rgba_png(field(sample, name), (W, H), name)  # [H,W,4] u8
        if "input_rgba8" in out:
            npo["input_rgba8"][k] = px  # uint8 views: stored size == input size
        else:
            full = np.empty((4, H, W), np.float32)
            _composite(px, bg, full[:3], full[3:])
            x = _resize(torch.from_numpy(full), S, "bilinear")
            out["input_rgb"][slot, k] = x[:3]
            out["input_mask"][slot, k] = x[3:]
    input_K = np.stack([scale_K(K_all[i], S / W, S / H) for i in input_idx]) if input_idx else np.zeros((0, 3, 3), np.float32)

    s, p = spec.sup_size, spec.patch or spec.sup_size
    Ks = []
    for k, i in enumerate(sup_idx):
        name = view_name(i, "rgba", V)
        px = rgba_png(field(sample, name), (W, H), name)
        d = None
        if spec.depths:
            dname = view_name(i, "depth", V)
            d = depth_png(field(sample, dname), (W, H), dname)  # [H,W]
        y0, x0 = (int(v) for v in rng.integers(0, s - p + 1, size=2)) if spec.patch else (0, 0)
        if "sup_rgba8" in out:  # uint8 views: stored size == sup size; only the patch is copied
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
        K = scale_K(K_all[i], s / W, s / H)
        K[0, 2] -= x0  # the patch's pixel (0, 0) is the view's (x0, y0)
        K[1, 2] -= y0
        Ks.append(K)
    return {"uid": uid, "background": bg, "input_c2w": c2w_all[input_idx], "input_K": input_K,
            "sup_c2w": c2w_all[sup_idx], "sup_K": np.stack(Ks) if Ks else np.zeros((0, 3, 3), np.float32),
            "input_views": input_idx, "sup_views": sup_idx}


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


def decode_batches(src: Iterator[Mapping[str, Any]], spec: ViewSpec, rng: np.random.Generator, batch_size: int,
                   handler: Any, partial: bool = True, shared: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples -> batch dicts, each sample decoded straight into its batch slot (no per-sample tensors,
    no stacking copy). A sample that fails is handed to `handler` (True = skip it) and its slot reused.

    Groups that need no resize stay uint8 views (`uint8_groups`, composited later by `finish_batch`). A
    batch's buffers are laid out for its first sample's stored size, so a sample stored at a size that needs
    the other layout closes the batch early (shards of mixed resolutions)."""
    out: dict[str, torch.Tensor] | None = None
    layout: tuple[bool, bool] | None = None
    infos: list[dict[str, Any]] = []
    for sample in src:
        try:
            head = read_header(sample, spec, rng)
            m = uint8_groups(spec, head["W"], head["H"])
        except Exception as e:
            if handler(failed_at(e, sample.get("__url__"))):  # counted against the sample's shard
                continue
            raise
        if out is not None and m != layout:
            if infos:
                yield assemble(out, infos)
            out, infos = None, []
        if out is None:
            out, layout = batch_buffers(spec, batch_size, shared, m), m
        try:
            infos.append(decode_into(head, sample, spec, rng, out, len(infos)))
        except Exception as e:
            if handler(failed_at(e, sample.get("__url__"))):
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


def finish_batch(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A loader batch -> the float batch of docs/ARCHITECTURE.md, on `device` (None: where it is).

    Tensors move (non-blocking); uint8 views (UINT8_KEYS) are then composited there on the batch's
    backgrounds: g_rgb = rgb·a + bg·(1-a), g_mask = a, float32. Training calls this on the GPU, where it
    costs nothing. A finished batch only moves."""
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
