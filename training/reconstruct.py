"""Reconstruction: posed images → triplane → mesh → (texture refinement) → textured GLB. `make reconstruct`.

    python -m training.reconstruct --input DIR --checkpoint CKPT [--layout eval4|zero123pp] [--no-refine]
                                   [--tune both|color|triplane] [--output DIR] [--config ...] [key=value ...]

The input folder is read by `training.recon_inputs` (render folder, cameras.json or a named layout). The
checkpoint is ours (a `step-N/` folder or a run folder: the newest valid step) or the authors' released
`ckpt.pth` (with `--config configs/official.yaml`, converted on load; the frame transform is inside the
model). Output folder (default OUT/reconstruct/<asset name>/: a render folder's uid, else the input folder's
name, its parent's for a generic one like `inputs/`; `output_folder` says more), written under a temporary
name and renamed:

    mesh.glb             UV-textured mesh (xatlas + baked f_c), Y-up glTF (training/export.py)
    mesh_texture.png     the baked texture;  mesh_vc.glb with refine.vertex_colors=true
    turntable.gif        the textured mesh turning around (rasterized, f_c at the surface)
    inputs_sheet.png     rows: input views, feed-forward re-render, refined re-render
    timings.json         seconds per phase (triplane, mesh, refine, export) and input-view PSNR before/after

The Python API behind it, for evaluation and notebooks, is `training.inference` (`load_model`,
`reconstruct(model, images, c2w, K, cfg, refine=..., tune=...)`, `Result`). Bad input exits with code 2 and
a message naming the problem (`InputError`, `ReconstructError` and its kinds).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.config import Config, to_dict
from core.sheets import SheetRow, write_sheet
from training.export import export_glb
from training.inference import (
    InputError,
    ReconstructError,
    Result,
    Views,
    load_model,
    read_views,
    reconstruct,
)
from training.mesh import mesh_backends
from training.ops.raster import Rasterizer
from training.recon_inputs import LAYOUTS

# ----------------------------------------------------------------------------------------------------------
# Pictures and files.
# ----------------------------------------------------------------------------------------------------------


def _to_uint8(img: Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] → [H,W,3] uint8."""
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def turntable_cameras(frames: int, size: int, elevation_deg: float = 20.0, distance: float = 2.6,
                      fov_deg: float = 40.0) -> tuple[Tensor, Tensor]:
    """`frames` cameras around the object (azimuth 360°·i/frames), c2w [T,4,4], K [T,3,3]."""
    from core.cameras import intrinsics, look_at, spherical_position

    c2w = np.stack([look_at(spherical_position(360.0 * i / frames, elevation_deg, distance)) for i in range(frames)])
    return torch.tensor(c2w), torch.tensor(np.stack([intrinsics(fov_deg, size)] * frames))


