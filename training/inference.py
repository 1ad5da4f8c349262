"""The public inference API of training/: everything evaluation, notebooks and `training.reconstruct` need.

    model, what = load_model(checkpoint, cfg, device)       # step-N/ or run folder (ours), or a released ckpt.pth
    views = read_views(folder, cfg.loader.input_size)       # posed input views (render folder, cameras.json, layout)
    res = reconstruct(model, images, c2w, K, cfg)            # -> Result: planes, mesh, colour function, timings
    rgba = res.render_rgba(model, c2w, K, size)             # straight-alpha RGBA uint8 views of the textured mesh
    export_glb(path, verts, faces, res.color_fn(model))     # UV-textured GLB (or glb_bytes + query_colors)

`psnr` (training.metrics) and `load_lpips` (training.lpips_weights) are the metric pieces evaluation shares
with training. Nothing else of training/ is meant to be imported from outside it (the import-linter
contract in pyproject.toml holds eval/ to this module).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from core.config import Config, to_dict
from training.export import export_glb, glb_bytes, query_colors
from training.lpips_weights import load_lpips
from training.mesh import extract_mesh, extract_options, mesh_backends, render_mesh
from training.mesh_level import mesh_level
from training.metrics import psnr
from training.ops.raster import Rasterizer
from training.recon_inputs import InputError, Views, read_views
from training.refine import RefineResult, color_model, refine_texture
from training.refine import psnr as views_psnr

__all__ = ["CheckpointMismatch", "EmptyMeshError", "InputError", "ReconstructError", "Result", "Views",
           "export_glb", "glb_bytes", "load_lpips", "load_model", "psnr", "query_colors", "read_views",
           "reconstruct"]

# Model-config keys that only change how a model is run, not which weights it has.
RUNTIME_MODEL_KEYS = {"samples_per_ray", "render_chunk", "near_min", "background"}


class ReconstructError(ValueError):
    """A reconstruction that cannot run as asked; the message names the problem."""


class CheckpointMismatch(ReconstructError):
    """A checkpoint that does not belong to the configured model."""


class EmptyMeshError(ReconstructError):
    """The density field has no surface at the configured level (nothing to texture)."""


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
        device = self.planes.device

        def fn(points: np.ndarray) -> np.ndarray:
            out = []
            with torch.no_grad(), color_model(model, self.color_mlp) as m:
                for p in torch.from_numpy(np.asarray(points, np.float32)).to(device).split(chunk):
                    out.append(m.query_color(self.planes, p[None])[0].float().cpu())
            return torch.cat(out).numpy() if out else np.zeros((0, 3), np.float32)

        return fn

    def render(self, model: nn.Module, c2w: Tensor, K: Tensor, size: int, background: float = 1.0,
               feedforward: bool = False, rasterizer: Rasterizer | None = None) -> dict[str, Tensor]:
        """The textured mesh from cameras c2w [V,4,4] / K [V,3,3] (for size²), `training.mesh.render_mesh`:
        rgb [V,3,size,size] on `background`, mask, depth, normal, on the model's device. `feedforward`
        colours it with the generator's planes and the model's own f_c instead of this result's."""
        device = self.planes.device
        planes, fc = (self.planes_feedforward, None) if feedforward else (self.planes, self.color_mlp)
        with torch.no_grad(), color_model(model, fc) as m:
            return render_mesh(m, planes, self.verts, self.faces, c2w.to(device), K.to(device), size, size,
                               background, rasterizer)

    def render_rgba(self, model: nn.Module, c2w: np.ndarray, K: np.ndarray, size: int,
                    rasterizer: Rasterizer | None = None) -> np.ndarray:
        """Straight-alpha RGBA uint8 [V,size,size,4] views of the textured mesh (cameras c2w [V,4,4], K [V,3,3]
        numpy for size²): colour un-premultiplied from a render on black, alpha the antialiased coverage."""
        rasterizer = rasterizer or Rasterizer("auto", self.planes.device)  # one backend context for all views
        out = []
        for i in range(len(c2w)):  # one view at a time bounds memory at 512²
            r = self.render(model, torch.from_numpy(c2w[i:i + 1]), torch.from_numpy(K[i:i + 1]), size,
                            background=0.0, rasterizer=rasterizer)
            a = r["mask"][0].clamp(0, 1)  # [1,H,W]
            rgb = torch.where(a > 0, r["rgb"][0] / a.clamp_min(1e-6), torch.zeros_like(r["rgb"][0])).clamp(0, 1)
            out.append(torch.cat([rgb, a]).permute(1, 2, 0).cpu().numpy())
        return (np.stack(out) * 255 + 0.5).astype(np.uint8)


def reconstruct(model: nn.Module, images: Tensor, c2w: Tensor, K: Tensor, cfg: Config, refine: bool = True,
                tune: str | None = None, rasterizer: Rasterizer | None = None, progress: bool = False,
                background: float = 1.0) -> Result:
    """Reconstruct one asset.

    images [V,4,H,W] (or [1,V,4,H,W]): RGB composited on `background`, then the mask; c2w [V,4,4] OpenCV
    and K [V,3,3] for H×W, in our canonical frame. cfg.mesh.grid / level_mode / sdf_level / mc_backend choose the mesh;
    cfg.refine the refinement (`tune` overrides cfg.refine.tune for Table 3's rows). Runs on the model's
    device. Raises EmptyMeshError when the field has no surface.
    """
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
    rz = rasterizer or Rasterizer(mesh_backends(cfg.mesh)[1], device)
    timings: dict[str, float] = {}

    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        planes = model.triplane(images[None], c2w[None], K[None]).float()
    _sync(device)
    timings["triplane"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.no_grad():
        level = mesh_level(model, planes, c2w, K, W, cfg.mesh, images[:, 3:])  # the input views pick it (level_mode)
        verts, faces = extract_mesh(model, planes, cfg.mesh.grid, level, backend=mesh_backends(cfg.mesh)[0],
                                    **extract_options(cfg.mesh))
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
    # No refinement: still report how well the feed-forward mesh re-renders its inputs, rendered as
    # refinement renders them (at refine.render_size).
    size = int(cfg.refine.render_size)
    target = torch.nn.functional.interpolate(rgb, size=(size, size), mode="area" if H > size else "bilinear")
    Ks = K.clone()
    Ks[:, 0] *= size / W
    Ks[:, 1] *= size / H
    res = Result(verts=verts, faces=faces, planes=planes, planes_feedforward=planes, color_mlp=model.color_mlp,
                 timings=timings)
    res.psnr_before = res.psnr_after = views_psnr(res.render(model, c2w, Ks, size, background, rasterizer=rz)["rgb"],
                                                  target)
    timings["refine"] = 0.0
    return res


# ----------------------------------------------------------------------------------------------------------
# Loading a checkpoint.
# ----------------------------------------------------------------------------------------------------------


def _model_diff(saved: dict, ours: dict) -> list[str]:
    keys = sorted((set(saved) | set(ours)) - RUNTIME_MODEL_KEYS)
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {ours.get(k)!r}" for k in keys
            if saved.get(k) != ours.get(k)]


def load_model(checkpoint: str | Path, cfg: Config, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """The model of `cfg.model` with the weights at `checkpoint`; returns (model in eval mode, what was loaded).

    `checkpoint` is one of our `step-N/` folders, a run folder (its newest complete step) or the authors'
    released `ckpt.pth`, which needs model.arch=official (configs/official.yaml). Our checkpoints carry their
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
