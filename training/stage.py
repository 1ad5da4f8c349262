"""What the two training entry points share around the loop: their command line and where their shards are."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.cli import config_from_args, stage_parser
from core.lock import stage_lock
from training import distributed as D
from training.data.tario import expand_urls
from training.loop import LoopResult


def stage_main(doc: str, run: Callable[..., LoopResult], summary: Callable[[Any, LoopResult], str],
               argv: list[str] | None = None) -> int:
    """The command line of a training stage: shared CLI + `--stop-at`, run, shut the process group down,
    print `summary(cfg, result)` on rank 0. Rank 0 holds OUT's lock of the stage (`OUT/.locks/train_nerf.lock`
    / `train_mesh.lock`): a second run into the same OUT waits instead of writing the same step-N/ (the
    other ranks wait for rank 0 in the process group)."""
    p = stage_parser(doc)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (checkpointed) without changing the schedule; rerun to continue")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    stage = run.__module__.rsplit(".", 1)[-1]
    try:
        with stage_lock(cfg.out_path, stage) if D.rank() == 0 else contextlib.nullcontext():
            result = run(cfg, stop_at=args.stop_at)
    finally:
        D.shutdown()
    if D.is_main():
        print(summary(cfg, result))
    return 0


def stage_shards(out: str | Path, shards: str, val_shards: str, key: str) -> tuple[str, str]:
    """(train, validation) shard patterns of a stage section (`key` = nerf | mesh): the section's own, else
    OUT/shards/{train,val}-*.tar; validation falls back to the training shards when none exist."""
    train_urls = shards or str(Path(out) / "shards" / "train-*.tar")
    val_urls = val_shards or str(Path(out) / "shards" / "val-*.tar")
    if not expand_urls(train_urls):
        raise SystemExit(f"error: no training shards match {train_urls} (run `make shards` first, or set {key}.shards)")
    return train_urls, val_urls if expand_urls(val_urls) else train_urls