def write_turntable(path: Path, frames: list[np.ndarray], fps: int = 12) -> None:
    from PIL import Image

    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, format="GIF", save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def write_outputs(result: Result, model: nn.Module, views: Views, out_dir: Path, cfg: Config,
                  extra: dict[str, Any] | None = None, turntable_frames: int = 24, picture_size: int = 256,
                  progress: bool = False) -> dict[str, Any]:
    """Write mesh.glb (+ texture, + vertex-colour variant), turntable.gif, inputs_sheet.png, timings.json
    into the existing folder `out_dir`; returns the timings dict."""

    out_dir = Path(out_dir)
    t = time.perf_counter()
    info = export_glb(out_dir / "mesh.glb", result.verts.cpu().numpy(), result.faces.cpu().numpy(),
                      result.color_fn(model), texture_size=cfg.refine.texture_size,
                      vertex_colors=cfg.refine.vertex_colors, max_faces=cfg.refine.export_faces)
    export_s = time.perf_counter() - t

    device = result.planes.device
    rz = Rasterizer(mesh_backends(cfg.mesh)[1], device)
    size = min(picture_size, max(views.rgb.shape[1], 64))

    def render(c2w: Tensor, K: Tensor, feedforward: bool = False) -> Tensor:
        return result.render(model, c2w, K, size, feedforward=feedforward, rasterizer=rz)["rgb"].float().cpu()

    c2w, K = turntable_cameras(turntable_frames, size)
    frames = []
    for i in range(0, turntable_frames, 8):  # a few views at a time bounds the rasterizer's memory
        frames += [_to_uint8(im) for im in render(c2w[i:i + 8], K[i:i + 8])]
    write_turntable(out_dir / "turntable.gif", frames)

    S = views.rgb.shape[1]
    in_c2w, in_K = torch.tensor(views.c2w), torch.tensor(views.K) * (size / S)
    in_K[:, 2, 2] = 1.0
    rgb_in = torch.tensor(views.rgb).permute(0, 3, 1, 2)
    rgb_in = torch.nn.functional.interpolate(rgb_in, size=(size, size), mode="area" if S > size else "bilinear")
    row_in = [_to_uint8(im) for im in rgb_in]
    row_ff = [_to_uint8(im) for im in render(in_c2w, in_K, feedforward=True)]
    rows, labels = [row_in, row_ff], ["input views", f"feed-forward mesh ({result.psnr_before:.2f} dB)"]
    if result.refine is not None:
        rows.append([_to_uint8(im) for im in render(in_c2w, in_K)])
        labels.append(f"refined, tune={cfg.refine.tune if extra is None else extra.get('tune', cfg.refine.tune)}"
                      f" ({result.psnr_after:.2f} dB)")
    write_sheet(out_dir / "inputs_sheet.png", [SheetRow(t, r) for t, r in zip(labels, rows)], labels="above")

    timings = {
        "seconds": {**{k: round(v, 4) for k, v in result.timings.items()}, "export": round(export_s, 4)},
        "psnr_input_views": {"before_refinement": result.psnr_before, "after_refinement": result.psnr_after},
        "refine_losses": result.refine.losses if result.refine is not None else [],
        "mesh": {"vertices": int(len(result.verts)), "faces": int(len(result.faces)),
                 "glb_vertices": info.vertices, "glb_faces": info.faces, "texture_size": info.texture_size,
                 "texture_coverage": round(info.coverage, 4), "export_seconds": info.seconds},
        "views": {"count": len(views), "names": views.names, "source": views.source, "size": int(S)},
        "device": str(device),
        **(extra or {}),
    }
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2, default=str))
    return timings


# ----------------------------------------------------------------------------------------------------------
# Where the output goes.
# ----------------------------------------------------------------------------------------------------------

# Folder names that say what a folder holds, not which asset: `OUT/evalsets/<slug>/renders_eval/<uid>/inputs`
GENERIC_NAMES = {"inputs", "input", "orbit", "images", "image", "views", "view", "rgb", "rgba", "renders", "frames"}
IDENTITY_KEYS = ("input", "checkpoint", "layout", "refine", "tune")  # what makes two reconstructions the same


def safe_name(text: str) -> str:
    """`text` as a file-system and WebDataset-safe name: [A-Za-z0-9_-], at most 64 characters ("" if none)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:64].strip("-")


def asset_name(input_dir: str | Path) -> str:
    """The name of the asset an input folder shows: the uid in its meta.json (a render folder of ours), else
    the folder's own name, or its parent's when the folder's name is generic (`inputs`, `images`, ...)."""
    from core.layout import MAX_META_BYTES, UID_RE

    folder = Path(input_dir).resolve()
    meta = folder / "meta.json"
    try:
        if meta.is_file() and meta.stat().st_size <= MAX_META_BYTES:
            uid = json.loads(meta.read_text()).get("uid")
            if isinstance(uid, str) and UID_RE.match(uid):
                return uid
    except (OSError, ValueError, AttributeError):
        pass  # not a render folder of ours: named by its path
    parts = [p for p in (folder.name, folder.parent.name) if p]
    while len(parts) > 1 and parts[0].lower() in GENERIC_NAMES:
        parts.pop(0)
    return safe_name(parts[0]) or "reconstruction"


