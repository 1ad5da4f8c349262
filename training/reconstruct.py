"""Reconstruction: posed images → triplane → mesh → (texture refinement) → textured GLB. `make reconstruct`.

    python -m training.reconstruct --input DIR --checkpoint CKPT [--layout eval4|zero123pp] [--no-refine]
                                   [--tune both|color|triplane] [--output DIR] [--config ...] [key=value ...]

The input folder is read by `training.recon_inputs` (render folder, cameras.json or a named layout). The
checkpoint is ours (a `step-N/` folder or a run folder: the newest valid step) or the authors' released
`ckpt.pth` (with `--config configs/official.yaml`, converted on load; the frame transform is inside the
model). Output folder (default OUT/reconstruct/<input name>/), written under a temporary name and renamed:

    mesh.glb             UV-textured mesh (xatlas + baked f_c), Y-up glTF (training/export.py)
    mesh_texture.png     the baked texture;  mesh_vc.glb with refine.vertex_colors=true
    turntable.gif        the textured mesh turning around (rasterized, f_c at the surface)
    inputs_sheet.png     rows: input views, feed-forward re-render, refined re-render
    timings.json         seconds per phase (triplane, mesh, refine, export) and input-view PSNR before/after

Python API, for evaluation and notebooks: `reconstruct(model, images, c2w, K, cfg, refine=..., tune=...)`.
Bad input exits with code 2 and a message naming the problem (`ReconstructError` and its kinds).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.config import Config, to_dict
from training.recon_inputs import LAYOUTS, InputError, Views, read_views
from training.refine import RefineResult, psnr, rasterize_surface, refine_texture, shade

# Model-config keys that only change how a model is run, not which weights it has.
RUNTIME_MODEL_KEYS = {"samples_per_ray", "render_chunk", "near_min", "background"}


class ReconstructError(ValueError):
    """A reconstruction that cannot run as asked; the message names the problem."""


class CheckpointMismatch(ReconstructError):
    """A checkpoint that does not belong to the configured model."""


class EmptyMeshError(ReconstructError):
    """The density field has no surface at the configured level (nothing to texture)."""


# ----------------------------------------------------------------------------------------------------------
# The Python API.
# ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Result:
    """One reconstruction. Tensors live on the model's device unless noted."""

    verts: Tensor  # [N,3] float32, canonical frame
    faces: Tensor  # [F,3] int64
    planes: Tensor  # [1,3,C,R,R] the planes the texture comes from (refined when refined)
    planes_feedforward: Tensor  # [1,3,C,R,R] the generator's output
    color_mlp: nn.Module  # f_c the texture comes from (the per-asset copy when refined, else the model's)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: triplane, mesh, refine
    psnr_before: float = float("nan")  # input views re-rendered from the feed-forward mesh
    psnr_after: float = float("nan")  # ... after refinement (= before without refinement)
    refine: RefineResult | None = None

    def color_fn(self, model: nn.Module, chunk: int = 1 << 18) -> Callable[[np.ndarray], np.ndarray]:
        """points [N,3] numpy (canonical frame) → colours [N,3] in [0,1]: f_c of this result (for export)."""
        from training.refine import color_model, query_color

        device = self.planes.device

        def fn(points: np.ndarray) -> np.ndarray:
            out = []
            with torch.no_grad(), color_model(model, self.color_mlp) as m:
                for p in torch.from_numpy(np.asarray(points, np.float32)).to(device).split(chunk):
                    out.append(query_color(m, self.planes, p[None])[0].float().cpu())
            return torch.cat(out).numpy() if out else np.zeros((0, 3), np.float32)

        return fn

    def render(self, model: nn.Module, c2w: Tensor, K: Tensor, size: int, background: float = 1.0,
               feedforward: bool = False, rasterizer: Any = None) -> Tensor:
        """Rasterize the mesh from cameras c2w [V,4,4] / K [V,3,3] (for size²) → rgb [V,3,size,size] on CPU."""
        from training.ops.raster import make_rasterizer

        device = self.planes.device
        rz = rasterizer or make_rasterizer("auto", device)
        surf = rasterize_surface(rz, self.verts, self.faces, c2w.to(device), K.to(device), size, size)
        planes, fc = (self.planes_feedforward, None) if feedforward else (self.planes, self.color_mlp)
        with torch.no_grad():
            return shade(model, planes, surf, fc, background, rz).float().cpu()


