"""Benchmark of the GTR model: training-step time, samples/s, peak memory and FLOPs utilisation.

CPU (`run`, the demo config): one NeRF-stage step (forward + backward: triplane from 4 input views, 4
supervision patches volume-rendered) with our attention (`F.scaled_dot_product_attention`) against the
attention most LRM re-implementations write by hand (materialised softmax(QKᵀ/√d)·V), and a full-view render
chunked against unchunked. Every configuration runs in a fresh spawned process, so the peak RSS is its own.

GPU (`run_gpu`, the paper config, CUDA only; `make gpu-check`): the same step in fp32 and bf16 autocast,
SDPA against hand-written attention, activation checkpointing of the blocks on and off; step time, peak
CUDA memory, model FLOPs per sample (`training.model.flops_per_sample`) and utilisation against the H100's
989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import format_table, in_fresh_process, result
from core.config import Config, ModelConfig, load_config

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s


def _manual_attention(model: Any) -> None:
    """Swap every block's attention for the hand-written, fully materialised version (the baseline)."""
    from training.model.transformer import Attention

    def forward(self: Attention, x):  # [B, N, width]
        B, N, _ = x.shape

        def split(t):
            return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(dim=-1)  # [B, h, N, N]
        return self.to_out((att @ v).transpose(1, 2).reshape(B, N, -1))

    for block in model.blocks:
        block.attn.forward = forward.__get__(block.attn)


def _batch(B: int, V: int, size: int, sup: int, patch: int, device: str) -> dict[str, Any]:
    import torch

    from core import cameras as npcam

    c2w = torch.stack([torch.from_numpy(npcam.random_views(f"bench{b}", V + sup)["c2w"]) for b in range(B)])
    K_in = torch.from_numpy(npcam.intrinsics(40.0, size)).expand(B, V, 3, 3).clone()
    K_sup = torch.from_numpy(npcam.intrinsics(40.0, patch)).expand(B, sup, 3, 3).clone()
    return {"images": torch.rand(B, V, 4, size, size, device=device), "c2w": c2w[:, :V].to(device),
            "K": K_in.to(device), "sup_c2w": c2w[:, V:].to(device), "sup_K": K_sup.to(device),
            "target": torch.rand(B, sup, 3, patch, patch, device=device)}


