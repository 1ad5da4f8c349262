"""Benchmark of the shard loader: samples/s and peak memory against how people load render data today.

Compared, in the same run, on the same synthetic assets (32 views, realistic PNG content), 4 input + 4
supervision views per sample, composited and brought to the same sizes:
- ours: `training.data.make_loader` over the shards (decodes only the 8 picked RGBA PNGs);
- (a) per-asset PNG folders, a map-style Dataset reading the picked files (InstantMesh / OpenLRM style);
- (b) a plain WebDataset pipeline, `.decode("rgba8")` on every field, then the same view pick.
Each configuration runs in a fresh spawned process so its peak RSS (main + DataLoader workers) is its own.
It ends with how many loader workers keep one GPU of the paper config fed, from the model's FLOPs.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import result
from pipelines.config import Config, load_config

VIEWS = 32
GPU_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 peak
GPU_MFU = 0.4  # assumed model-FLOPs utilisation of a well-tuned trainer (stated, not measured)


# ----------------------------------------------------------------------------------------------------------
# Synthetic render folders with realistic PNG content (smooth texture + noise, object-shaped alpha).
# ----------------------------------------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled random grid: [size,size,channels] in [0,1], like shading over a texture."""
    import torch
    import torch.nn.functional as F

    g = torch.from_numpy(rng.random((1, channels, cells, cells), dtype=np.float32))
    return F.interpolate(g, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).clamp(0, 1).numpy()


def write_synthetic_asset(renders: Path, uid: str, size: int, views: int = VIEWS, seed: int = 0) -> None:
    """One render folder in the render stage's layout; PNGs compress about like object renders do."""
    from PIL import Image

    from render.cameras import intrinsics, look_at, spherical_position

    rng = np.random.default_rng([seed, int(uid[-4:], 16)])
    folder = renders / uid
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1
    tex = _smooth(rng, size, 12, 3) * 0.8 + 0.1
    c2w, K = [], []
    for i in range(views):
        wob = _smooth(rng, size, 4, 1)[..., 0]
        r = np.sqrt((xx * (1 + 0.3 * np.cos(i))) ** 2 + (yy * (1 + 0.3 * np.sin(i))) ** 2) + 0.25 * wob
        alpha = np.clip((0.75 - r) * size / 4, 0, 1)  # antialiased silhouette edge
        shade = _smooth(rng, size, 3, 1)
        noise = rng.normal(0, 0.03, (size, size, 3))  # path-tracing noise: what keeps PNGs from compressing well
        rgb = np.clip(np.roll(tex, 7 * i, axis=1) * (0.5 + 0.5 * shade) + noise, 0, 1)
        rgba = np.dstack([rgb, alpha[..., None]])
        Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(folder / f"{i:02d}.rgba.png")
        depth = np.where(alpha > 0, (2.6 - 0.4 * np.sqrt(np.clip(1 - r, 0, 1)) + 0.01 * wob) * 10000, 0)
        Image.fromarray(depth.astype(np.uint16)).save(folder / f"{i:02d}.depth.png")
        n = np.dstack([xx, yy, np.sqrt(np.clip(1 - xx ** 2 - yy ** 2, 0, 1))]) * 0.5 + 0.5
        Image.fromarray((n * alpha[..., None] * 255).astype(np.uint8), "RGB").save(folder / f"{i:02d}.normal.png")
        c2w.append(look_at(spherical_position(360.0 * i / views, 20.0, 2.6)))
        K.append(intrinsics(40.0, size))
    np.savez(folder / "cameras.npz", c2w=np.stack(c2w), K=np.stack(K), width=size, height=size)
    meta = {"uid": uid, "source": "bench", "license": "cc0", "attribution": "synthetic", "depth_scale": 10000.0,
            "normalization": {"center": [0, 0, 0], "scale": 1.0}, "quality": {"ok": True, "flags": []}}
    (folder / "meta.json").write_text(json.dumps(meta))


