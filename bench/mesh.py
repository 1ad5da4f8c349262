"""Benchmarks of the mesh stage's ops: marching cubes (our PyTorch twin vs skimage on CPU; vs diso on GPU),
rasterization of 8 views at 512² (the twin vs its first, per-view float64 version on CPU; vs nvdiffrast on
GPU), antialiasing of those views (CPU: the silhouette walk vs the twin before it), and on GPU: the feed-forward mesh at 256³ (dense vs coarse-to-fine extraction) and one mesh-stage step
of the paper config with diso + nvdiffrast vs the fully permissive twins (mesh.backend=torch), time and
peak memory.

    python -m bench.mesh            # the CPU table
`run_gpu(cfg, out_dir)` is called by `make gpu-check` (bench/gpu_check.py) on a lent GPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.common import result, timeit
from core.config import Config, load_config


def _torus(n: int, device: str = "cpu") -> torch.Tensor:
    x = torch.linspace(-1, 1, n, device=device)
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    return (((X**2 + Y**2).sqrt() - 0.55) ** 2 + Z**2).sqrt() - 0.2


def _views(n: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from core.cameras import intrinsics, look_at, spherical_position

    c2w = torch.tensor(np.stack([look_at(spherical_position(360.0 * i / n, 20.0, 2.6)) for i in range(n)]),
                       device=device)
    K = torch.tensor(intrinsics(40.0, size), device=device)[None].expand(n, 3, 3)
    return c2w, K


def raster_inputs(device: str, size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A marching-cubes mesh (the kind stage 2 rasterizes) in clip space for 8 views."""
    from training.cameras import opencv_to_clip
    from training.ops.marching_cubes import marching_cubes

    v, f = marching_cubes(_torus(128, device), backend="torch")
    v = (v * 2 - 1) * 0.5
    c2w, K = _views(8, size, device)
    mvp = opencv_to_clip(c2w, K, size, size, 0.05, 100.0)
    pos = torch.einsum("nj,vij->vni", torch.cat([v, torch.ones_like(v[:, :1])], 1), mvp).contiguous()
    return pos, f


def run(cfg: Config, out_dir: Path) -> list[dict]:
    """CPU measures: marching cubes 64³ / 128³ (twin vs skimage, forward only), rasterization 8 × 512² (vs the
    first twin), extraction 128³ of the config's model, coarse-to-fine vs dense."""
    from skimage.measure import marching_cubes as sk_mc

    from training.ops.marching_cubes import TorchDiffMC
    from training.ops.raster import rasterize, rasterize_reference

    torch.set_num_threads(2)
    rows = []
    for n in (64, 128):
        g = _torus(n)
        g_np = g.numpy()
        ours = timeit(lambda g=g: TorchDiffMC()(g), repeat=3)
        base = timeit(lambda g_np=g_np: sk_mc(g_np, 0.0), repeat=3)
        nf = len(TorchDiffMC()(g)[1])
        rows.append(result(f"marching cubes {n}^3 (torus, {nf} faces)", ours, base, "skimage.measure.marching_cubes",
                           "s", "ours is differentiable (vertices carry autograd to the grid); skimage is not"))
    pos, f = raster_inputs("cpu")
    t = timeit(lambda: rasterize(None, pos, f, 512), repeat=3)
    t_ref = timeit(lambda: rasterize_reference(pos, f, 512), repeat=3)
    rows.append(result(f"rasterize 8 views 512^2 ({len(f)} faces), CPU twin", t, t_ref,
                       "the first twin (per view, float64 coverage)", "s",
                       "same triangle ids at every pixel (tests/training/ops/test_raster.py); nvdiffrast needs "
                       "CUDA: see run_gpu"))
    rows.append(_antialias_row(pos, f))
    rows += _feedforward_mesh(cfg, "cpu", grid=128)[:2]  # the demo model; the 256³ paper rows: run_gpu
    return rows


def _antialias_row(pos: torch.Tensor, faces: torch.Tensor) -> dict:
    """Antialiasing forward + backward (to the clip positions, as stage 2's mask loss) on the rasterized views:
    the silhouette walk against the twin before it (`silhouette_hops=0`), and how much coverage each keeps of
    the mesh's area (its pixel-centre coverage at 4 × 4 samples per pixel)."""
    from training.ops.raster import antialias, rasterize

    side = 512
    rast, _ = rasterize(None, pos, faces, side)
    hit = (rast[..., 3:] > 0).to(pos.dtype)

    def fwd_bwd(hops: int) -> float:
        p = pos.detach().clone().requires_grad_(True)
        out = antialias(hit, rast, p, faces, silhouette_hops=hops)
        out.sum().backward()
        return float(out.detach().sum())

    kept = {hops: fwd_bwd(hops) for hops in (0, 64)}
    fine, _ = rasterize(None, pos, faces, 4 * side)
    area = float((fine[..., 3] > 0).sum()) / 16
    ours, base = timeit(lambda: fwd_bwd(64), repeat=3), timeit(lambda: fwd_bwd(0), repeat=3)
    return result(f"antialias 8 views {side}^2 forward+backward ({len(faces)} faces), CPU twin", ours, base,
                  "the twin before the silhouette walk (silhouette_hops=0)", "s",
                  f"coverage kept of the mesh's area: {kept[64] / area:.4f} (before {kept[0] / area:.4f})")


