"""The generic training loop both stages share: load checkpoint → step → log → save → validate.

A stage hands in an *objective*: an `nn.Module` whose `.model` is what gets checkpointed and whose
`forward(batch) -> (loss, {name: scalar})` computes the loss (DDP wraps the objective, so gradient
synchronisation sees the whole forward). It may also define `validate(batch) -> {name: float}` (e.g. PSNR
on the fixed validation batch), `images(batch) -> {name: [N,3,H,W]}` for TensorBoard, and
`param_groups(weight_decay) -> list[dict]` to override the AdamW groups. Data comes from
`data(position) -> iterator of batches` starting at the given number of batches already consumed, which is
how a resumed run continues the same stream.

Everything the model code does not do lives here: AdamW, warm-up + cosine to 0, gradient clipping, bf16
autocast on CUDA, activation checkpointing and torch.compile (applied to the model's repeated blocks), DDP,
skipping non-finite steps, logging, checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint

from core.config import OptimConfig
from training import distributed as D
from training.checkpoint import TrainState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from training.data.batch import UINT8_KEYS, finish_batch
from training.logging import Logger
from training.schedule import lr_factor


@dataclass
class LoopResult:
    step: int
    skipped: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of that step (this process)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm before clipping
    val: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> validation scalars
    checkpoint: Path | None = None
    resumed_from: Path | None = None


# ----------------------------------------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(objective: torch.nn.Module, s: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices/kernels only (biases, norms and 1-d parameters are not shrunk)."""
    if hasattr(objective, "param_groups"):
        groups = objective.param_groups(s.weight_decay)
    else:
        params = [p for p in objective.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=(0.9, 0.95))


def make_scheduler(opt: torch.optim.Optimizer, s: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s.warmup_steps, s.steps))


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Children of every ModuleList made of ≥ 2 modules of one class: the transformer blocks."""
    found = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            found.extend(m)
    return found


def apply_speedups(model: torch.nn.Module, s: OptimConfig) -> int:
    """Activation checkpointing and torch.compile on the repeated blocks, in place; return how many.

    Both patch the instance (`forward` / `compile()`), so parameter names and state dicts do not change.
    """
    blocks = repeated_blocks(model)
    for blk in blocks:
        if s.activation_checkpointing:
            inner = blk.forward
            blk.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(
                f, *a, use_reentrant=False, **k))(inner)
        if s.compile:
            blk.compile()
    if s.compile and not blocks:
        model.compile()
    return len(blocks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA with `auto`; None = full fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ValueError(f"precision must be auto | fp32 | bf16, got {precision!r}")


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of `batch` (nested dicts, lists) on `device`; a loader batch's uint8 views are composited there."""
    if isinstance(batch, dict) and any(k in batch for k in UINT8_KEYS):
        return to_device(finish_batch(batch, device), device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def epoch_stream(loader: Any, position: int) -> Iterator[dict]:
    """Batches of an epoch-based loader from `position` batches in: `loader.set_epoch(e)` reseeds it and
    `loader.batches_per_epoch` is what one epoch yields in this process (all its DataLoader workers).

    Whole epochs before the position are skipped without reading anything (the epoch's seed fixes its
    content); inside the epoch the first batches are read and dropped, so a resume costs at most one epoch.
    """
    batches_per_epoch = loader.batches_per_epoch
    if batches_per_epoch <= 0:
        raise ValueError("batches_per_epoch must be positive (a resampled loader)")
    epoch, skip = divmod(position, batches_per_epoch)
    while True:
        loader.set_epoch(epoch)
        produced = 0
        for i, batch in enumerate(loader):
            produced += 1
            if i >= skip:
                yield batch
        if produced == 0:
            raise RuntimeError(f"the loader produced no batches in epoch {epoch} (no shards for this rank?)")
        epoch, skip = epoch + 1, 0


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[dict] | dict, s: OptimConfig,
               device: torch.device, dtype: torch.dtype | None) -> tuple[float, dict[str, float], bool]:
    """One optimisation step over `batches`, this rank's micro-batches of the global batch: each micro
    loss / len(batches) is backpropagated (gradients add up to the mean over this rank's assets; DDP
    all-reduces them once, on the last micro-batch, into the mean over the global batch). Returns (loss,
    scalars, applied), loss and scalars averaged over the micro-batches; a non-finite loss or gradient on any
    rank skips the update on every rank, leaving parameters and optimizer state untouched. A single batch
    (a dict) is one micro-batch."""
    if isinstance(batches, dict):
        batches = [batches]
    opt.zero_grad(set_to_none=True)
    n = len(batches)
    values: list[float] = []
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        sync = i == n - 1 or not hasattr(module, "no_sync")
        with contextlib.nullcontext() if sync else module.no_sync():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, scalars = module(batch)
            values.append(float(loss.detach()))
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
            # every rank runs every backward (the collectives must match); a NaN is skipped after
            if loss.requires_grad:
                (loss / n).backward()
    value = sum(values) / n
    out = dict(sums)
    if not D.all_true(all(math.isfinite(v) for v in values), device):
        opt.zero_grad(set_to_none=True)
        return value, out, False
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else float("inf"))
    out["grad_norm"] = float(norm)
    if not math.isfinite(out["grad_norm"]):
        opt.zero_grad(set_to_none=True)
        return value, out, False
    opt.step()
    return value, out, True


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------