def reconstruct(model: nn.Module, images: Tensor, c2w: Tensor, K: Tensor, cfg: Config, refine: bool = True,
                tune: str | None = None, rasterizer: Any = None, progress: bool = False,
                background: float = 1.0) -> Result:
    """Reconstruct one asset.

    images [V,4,H,W] (or [1,V,4,H,W]): RGB composited on `background`, then the mask; c2w [V,4,4] OpenCV
    and K [V,3,3] for H×W, in our canonical frame. cfg.mesh.grid / level_mode / sdf_level / mc_backend choose the mesh;
    cfg.refine the refinement (`tune` overrides cfg.refine.tune for Table 3's rows). Runs on the model's
    device. Raises EmptyMeshError when the field has no surface.
    """
    from training.mesh import extract_mesh
    from training.mesh_level import mesh_level
    from training.ops.raster import make_rasterizer

    if images.ndim == 5:
        if images.shape[0] != 1:
            raise ReconstructError(f"one asset at a time: images [1,V,4,H,W], got {tuple(images.shape)}")
        images, c2w, K = images[0], c2w.reshape(-1, 4, 4), K.reshape(-1, 3, 3)
    if images.ndim != 4 or images.shape[1] != 4:
        raise ReconstructError(f"images must be [V,4,H,W] (RGB + mask), got {tuple(images.shape)}")
    V, _, H, W = images.shape
    if c2w.shape != (V, 4, 4) or K.shape != (V, 3, 3):
        raise ReconstructError(f"{V} images need c2w [{V},4,4] and K [{V},3,3]; got {tuple(c2w.shape)}, "
                               f"{tuple(K.shape)}")
    device = next(model.parameters()).device
    images, c2w, K = images.to(device).float(), c2w.to(device).float(), K.to(device).float()
    rz = rasterizer or make_rasterizer(cfg.mesh.raster_backend, device)
    timings: dict[str, float] = {}

    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        planes = model.triplane(images[None], c2w[None], K[None]).float()
    _sync(device)
    timings["triplane"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.no_grad():
        level = mesh_level(model, planes, c2w, K, W, cfg.mesh)  # the input views pick it (mesh.level_mode)
        verts, faces = extract_mesh(model, planes, cfg.mesh.grid, level, backend=cfg.mesh.mc_backend)
    _sync(device)
    timings["mesh"] = time.perf_counter() - t
    if len(faces) == 0:
        raise EmptyMeshError(f"the density field has no surface at level {level:.3g} on a "
                             f"{cfg.mesh.grid}³ grid (an untrained model, or inputs the model cannot read)")
    verts, faces = verts.float().detach(), faces.long().detach()

    rgb = images[:, :3]
    t = time.perf_counter()
    if refine:
        rcfg = dataclasses.replace(cfg.refine, tune=tune or cfg.refine.tune)
        res = refine_texture(model, planes, verts, faces, rgb, c2w, K, rcfg, background=background,
                             rasterizer=rz, progress=progress)
        timings["refine"] = time.perf_counter() - t
        return Result(verts=verts, faces=faces, planes=res.planes, planes_feedforward=planes,
                      color_mlp=res.color_mlp, timings=timings, psnr_before=res.psnr_before,
                      psnr_after=res.psnr_after, refine=res)
    # No refinement: still report how well the feed-forward mesh re-renders its inputs.
    size = int(cfg.refine.render_size)
    target = torch.nn.functional.interpolate(rgb, size=(size, size), mode="area" if H > size else "bilinear")
    Ks = K.clone()
    Ks[:, 0] *= size / W
    Ks[:, 1] *= size / H
    surf = rasterize_surface(rz, verts, faces, c2w, Ks, size, size)
    with torch.no_grad():
        p = psnr(shade(model, planes, surf, None, background, rz), target)
    timings["refine"] = 0.0
    return Result(verts=verts, faces=faces, planes=planes, planes_feedforward=planes, color_mlp=model.color_mlp,
                  timings=timings, psnr_before=p, psnr_after=p)


# ----------------------------------------------------------------------------------------------------------
# Loading a checkpoint.
# ----------------------------------------------------------------------------------------------------------


def _model_diff(saved: dict, ours: dict) -> list[str]:
    keys = sorted((set(saved) | set(ours)) - RUNTIME_MODEL_KEYS)
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {ours.get(k)!r}" for k in keys
            if saved.get(k) != ours.get(k)]


