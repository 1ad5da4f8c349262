"""`make train-mesh`: stage 2 — fine-tune GTR through its mesh (paper §3.2, "Geometry refinement with NeRF
initialization"): differentiable marching cubes on sdf = −(density − s), rasterized images coloured by f_c,
depth and mask at the full supervision resolution (`training.mesh_objective.MeshObjective`).

    python -m training.train_mesh [--config configs/demo.yaml] [--out work] [key=value ...]

Initialised from the newest stage-1 checkpoint under OUT/runs/nerf (or `mesh.init`, a run or step folder);
writes OUT/runs/mesh/{config.yaml, step-N/, tensorboard/}. Rerunning resumes from the newest mesh checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from core.cli import save_resolved
from core.config import Config, save_config, to_dict
from training import distributed as D
from training.checkpoint import CheckpointError, latest_checkpoint, load_weights
from training.data.stream import make_loader
from training.loop import LoopResult, epoch_stream, train
from training.mesh_objective import MeshObjective
from training.model import GTR
from training.stage import stage_main, stage_shards


def init_weights(cfg: Config, model: nn.Module, run_dir: Path) -> Path | None:
    """Stage-1 weights into `model`, unless the mesh run already has a checkpoint (the loop resumes it).
    Says which checkpoint it starts from (or resumes), so a run never starts from an unknown one."""
    resumed = latest_checkpoint(run_dir)
    if resumed is not None:
        if D.is_main():
            print(f"mesh: resuming {resumed} (the stage-1 weights it started from are in it)", flush=True)
        return None
    src = Path(cfg.mesh.init) if cfg.mesh.init else cfg.out_path / "runs" / "nerf"
    try:
        folder = load_weights(src, model)
    except CheckpointError as e:
        raise SystemExit(f"error: no stage-1 checkpoint to start from ({e}); run `make train-nerf` first "
                         f"or set mesh.init=<run or step folder>") from None
    if D.is_main():
        print(f"mesh: starting from stage-1 checkpoint {folder}", flush=True)
    return folder


def run(cfg: Config, stop_at: int | None = None, objective: MeshObjective | None = None) -> LoopResult:
    """Build loader, model (from stage 1) and objective from `cfg` and train; resumes OUT/runs/mesh."""
    run_dir = cfg.out_path / "runs" / "mesh"
    D.init()
    train_urls, val_urls = stage_shards(cfg.out, cfg.mesh.shards, cfg.mesh.val_shards, "mesh")
    torch.manual_seed(cfg.seed)
    if objective is None:
        model = GTR(cfg.model)
        init_weights(cfg, model, run_dir)
        objective = MeshObjective(model, cfg.mesh)
    if D.is_main():
        save_config(cfg, run_dir / "config.yaml")
        save_resolved(cfg, "train_mesh")
    loader = make_loader(cfg, train_urls, "mesh", composite="device")
    val = None
    if D.is_main():
        vl = make_loader(cfg, val_urls, "mesh", batch_size=cfg.mesh.val_assets, resampled=False, workers=0,
                         seed=cfg.seed + 12345, rank=0, world_size=1)
        val = next(iter(vl))
    return train(objective, lambda position: epoch_stream(loader, position), run_dir, cfg.mesh, seed=cfg.seed,
                 val_batch=val, config=to_dict(cfg), stop_at=stop_at)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, run, lambda cfg, r: f"mesh: step {r.step}/{cfg.mesh.steps}, {r.skipped} skipped, "
                      f"checkpoint {r.checkpoint or Path(cfg.out) / 'runs/mesh'}", argv)


if __name__ == "__main__":
    sys.exit(main())