def output_folder(root: Path, name: str, identity: dict[str, Any], force: bool = False) -> tuple[Path, bool]:
    """(folder, already done) for a reconstruction named `name` under `root`, never another's folder.

    `root/name` if it is free or holds this same reconstruction (timings.json with the same input,
    checkpoint, layout, refine and tune); otherwise the first free or same `name-2`, `name-3`, ... .
    `done` is True when that folder is complete and `force` is not set (the command then has nothing to do).
    """
    for k in range(1, 10_000):
        folder = root / (name if k == 1 else f"{name}-{k}")
        if not folder.exists():
            return folder, False
        timings = folder / "timings.json"
        try:
            old = json.loads(timings.read_text()) if timings.is_file() else None
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and all(old.get(key) == identity.get(key) for key in IDENTITY_KEYS):
            return folder, not force
    raise RuntimeError(f"no free output folder for {name} under {root}")


# ----------------------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from core.cli import config_from_args, stage_parser
    from core.io import atomic_dir, clean_temporaries
    from core.lock import stage_lock

    p = stage_parser(__doc__)
    p.add_argument("--input", required=True, help="folder of posed images (see training/recon_inputs.py)")
    p.add_argument("--checkpoint", required=True, help="step-N/ folder or run folder (ours), or a released ckpt.pth")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="named camera layout for images without cameras")
    p.add_argument("--output", default=None, help="output folder (default OUT/reconstruct/<asset name>, suffixed "
                   "-2, -3, ... when that holds another reconstruction)")
    p.add_argument("--no-refine", action="store_true", help="feed-forward only (skip texture refinement)")
    p.add_argument("--tune", choices=("both", "color", "triplane"), default=None,
                   help="what refinement fine-tunes (Table 3; default refine.tune)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--force", action="store_true", help="redo an output folder that is already complete")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.tune:
        cfg.refine.tune = args.tune
    identity = {"input": str(Path(args.input).resolve()), "checkpoint": str(Path(args.checkpoint).resolve()),
                "layout": args.layout, "refine": not args.no_refine, "tune": cfg.refine.tune}
    if args.output:  # the user's own choice of folder: redone only with --force, whatever it holds
        out_dir, done = Path(args.output), (Path(args.output) / "timings.json").is_file() and not args.force
    else:
        out_dir, done = output_folder(cfg.out_path / "reconstruct", asset_name(args.input), identity, args.force)
    if done:
        print(f"{out_dir} is complete (timings.json present); nothing to do (--force redoes it)")
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    try:
        views = read_views(args.input, cfg.loader.input_size, layout=args.layout,
                           background=cfg.model.background)
        model, what = load_model(args.checkpoint, cfg, device)
        print(f"{len(views)} views ({views.source}) from {args.input}; {what}; device {device}", flush=True)
        images = torch.cat([torch.tensor(views.rgb).permute(0, 3, 1, 2), torch.tensor(views.mask)[:, None]], 1)
        result = reconstruct(model, images, torch.tensor(views.c2w), torch.tensor(views.K), cfg,
                             refine=not args.no_refine, progress=True, background=cfg.model.background)
    except (InputError, ReconstructError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = {**identity, "config": to_dict(cfg)}
    with stage_lock(cfg.out_path, "reconstruct"):  # a concurrent reconstruction never takes the same folder
        if not args.output:  # chosen again now: another run may have taken `name` while this one computed
            out_dir, _ = output_folder(cfg.out_path / "reconstruct", asset_name(args.input), identity, force=True)
        clean_temporaries(out_dir.parent, of=out_dir.name)  # only this folder's leftovers of dead runs
        with atomic_dir(out_dir, overwrite=True) as tmp:
            timings = write_outputs(result, model, views, Path(tmp), cfg, extra=extra)
    s = timings["seconds"]
    print(f"wrote {out_dir}: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items())
          + f"; input-view PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