def load_model(checkpoint: str | Path, cfg: Config, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """The model of `cfg.model` with the weights at `checkpoint`; returns (model in eval mode, what was loaded).

    A released `ckpt.pth` needs model.arch=official (configs/official.yaml). Our checkpoints carry their
    run's config.yaml one folder up; a model section that differs from `cfg.model` is refused with the
    differing keys named, before any weight is read.
    """
    import yaml

    from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from training.model import GTR

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointMismatch(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".ckpt"):
            raise CheckpointMismatch(f"{path}: expected a step-N/ folder (ours) or a released ckpt.pth")
        if cfg.model.arch != "official":
            raise CheckpointMismatch(f"{path} is a released checkpoint file, but the config's model.arch is "
                                     f"'{cfg.model.arch}'; run with --config configs/official.yaml")
        from training.convert_official import ConversionError, load_official

        try:
            model = load_official(path, cfg.model)
        except (ConversionError, RuntimeError, ValueError) as e:
            raise CheckpointMismatch(f"{path} does not fit the configured official model: {e}") from None
        return model.to(device).eval(), f"released checkpoint {path}"
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointMismatch(f"no complete checkpoint (step-N/ with meta.json) under {path}")
    run_cfg = folder.parent / "config.yaml"
    if run_cfg.is_file():
        saved = (yaml.safe_load(run_cfg.read_text()) or {}).get("model", {})
        diff = _model_diff(saved, to_dict(cfg)["model"])
        if diff:
            raise CheckpointMismatch(f"{folder} was trained with another model config ({run_cfg}): "
                                     + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
                                     + " — pass the run's config (--config) or matching overrides")
    model = GTR(cfg.model)
    try:
        load_checkpoint(folder, model, restore_rng=False)
    except CheckpointError as e:
        raise CheckpointMismatch(str(e)) from None
    return model.to(device).eval(), f"checkpoint {folder}"


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


def inputs_sheet(rows: list[list[np.ndarray]], labels: list[str]) -> np.ndarray:
    """A grid image: one row per entry of `rows` (images [S,S,3] uint8), a text label above each row."""
    from PIL import Image, ImageDraw

    S = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    pad = 14
    sheet = Image.new("RGB", (cols * S, len(rows) * (S + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, label) in enumerate(zip(rows, labels)):
        draw.text((2, i * (S + pad) + 1), label, fill=(0, 0, 0))
        for j, im in enumerate(row):
            sheet.paste(Image.fromarray(im), (j * S, i * (S + pad) + pad))
    return np.asarray(sheet)


def write_outputs(result: Result, model: nn.Module, views: Views, out_dir: Path, cfg: Config,
                  extra: dict[str, Any] | None = None, turntable_frames: int = 24, picture_size: int = 256,
                  progress: bool = False) -> dict[str, Any]:
    """Write mesh.glb (+ texture, + vertex-colour variant), turntable.gif, inputs_sheet.png, timings.json
    into the existing folder `out_dir`; returns the timings dict."""
    from PIL import Image

    from training.export import export_glb
    from training.ops.raster import make_rasterizer

    out_dir = Path(out_dir)
    t = time.perf_counter()
    info = export_glb(out_dir / "mesh.glb", result.verts.cpu().numpy(), result.faces.cpu().numpy(),
                      result.color_fn(model), texture_size=cfg.refine.texture_size,
                      vertex_colors=cfg.refine.vertex_colors)
    export_s = time.perf_counter() - t

    device = result.planes.device
    rz = make_rasterizer(cfg.mesh.raster_backend, device)
    size = min(picture_size, max(views.rgb.shape[1], 64))
    c2w, K = turntable_cameras(turntable_frames, size)
    frames = []
    for i in range(0, turntable_frames, 8):  # a few views at a time bounds the rasterizer's memory
        imgs = result.render(model, c2w[i:i + 8], K[i:i + 8], size, rasterizer=rz)
        frames += [_to_uint8(im) for im in imgs]
    write_turntable(out_dir / "turntable.gif", frames)

    S = views.rgb.shape[1]
    in_c2w, in_K = torch.tensor(views.c2w), torch.tensor(views.K) * (size / S)
    in_K[:, 2, 2] = 1.0
    rgb_in = torch.tensor(views.rgb).permute(0, 3, 1, 2)
    rgb_in = torch.nn.functional.interpolate(rgb_in, size=(size, size), mode="area" if S > size else "bilinear")
    row_in = [_to_uint8(im) for im in rgb_in]
    row_ff = [_to_uint8(im) for im in result.render(model, in_c2w, in_K, size, feedforward=True, rasterizer=rz)]
    rows, labels = [row_in, row_ff], ["input views", f"feed-forward mesh ({result.psnr_before:.2f} dB)"]
    if result.refine is not None:
        rows.append([_to_uint8(im) for im in result.render(model, in_c2w, in_K, size, rasterizer=rz)])
        labels.append(f"refined, tune={cfg.refine.tune if extra is None else extra.get('tune', cfg.refine.tune)}"
                      f" ({result.psnr_after:.2f} dB)")
    Image.fromarray(inputs_sheet(rows, labels)).save(out_dir / "inputs_sheet.png")

    timings = {
        "seconds": {**{k: round(v, 4) for k, v in result.timings.items()}, "export": round(export_s, 4)},
        "psnr_input_views": {"before_refinement": result.psnr_before, "after_refinement": result.psnr_after},
        "refine_losses": result.refine.losses if result.refine is not None else [],
        "mesh": {"vertices": int(len(result.verts)), "faces": int(len(result.faces)),
                 "glb_vertices": info.vertices, "texture_size": info.texture_size,
                 "texture_coverage": round(info.coverage, 4)},
        "views": {"count": len(views), "names": views.names, "source": views.source, "size": int(S)},
        "device": str(device),
        **(extra or {}),
    }
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2, default=str))
    return timings


# ----------------------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from core.cli import config_from_args, stage_parser
    from core.io import atomic_dir, clean_temporaries

    p = stage_parser(__doc__)
    p.add_argument("--input", required=True, help="folder of posed images (see training/recon_inputs.py)")
    p.add_argument("--checkpoint", required=True, help="step-N/ folder or run folder (ours), or a released ckpt.pth")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="named camera layout for images without cameras")
    p.add_argument("--output", default=None, help="output folder (default OUT/reconstruct/<input name>)")
    p.add_argument("--no-refine", action="store_true", help="feed-forward only (skip texture refinement)")
    p.add_argument("--tune", choices=("both", "color", "triplane"), default=None,
                   help="what refinement fine-tunes (Table 3; default refine.tune)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--force", action="store_true", help="redo an output folder that is already complete")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.tune:
        cfg.refine.tune = args.tune
    out_dir = Path(args.output) if args.output else cfg.out_path / "reconstruct" / Path(args.input).resolve().name
    if (out_dir / "timings.json").is_file() and not args.force:
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
    clean_temporaries(out_dir.parent)
    extra = {"input": str(args.input), "checkpoint": str(args.checkpoint), "layout": args.layout,
             "refine": not args.no_refine, "tune": cfg.refine.tune, "config": to_dict(cfg)}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        timings = write_outputs(result, model, views, Path(tmp), cfg, extra=extra)
    s = timings["seconds"]
    print(f"wrote {out_dir}: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items())
          + f"; input-view PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