def make_bench_data(root: Path, assets: int, size: int) -> Config:
    """Render folders + manifest + shards under `root` (reused when already there). Returns the config."""
    from pipelines import manifest
    from pipelines.shards import pack

    cfg = Config(out=str(root))
    cfg.shards.val_fraction = 0.0
    cfg.shards.max_count = max(1, assets // 4)  # a few shards so N workers each get some
    uids = [f"bench{i:04x}" for i in range(assets)]
    marker = root / "renders" / ".complete"
    if not marker.is_file():
        from tqdm import tqdm

        for u in tqdm(uids, desc=f"bench data {size}²", unit="asset"):
            write_synthetic_asset(root / "renders", u, size)
        manifest.write_rows(manifest.manifest_path(root, "render"),
                            [{"uid": u, "status": manifest.OK, "reason": ""} for u in uids])
        marker.touch()
    pack(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The three loaders, each measured in its own process.
# ----------------------------------------------------------------------------------------------------------


class FolderDataset:
    """(a) Per-asset PNG folders: index -> asset, read and decode only the picked views' files."""

    def __init__(self, folders: list[str], spec: Any, seed: int):
        self.folders, self.spec, self.seed = folders, spec, seed

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, i: int) -> dict:
        from training.data import RenderFolder, decode_sample

        rng = np.random.default_rng()  # view picks need not repeat here; only the cost is measured
        return decode_sample(RenderFolder(self.folders[i]), self.spec, rng)


class DecodeAllThenPick:
    """(b)'s per-sample step after `.decode("rgba8")`: pick views from the decoded arrays, composite, resize."""

    def __init__(self, spec: Any, seed: int):
        self.spec, self.rng = spec, np.random.default_rng(seed)

    def __call__(self, s: dict) -> dict:
        import torch

        from training.data import _resize

        spec = self.spec
        views = sorted(k.split(".")[0] for k in s if k.endswith(".rgba.png"))
        pick = self.rng.choice(len(views), spec.input_views + spec.sup_views, replace=False)
        out = {"uid": s["__key__"]}
        for name, idx, size in (("input", pick[:spec.input_views], spec.input_size),
                                ("sup", pick[spec.input_views:], spec.sup_size)):
            ims = []
            for v in idx:
                a = torch.from_numpy(np.array(s[f"{views[v]}.rgba.png"])).permute(2, 0, 1).float() / 255
                ims.append(_resize(torch.cat([a[:3] * a[3:] + (1 - a[3:]), a[3:]]), size, "bilinear"))
            out[f"{name}_rgb"] = torch.stack(ims)
        return out


def _child(method: str, root: str, spec_kw: dict, workers: int, batch: int, samples: int, q: Any) -> None:
    try:
        q.put(_measure_here(method, root, spec_kw, workers, batch, samples))
    except BaseException:  # the parent must see why, not wait for a result that never comes
        import traceback

        q.put({"error": traceback.format_exc()})


def _measure_here(method: str, root: str, spec_kw: dict, workers: int, batch: int, samples: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from training.data import ViewSpec, collate, make_loader

    spec = ViewSpec(**spec_kw)
    cfg = Config(out=root)
    cfg.loader.shuffle_buffer = 8
    urls = sorted(str(p) for p in (Path(root) / "shards").glob("train-*.tar"))
    if method == "ours":
        it = make_loader(cfg, urls, "nerf", batch_size=batch, resampled=True, epoch_samples=10 ** 6,
                         workers=workers, seed=0, **spec_kw)
    elif method == "folders":
        folders = sorted(str(p) for p in (Path(root) / "renders").iterdir() if p.is_dir())
        ds = FolderDataset(folders, spec, 0)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10 ** 6)
        it = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate)
    else:
        import webdataset as wds

        ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None)
              .decode("rgba8").map(DecodeAllThenPick(spec, 0)).batched(batch, collation_fn=collate))
        it = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
    stream = iter(it)
    next(stream)  # workers started, pipelines warm
    n, t0 = 0, time.perf_counter()
    while n < samples:
        n += len(next(stream)["uid"])
    dt = time.perf_counter() - t0
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del stream  # ends the workers so RUSAGE_CHILDREN covers them
    time.sleep(0.2)
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"sps": n / dt, "main_mb": main_mb, "worker_mb": child_mb if workers else 0.0}


