"""Training checkpoints as folders `OUT/runs/<stage>/step-N/`, valid only once complete (torchtitan style).

A checkpoint folder holds:

    model.safetensors   the model's state dict (weights only; safetensors never runs code)
    optimizer.pt        optimizer state dict            (torch.save, read back with weights_only=True)
    scheduler.pt        LR scheduler state dict          (idem)
    data.pt             data position: {"position": batches consumed, ...caller's extras}
    rng.pt              RNG states per rank: python, numpy, torch CPU, CUDA (all devices)
    meta.json           step, world size, counters; written last, names every file above

The folder is built under a temporary name beside its final place and renamed when every file is closed
and fsynced (`core.io.atomic_dir`), so a write killed at any point leaves only a `.tmp-*` folder that
discovery ignores and `clean_temporaries` removes. Discovery also checks that `meta.json` names files that
exist, so a folder damaged after the fact (e.g. a half-finished delete) is skipped, and the newest *valid*
step wins. Keeping the last k deletes by renaming to a temporary name first, for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from core.io import TMP_PREFIX, atomic_dir, clean_temporaries
from core.layout import MAX_META_BYTES

STEP_RE = re.compile(r"^step-([0-9]+)\Z")
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "data.pt", "rng.pt")
# Bound on what we read back: a checkpoint's json is tiny; anything larger is not ours.


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded (missing files, wrong model, bad metadata)."""


# ----------------------------------------------------------------------------------------------------------
# RNG states as plain containers of tensors/ints/floats, so that `torch.load(weights_only=True)` reads them.
# ----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Capture python, numpy, torch (CPU) and CUDA (every device) RNG states."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`. CUDA states are restored only if the device count matches."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------------------------
# Discovery.
# ----------------------------------------------------------------------------------------------------------


def _read_meta(folder: Path) -> dict | None:
    meta_path = folder / "meta.json"
    try:
        if meta_path.stat().st_size > MAX_META_BYTES:
            return None
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get("complete") or not isinstance(meta.get("files"), list):
        return None
    if any(not (folder / str(name)).is_file() for name in meta["files"]):
        return None
    return meta


def is_valid(folder: str | Path) -> bool:
    """True if `folder` is a finished checkpoint (final name, complete meta.json, every file present)."""
    folder = Path(folder)
    return bool(STEP_RE.match(folder.name)) and folder.is_dir() and _read_meta(folder) is not None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Valid `step-N` folders under `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and is_valid(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint under `run_dir`, or None. A checkpoint folder itself is returned as is."""
    run_dir = Path(run_dir)
    if is_valid(run_dir):
        return run_dir
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------------------
# Save / load.
# ----------------------------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@dataclass
class TrainState:
    """What a resumed run needs besides the weights."""

    step: int = 0  # optimisation steps done (each consumed one batch, skipped or not)
    position: int = 0  # batches consumed from the data stream
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    data_extra: dict | None = None  # the caller's own data-state (e.g. seeds), plain values only


def save_checkpoint(run_dir: str | Path, state: TrainState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng_states: list[dict],
                    keep_last: int = 2, extra_meta: dict | None = None) -> Path:
    """Write `run_dir/step-N/` atomically and prune to the newest `keep_last` (0 = keep all).

    `rng_states` has one entry per rank (rank 0 gathers them); call this on rank 0 only.
    Refuses to write weights that are not finite: a NaN never reaches a checkpoint.
    """
    run_dir = Path(run_dir)
    model = unwrap(model)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to checkpoint step {state.step}: parameter '{name}' is not finite")
    final = run_dir / f"step-{state.step}"
    clean_temporaries(run_dir)
    with atomic_dir(final, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"position": state.position, "extra": state.data_extra or {}}, tmp / "data.pt")
        torch.save({"ranks": rng_states}, tmp / "rng.pt")
        meta = {"step": state.step, "position": state.position, "skipped": state.skipped,
                "world_size": len(rng_states), "files": list(FILES), "complete": True, **(extra_meta or {})}
        # meta.json last: even inside the temporary folder it is the mark of a finished write.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if keep_last > 0:
        prune(run_dir, keep_last)
    return final


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` valid checkpoints; return what was removed."""
    removed = []
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        # Rename first: an interrupted rmtree must never leave a half folder under a valid name.
        doomed = path.with_name(f"{TMP_PREFIX}{path.name}.deleted.{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of every kind: the file is data, not code
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, rank: int = 0, world_size: int = 1,
                    restore_rng: bool = True) -> TrainState:
    """Load weights (and, if given, optimizer/scheduler/RNG) from a checkpoint folder into live objects."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise CheckpointError(f"{folder} is not a complete checkpoint (no valid meta.json or missing files)")
    target = unwrap(model)
    try:
        missing, unexpected = load_model(target, str(folder / "model.safetensors"), strict=False)
    except Exception as e:
        raise CheckpointError(f"{folder} does not fit this model (wrong config?): {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not fit this model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]} (wrong config?)")
    if optimizer is not None:
        optimizer.load_state_dict(_torch_load(folder / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(folder / "scheduler.pt"))
    data = _torch_load(folder / "data.pt")
    if restore_rng:
        ranks = _torch_load(folder / "rng.pt")["ranks"]
        if len(ranks) == world_size:
            set_rng_state(ranks[rank])
        else:  # a different world size cannot continue the same streams; reseed deterministically per rank
            seed = int(meta["step"]) * 1000 + rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
    return TrainState(step=int(meta["step"]), position=int(data["position"]), skipped=int(meta.get("skipped", 0)),
                      data_extra=dict(data.get("extra") or {}))


def load_weights(path: str | Path, model: torch.nn.Module) -> Path:
    """Load only the model weights from a checkpoint folder or a run folder (newest valid step)."""
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    load_checkpoint(folder, model, restore_rng=False)
    return folder