def run_gpu(cfg: Config, out_dir: Path) -> list[dict]:
    """GPU measures for `make gpu-check`: twin vs diso at 256³, twin vs nvdiffrast for 8 × 512², and one
    mesh-stage step of `cfg` (the paper config) on one asset: seconds and peak memory."""
    from training.ops.marching_cubes import TorchDiffMC, cuda_marching_cubes
    from training.ops.raster import Rasterizer, rasterize_reference

    dev = "cuda"
    sync = torch.cuda.synchronize
    rows = []
    g = _torus(256, dev)
    diso = cuda_marching_cubes()

    def fwd_bwd(mc: torch.nn.Module) -> None:
        x = g.clone().requires_grad_(True)
        v, _ = mc(x)
        v.sum().backward()
        sync()

    rows.append(result("marching cubes 256^3 forward+backward", timeit(lambda: fwd_bwd(TorchDiffMC()), 5),
                       timeit(lambda: fwd_bwd(diso), 5), "diso.DiffMC", "s", "torch twin on the same GPU"))
    pos, f = raster_inputs(dev)
    tw, nv = Rasterizer("torch", dev), Rasterizer("nvdiffrast", dev)

    def rast(r) -> None:
        out, _ = r.rasterize(pos, f, (512, 512))
        sync()

    def rast_ref() -> None:
        rasterize_reference(pos, f, 512)
        sync()

    rows.append(result(f"rasterize 8 views 512^2 ({len(f)} faces)", timeit(lambda: rast(tw), 3),
                       timeit(lambda: rast(nv), 3), "nvdiffrast (RasterizeCudaContext)", "s",
                       f"torch twin on the same GPU; its first version (per view, float64): "
                       f"{timeit(rast_ref, 3):.4f} s"))
    rows += _feedforward_mesh(cfg, dev)
    cuda = mesh_stage_step(cfg, dev, backend="cuda")  # explicit: auto would fall back to the twins silently
    permissive = mesh_stage_step(cfg, dev, backend="torch")
    rows += cuda
    rows.append(result("mesh-stage step per asset, mesh.backend=torch (permissive twins)", permissive[0]["ours"],
                       cuda[0]["ours"], "diso + nvdiffrast", "s", "goal: within 1.3x (ratio >= 0.77); peak "
                       f"{permissive[1]['ours']:.1f} GiB; {permissive[0]['notes']}"))
    return rows


def _sync(dev: str) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _feedforward_mesh(cfg: Config, dev: str, grid: int = 256) -> list[dict]:
    """Triplane + extraction at `grid`³ on the paper model (analytic sphere surface over the real f_d work, as
    bench.reconstruct): mesh.extract=dense vs coarse_to_fine, the same mesh asserted."""
    from bench.reconstruct import sphere_inputs, sphere_model
    from training.mesh import extract_mesh

    model = sphere_model(cfg, dev)
    images, c2w, K = sphere_inputs(cfg.loader.input_size, dev)

    def triplane() -> torch.Tensor:
        with torch.no_grad():
            planes = model.triplane(images[None], c2w[None], K[None]).float()
        _sync(dev)
        return planes

    def triplane_bf16() -> None:
        with torch.no_grad(), torch.autocast(torch.device(dev).type, dtype=torch.bfloat16,
                                             enabled=torch.device(dev).type == "cuda"):
            model.triplane(images[None], c2w[None], K[None])
        _sync(dev)

    planes = triplane()
    t_tri = timeit(triplane, 3)
    t_tri_bf16 = timeit(triplane_bf16, 3)
    meshes, secs, cost = {}, {}, {}
    for method in ("dense", "coarse_to_fine"):
        def extract(method: str = method) -> None:
            stats: dict = {}
            with torch.no_grad():
                meshes[method] = extract_mesh(model, planes, grid, cfg.mesh.sdf_level, cfg.mesh.mc_backend,
                                              method=method, stride=cfg.mesh.coarse_stride,
                                              dilate=cfg.mesh.coarse_dilate, stats=stats)
            _sync(dev)
            cost[method] = stats
        secs[method] = timeit(extract, 3)
    same = all(torch.equal(a, b) for a, b in zip(meshes["dense"], meshes["coarse_to_fine"]))
    c = cost["coarse_to_fine"]
    note = (f"grid {grid}^3, {len(meshes['dense'][1])} faces, identical mesh: {same}; coarse-to-fine evaluated "
            f"{c['evaluated'] / grid ** 3:.3f} of the grid in {c['rounds']} round(s), stride "
            f"{cfg.mesh.coarse_stride}, dilate {cfg.mesh.coarse_dilate}; triplane {t_tri:.4f} s")
    return [result(f"mesh extraction {grid}^3, coarse-to-fine", secs["coarse_to_fine"], secs["dense"],
                   "dense grid (mesh.extract=dense)", "s", note),
            result("feed-forward mesh (triplane + coarse-to-fine extraction)", t_tri + secs["coarse_to_fine"],
                   t_tri + secs["dense"], "triplane + dense extraction", "s", f"goal < 0.15 s; {note}"),
            result("feed-forward mesh, triplane under bf16 autocast + coarse-to-fine", t_tri_bf16 + secs["coarse_to_fine"],
                   t_tri + secs["dense"], "fp32/TF32 triplane + dense extraction", "s",
                   f"goal < 0.15 s; bf16 triplane {t_tri_bf16:.4f} s (reconstruct runs it in fp32 today)")]