def measure(method: str, root: Path, spec_kw: dict, workers: int, batch: int, samples: int) -> dict:
    """samples/s and peak RSS (MiB: main, largest worker) of one loader configuration, in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(method, str(root), spec_kw, workers, batch, samples, q))
    p.start()
    try:
        while True:
            try:
                r = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"bench child {method} died with exit code {p.exitcode}") from None
    finally:
        p.join(timeout=60)
    if "error" in r:
        raise RuntimeError(f"bench child {method} failed:\n{r['error']}")
    r["peak_mb"] = r["main_mb"] + workers * r["worker_mb"]  # upper bound: every worker at the largest one's peak
    return r


def gpu_feed_estimate(per_worker_sps: float) -> dict[str, float]:
    """Samples/s one GPU consumes in the paper's NeRF stage, and loader workers that keeps it fed."""
    from training.model import flops_per_sample

    paper = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    rays = paper.nerf.sup_views * paper.nerf.patch_size ** 2
    f = flops_per_sample(paper.model, paper.loader.input_views, rays, paper.loader.input_size)
    train = f["train_checkpointed"] if paper.nerf.activation_checkpointing else f["train"]
    gpu_sps = GPU_PEAK_TFLOPS * 1e12 * GPU_MFU / train
    return {"train_flops": train, "gpu_sps": gpu_sps, "workers": math.ceil(gpu_sps / per_worker_sps)}


def run(cfg: Config, out_dir: Path, assets: int = 8, sizes: tuple[int, ...] | None = None,
        max_workers: int | None = None, samples: int = 12) -> list[dict]:
    out_dir = Path(out_dir)
    sizes = sizes or (512, cfg.render.resolution)
    n_workers = max_workers or max(2, min(4, os.cpu_count() or 1))
    rows: list[dict] = []
    per_worker_512 = None
    for size in sizes:
        root = out_dir / f"data{size}"
        make_bench_data(root, assets, size)
        spec = {"input_views": 4, "sup_views": 4, "input_size": size, "sup_size": size, "patch": 0,
                "background": "white", "masks": True, "depths": False}
        for workers in (0, n_workers):
            label = f"{size}², 4+4 views, {'in-process' if workers == 0 else f'{workers} workers'}"
            r = {m: measure(m, root, spec, workers, 2, samples if m != "plain_wds" else max(4, samples // 3))
                 for m in ("ours", "folders", "plain_wds")}
            for m, name in (("folders", "(a) per-asset PNG folders"), ("plain_wds", "(b) WebDataset decode-all")):
                rows.append(result(f"loader samples/s {label}", r["ours"]["sps"], r[m]["sps"], name, "samples/s",
                                   higher_is_better=True))
            rows.append(result(f"loader peak RSS {label}", r["ours"]["peak_mb"], r["folders"]["peak_mb"],
                               "(a) per-asset PNG folders", "MiB",
                               notes=f"(b) {r['plain_wds']['peak_mb']:.0f} MiB; main + workers x largest worker"))
            if size == 512 and workers == 0:
                per_worker_512 = r["ours"]["sps"]
    if per_worker_512:
        g = gpu_feed_estimate(per_worker_512)
        rows.append(result("loader workers to feed 1 GPU (paper NeRF stage)", float(g["workers"]), None, "", "workers",
                            notes=f"GPU {g['gpu_sps']:.1f} samples/s = {GPU_PEAK_TFLOPS:.0f} TFLOP/s x MFU {GPU_MFU} / "
                                  f"{g['train_flops'] / 1e12:.1f} TFLOP per sample (training.model.flops_per_sample, "
                                  f"4 inputs at 512², 4x128² patches x 256 samples); per worker {per_worker_512:.2f} "
                                  f"samples/s at 512² on this CPU"))
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.common import format_table
    from pipelines.cli import config_from_args, stage_parser

    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("--assets", type=int, default=8, help="synthetic assets per size (default: %(default)s)")
    p.add_argument("--samples", type=int, default=12, help="timed samples per configuration (default: %(default)s)")
    p.add_argument("--sizes", default="", help="comma-separated image sides (default: 512 and render.resolution)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s) or None
    rows = run(cfg, cfg.out_path / "bench" / "shards", assets=args.assets, sizes=sizes, samples=args.samples)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