def _step(model: Any, b: dict[str, Any], patch: int, dtype: Any = None) -> None:
    import torch

    ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        planes = model.triplane(b["images"], b["c2w"], b["K"])
        out = model.render_views(planes, b["sup_c2w"], b["sup_K"], patch, patch, stratified=True)
        loss = (out["rgb"].float() - b["target"]).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _cpu_case(case: dict[str, Any]) -> dict[str, float]:
    """One configuration in a fresh process: median step seconds and this process's peak RSS."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from training.model import GTR

    cfg = ModelConfig(**case["model"])
    model = GTR(cfg)
    if case.get("manual_attention"):
        _manual_attention(model)
    b = _batch(case["B"], case["V"], case["size"], case["sup"], case["patch"], "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    if case["kind"] == "step":
        for _ in range(case["repeat"] + 1):
            t0 = time.perf_counter()
            _step(model, b, case["patch"])
            times.append(time.perf_counter() - t0)
    else:  # full-view render, eval mode
        model.eval()
        with torch.no_grad():
            planes = model.triplane(b["images"], b["c2w"], b["K"])
            for _ in range(case["repeat"] + 1):
                t0 = time.perf_counter()
                model.render_views(planes, b["c2w"][:, :1], b["K"][:, :1], case["size"], case["size"],
                                   chunk=case["chunk"])
                times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return {"seconds": times[len(times) // 2], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_mb": rss0 / 1024}


def _spawn(case: dict[str, Any]) -> dict[str, float]:
    return in_fresh_process(_cpu_case, case, what=f"benchmark case {case.get('kind')}")


def run(cfg: Config, out_dir: Path, repeat: int = 3) -> list[dict]:
    """CPU rows for the demo config (cfg.model, cfg.loader.input_size, cfg.nerf patch settings)."""
    from dataclasses import asdict

    from training.model import flops_per_sample

    m = asdict(cfg.model)
    B, V, size = cfg.nerf.batch_size, cfg.loader.input_views, cfg.loader.input_size
    sup, patch = cfg.nerf.sup_views, cfg.nerf.patch_size or cfg.nerf.render_size  # 0 = the whole view
    base = {"model": m, "B": B, "V": V, "size": size, "sup": sup, "patch": patch, "repeat": repeat}
    ours = _spawn({**base, "kind": "step"})
    hand = _spawn({**base, "kind": "step", "manual_attention": True})
    rays = sup * patch * patch
    flops = flops_per_sample(cfg.model, V, rays, size)["train"] * B
    what = f"B={B}, {V}x{size}² inputs, {sup}x{patch}² patches x {cfg.model.samples_per_ray} samples"
    rows = [
        result(f"model train step, demo ({what})", ours["seconds"], hand["seconds"],
               "hand-written attention (materialised softmax)", "s/step"),
        result("model train samples/s, demo", B / ours["seconds"], B / hand["seconds"],
               "hand-written attention (materialised softmax)", "samples/s", higher_is_better=True),
        result("model train step peak RSS, demo", ours["peak_mb"], hand["peak_mb"],
               "hand-written attention (materialised softmax)", "MiB"),
        result("model achieved GFLOP/s, demo (CPU)", flops / ours["seconds"] / 1e9, None, "", "GFLOP/s",
               notes=f"{flops / 1e9:.1f} GFLOP per step (flops_per_sample, train = 3x forward)"),
    ]
    full = {**base, "B": 1, "kind": "render", "repeat": 1}
    chunked = _spawn({**full, "chunk": cfg.model.render_chunk})
    whole = _spawn({**full, "chunk": size * size})
    rows += [
        result(f"full-view render {size}² x {cfg.model.samples_per_ray} samples, peak RSS", chunked["peak_mb"],
               whole["peak_mb"], "all rays at once (no chunking)", "MiB",
               notes=f"chunk {cfg.model.render_chunk} rays; {chunked['seconds']:.2f} s vs {whole['seconds']:.2f} s"),
    ]
    return rows


# The cases `make gpu-check` times (its budget is minutes), (dtype, attention, checkpointing, torch.compile):
# bf16 with and without checkpointing, the fp32 baseline, and hand-written attention as the SDPA baseline;
# bench.mfu times bf16 compiled (COMPILE_CASES) under its own budget. All sixteen: `cases=ALL_GPU_CASES`.
GPU_CASES = (("bf16", "sdpa", True, False), ("bf16", "sdpa", False, False), ("fp32", "sdpa", False, False),
             ("bf16", "hand", False, False))
COMPILE_CASES = (("bf16", "sdpa", False, False), ("bf16", "sdpa", False, True))
ALL_GPU_CASES = tuple((d, a, c, k) for d in ("bf16", "fp32") for a in ("sdpa", "hand") for c in (True, False)
                      for k in (False, True))
# What `flops_per_sample` counts (printed with the step times): 2 FLOPs per multiply-add of every matmul/conv.
FLOP_FORMULA = ("train = 3 x forward (+ 2 x transformer with checkpointing); forward = 2 x (encoder "
                "N_img*C_in*p^2*W + depth*(N*W*3*inner + 2*N^2*inner + N*inner*W + N*W*hidden*(3 geglu|2)) + "
                "upsampler 3*R^2*W*C*u^2 + rays*samples*(f_d + f_c matmuls)), N = N_img + 3*R^2 tokens")


def _compile(model: Any) -> None:
    """torch.compile the transformer blocks and the field (triplane sampling + f_d + f_c fused per call)."""
    import torch

    for i, blk in enumerate(model.blocks):
        model.blocks[i] = torch.compile(blk)
    model._query_model_frame = torch.compile(model._query_model_frame)


def run_gpu(cfg: Config, out_dir: Path, batch: int = 1, rays_side: int = 32, repeat: int = 3,
            preset: str | None = None, cases: tuple = GPU_CASES) -> list[dict]:
    """GPU rows for the paper config (CUDA only): fp32/bf16 x SDPA/hand-written x checkpointing on/off."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from training.model import GTR, flops_per_sample

    if not torch.cuda.is_available():
        return []
    paper = load_config(preset or Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    mcfg = paper.model
    V, size, sup = paper.loader.input_views, paper.loader.input_size, paper.nerf.sup_views
    patch = rays_side  # supervision rays per view = rays_side², kept small so the paper-size MLPs fit
    rays = sup * patch * patch
    f = flops_per_sample(mcfg, V, rays, size)
    b = _batch(batch, V, size, sup, patch, "cuda")
    rows: list[dict] = []
    names = {"bf16": torch.bfloat16, "fp32": None}
    for dtype_name, attn, ckpt, compiled in cases:
        dtype = names[dtype_name]
        label = f"paper step {dtype_name}, {attn}, ckpt {'on' if ckpt else 'off'}, compile {'on' if compiled else 'off'}"
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = GTR(mcfg)
        if attn == "hand":
            _manual_attention(model)
        if ckpt:  # applied from outside, as the trainer does
            for blk in model.blocks:
                blk.forward = (lambda x, _f=blk.forward: checkpoint(_f, x, use_reentrant=False))
        try:
            if compiled:
                _compile(model)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            _step(model, b, patch, dtype)  # warm-up (and compilation)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                _step(model, b, patch, dtype)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            sec = sorted(ts)[len(ts) // 2]
            flops = (f["train_checkpointed"] if ckpt else f["train"]) * batch
            peak = torch.cuda.max_memory_allocated() / 2**20
            rows.append(result(label, sec, None, "", "s/step",
                               notes=f"B={batch}, {V}x{size}² in, {sup}x{patch}² rays x "
                                     f"{mcfg.samples_per_ray}; peak {peak:.0f} MiB; "
                                     f"{flops / 1e12:.2f} TFLOP/step; MFU {flops / sec / H100_BF16_PEAK:.3f} "
                                     f"of H100 bf16 peak; first step {first:.1f} s; torch {torch.__version__}"))
            print(f"{label}: {sec:.4f} s/step, {flops / 1e12:.2f} TFLOP/step, MFU "
                  f"{flops / sec / H100_BF16_PEAK:.3f}", flush=True)
        except torch.cuda.OutOfMemoryError:
            rows.append(result(label, float("nan"), None, "", "s/step", notes="out of memory"))
        except Exception as e:  # noqa: BLE001 - e.g. a compile failure: record it, keep the other cases
            rows.append(result(label, float("nan"), None, "", "s/step",
                               notes=f"failed: {type(e).__name__}: {str(e)[:300]}; torch {torch.__version__}"))
        del model
        torch.cuda.empty_cache()
    rows.append(result("paper model FLOPs per sample (train)", f["train"] / 1e12, None, "", "TFLOP",
                       notes=f"forward {f['forward'] / 1e12:.2f} TFLOP: transformer "
                             f"{f['transformer'] / 1e12:.2f}, decoders {f['decoders'] / 1e12:.2f} "
                             f"({rays} rays x {mcfg.samples_per_ray} samples); {FLOP_FORMULA}"))
    print(f"FLOP formula: {FLOP_FORMULA}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from core.cli import config_from_args, stage_parser

    p = stage_parser(__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="also run the paper-config GPU rows (needs CUDA)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    out = cfg.out_path / "bench" / "model"
    rows = run(cfg, out)
    if args.gpu:
        rows += run_gpu(cfg, out)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