class _ZeroLoss(torch.nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pred.sum() * 0.0


def mesh_stage_step(cfg: Config, dev: str, backend: str = "") -> list[dict]:
    """One optimisation step of the mesh stage at the config's sizes, on a synthetic one-asset batch
    (`backend`: mesh.backend, the config's unless named: torch = the permissive twins)."""
    import dataclasses

    from training.mesh import mesh_backends
    from training.mesh_objective import MeshObjective
    from training.model import GTR

    torch.manual_seed(0)
    model = GTR(cfg.model).to(dev)
    # The surface is an analytic sphere (r = 0.35) added to the real f_d evaluation, so the step does the
    # real work on a realistic mesh: an untrained field is noise whose level set is millions of slivers
    # (nvdiffrast stopped on it with "subtriangle count overflow" on the H200).
    f_d = model.query_density

    def sphere_density(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return f_d(planes, points) * 0 + cfg.mesh.sdf_level + 40.0 * (0.35 - points.norm(dim=-1, keepdim=True))

    model.query_density = sphere_density
    lpips_note = ""
    try:
        from training.losses import LPIPSLoss

        lpips = LPIPSLoss(cfg.mesh.lpips_net)
    except Exception as e:  # noqa: BLE001 - the GPU machine may lack the offline LPIPS weights
        lpips, lpips_note = _ZeroLoss(), f"; LPIPS term left out ({type(e).__name__})"
    mesh_cfg = dataclasses.replace(cfg.mesh, backend=backend or cfg.mesh.backend)
    mc, raster = mesh_backends(mesh_cfg)
    obj = MeshObjective(model, mesh_cfg, lpips=lpips).to(dev)
    Vi, Vs, S, s = cfg.loader.input_views, cfg.mesh.sup_views, cfg.loader.input_size, cfg.mesh.render_size
    c2w_i, K_i = _views(Vi, S, dev)
    c2w_s, K_s = _views(Vs, s, dev)
    batch = {"input_rgb": torch.rand(1, Vi, 3, S, S, device=dev), "input_mask": torch.ones(1, Vi, 1, S, S, device=dev),
             "input_c2w": c2w_i[None], "input_K": K_i[None], "sup_rgb": torch.rand(1, Vs, 3, s, s, device=dev),
             "sup_mask": torch.ones(1, Vs, 1, s, s, device=dev), "sup_depth": torch.full((1, Vs, 1, s, s), 2.3, device=dev),
             "sup_c2w": c2w_s[None], "sup_K": K_s[None], "background": torch.ones(1, 3, device=dev)}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.mesh.lr)
    times = []
    cuda = torch.device(dev).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    note = (f"mesh.backend {mesh_cfg.backend or '(unset)'}: mc {mc}, raster {raster}, extract {mesh_cfg.extract}; "
            f"1 asset, {Vi} inputs at {S}^2, {Vs} views at {s}^2, grid {cfg.mesh.grid}^3, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params; paper batch 192 over a cluster{lpips_note}")
    return [result("mesh-stage step per asset (paper config)", sorted(times)[1], None, "", "s", note),
            result("mesh-stage peak GPU memory per asset (paper config)", peak, None, "", "GiB", note)]


def main(argv: list[str] | None = None) -> int:
    from bench.common import format_table

    cfg = load_config(argv[0] if argv else None)
    out = Path(cfg.out) / "bench" / "mesh"
    t0 = time.perf_counter()
    rows = run(cfg, out)
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
