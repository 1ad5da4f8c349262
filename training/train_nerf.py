"""`make train-nerf`: stage 1 — train GTR with volume rendering on the shard stream (paper §3.2).

    python -m training.train_nerf [--config configs/demo.yaml] [--out work] [key=value ...]
    torchrun --nproc_per_node 8 -m training.train_nerf --config configs/paper.yaml --out /shared/work

Writes OUT/runs/nerf/{config.yaml, step-N/, tensorboard/, images/}. Rerunning the same command resumes from
the newest complete checkpoint; a finished run does nothing. See docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from core.cli import save_resolved
from core.config import Config, save_config, to_dict
from training import distributed as D
from training.data.stream import make_loader
from training.loop import LoopResult, epoch_stream, train
from training.model import GTR
from training.nerf_objective import NerfObjective
from training.stage import stage_main, stage_shards


def fixed_val_batch(cfg: Config, urls: str) -> dict:
    """The first batch of a non-resampled, fixed-seed pass over `urls`: the same on every run and resume.
    Supervision views are whole (`render_size`², no window), so its PSNR and images cover full views."""
    loader = make_loader(cfg, urls, "nerf", batch_size=cfg.nerf.val_assets, resampled=False, workers=0,
                         seed=cfg.seed + 12345, rank=0, world_size=1, patch=0)
    return next(iter(loader))


def run(cfg: Config, stop_at: int | None = None) -> LoopResult:
    """Build loader, model and objective from `cfg` and train (resuming if OUT/runs/nerf has checkpoints)."""
    run_dir = cfg.out_path / "runs" / "nerf"
    D.init()  # before the loader: its node splitting reads rank / world size
    train_urls, val_urls = stage_shards(cfg.out, cfg.nerf.shards, cfg.nerf.val_shards, "nerf")
    if D.is_main():
        save_config(cfg, run_dir / "config.yaml")
        save_resolved(cfg, "train_nerf")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = GTR(cfg.model)
    objective = NerfObjective(model, cfg.nerf)
    # One loader epoch = one checkpoint period, so resuming from a periodic checkpoint reads nothing twice.
    workers = max(1, cfg.loader.workers)
    per_worker = -(-cfg.nerf.ckpt_every // workers)
    micro, accumulation = D.batch_split(cfg.nerf.batch_size, cfg.nerf.micro_batch)  # this rank's share per step
    # Views arrive as uint8 RGBA and are composited on the training device (training.loop.to_device).
    loader = make_loader(cfg, train_urls, "nerf", epoch_samples=per_worker * micro * accumulation,
                         composite="device")
    val = fixed_val_batch(cfg, val_urls) if D.is_main() else None
    return train(objective, lambda position: epoch_stream(loader, position), run_dir, cfg.nerf, seed=cfg.seed,
                 val_batch=val, config=to_dict(cfg), stop_at=stop_at)


def _summary(cfg: Config, r: LoopResult) -> str:
    last = r.val.get(max(r.val)) if r.val else {}
    return (f"nerf: step {r.step}/{cfg.nerf.steps}, {r.skipped} skipped, "
            f"checkpoint {r.checkpoint or Path(cfg.out) / 'runs/nerf'}"
            + (f", val psnr {last.get('psnr', float('nan')):.2f} dB" if last else ""))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, run, _summary, argv)


if __name__ == "__main__":
    sys.exit(main())