def train(objective: torch.nn.Module, data: Callable[[int], Iterable[dict]], run_dir: str | Path,
          s: OptimConfig, *, seed: int = 0, val_batch: dict | None = None, config: dict | None = None,
          stop_at: int | None = None, progress: bool = True) -> LoopResult:
    """Train `objective` to `s.steps` (a stage's `cfg.nerf` / `cfg.mesh`), resuming from the newest valid
    checkpoint under `run_dir`. Rank r seeds python, numpy and torch with `seed + r`.

    `data` yields this rank's micro-batches (`s.micro_batch` assets, or batch_size / world); a step takes
    `accumulation = batch_size / (world · micro)` of them (`training.distributed.batch_split`), so
    `s.batch_size` is the global batch. The data position counts micro-batches.

    `stop_at` ends this process early (after that step, checkpointing it) without changing the schedule —
    what an interruption looks like, for tests and time-boxed jobs. `progress` shows a tqdm bar (rank 0).
    """
    run_dir = Path(run_dir)
    device = D.init()
    _, accumulation = D.batch_split(s.batch_size, s.micro_batch)
    objective.to(device)
    apply_speedups(objective.model, s)
    opt, dtype = make_optimizer(objective, s), autocast_dtype(s.precision, device)
    sched = make_scheduler(opt, s)
    seed_all(seed + D.rank())
    result = LoopResult(step=0, skipped=0)
    state = TrainState()
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(ckpt, objective.model, opt, sched, D.rank(), D.world_size())
        result.resumed_from = ckpt
    module = D.wrap_ddp(objective, device)
    log = Logger(run_dir, D.is_main(), s.steps, state.step, s.wandb_project, config, progress)
    if ckpt is not None:
        log.message(f"resumed from {ckpt} (step {state.step}, {state.skipped} skipped so far)")
    end = min(s.steps, stop_at if stop_at is not None else s.steps)
    batches = iter(data(state.position))
    t0, samples = time.perf_counter(), 0
    while state.step < end:
        micro = [to_device(next(batches), device) for _ in range(accumulation)]
        state.position += accumulation
        module.train()
        loss, scalars, applied = train_step(module, opt, micro, s, device, dtype)
        sched.step()
        state.step += 1
        result.losses[state.step] = loss
        if "grad_norm" in scalars:
            result.grad_norms[state.step] = scalars["grad_norm"]
        samples += sum(len(b.get("uid", [0])) for b in micro) * D.world_size()
        rate = samples / max(time.perf_counter() - t0, 1e-9)
        if not applied:
            state.skipped += 1
            log.message(f"step {state.step}: non-finite loss/gradient ({loss}); skipped ({state.skipped} so far)")
        if state.step % s.log_every == 0 or not applied:
            log.scalars(state.step, {"loss": D.mean_scalar(loss, device) if applied else loss, **scalars,
                                     "lr": sched.get_last_lr()[0], "samples_per_s": rate,
                                     "skipped_steps": state.skipped})
        log.progress(state.step, loss, rate)
        if val_batch is not None and (state.step % s.image_every == 0 or state.step == s.steps):
            result.val[state.step] = validate(objective, val_batch, device, dtype, log, state.step)
        if state.step % s.ckpt_every == 0 or state.step in (end, s.steps):
            result.checkpoint = checkpoint(run_dir, state, objective, opt, sched, s, config)
    log.close()
    result.step, result.skipped = state.step, state.skipped
    return result


@torch.no_grad()
def validate(objective: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype | None,
             log: Logger, step: int) -> dict[str, float]:
    """Scalars (and images) of the objective on the fixed validation batch, in eval mode."""
    objective.eval()
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        values = objective.validate(batch) if hasattr(objective, "validate") else {}
        images = objective.images(batch) if hasattr(objective, "images") else {}
    log.scalars(step, values, prefix="val/")
    log.images(step, {k: v.float() for k, v in images.items()})
    log.flush()
    objective.train()
    return values


def checkpoint(run_dir: Path, state: TrainState, objective: torch.nn.Module, opt: torch.optim.Optimizer,
               sched: Any, s: OptimConfig, config: dict | None) -> Path | None:
    """Gather every rank's RNG state; rank 0 writes the folder; everyone waits for it."""
    states = D.gather_objects(rng_state())
    path = None
    if D.is_main():
        path = save_checkpoint(run_dir, state, objective.model, opt, sched, states, s.keep_last,
                               extra_meta={"total_steps": s.steps})
    D.barrier()
    return path
