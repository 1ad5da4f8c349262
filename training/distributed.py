"""Process-group setup from the torchrun environment, rank/world helpers and the DDP wrap.

`torchrun --nproc_per_node N [--nnodes M --rdzv_endpoint host:port] -m training.train_nerf ...` sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; a plain `python -m ...` has none of them and runs as a world of
one without a process group. NCCL is used on CUDA, gloo on CPU. The shard loader splits shards by
`rank()` / `world_size()` from here, so data splitting and gradient averaging agree on who is who.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group; falls back to $RANK before init, for data splitting)."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_distributed():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that logs and writes checkpoints."""
    return rank() == 0


def init(timeout_s: float = 1800.0) -> torch.device:
    """Initialise the process group if launched by torchrun; return this process's device.

    Safe to call twice. Without torchrun variables nothing is initialised (a world of one).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return device


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (e.g. "my loss is finite"), so all ranks take one branch."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def mean_scalar(value: float, device: torch.device) -> float:
    """Mean of a python float over ranks (for logging)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable things: RNG states, counters).

    all_gather_object unpickles what the other ranks send and the process group has no authentication:
    run multi-node training on a private network only (docs/scaleout.md)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def batch_split(global_batch: int, micro_batch: int = 0, world: int | None = None) -> tuple[int, int]:
    """(assets per rank per forward, accumulation steps) for a GLOBAL batch over `world` ranks
    (default: this world): global_batch = world x micro x accumulation. micro_batch 0 = global / world (no
    accumulation). A split that does not divide is a ValueError saying which numbers."""
    world = world_size() if world is None else world
    if global_batch < 1 or micro_batch < 0 or world < 1:
        raise ValueError(f"batch_size must be >= 1 and micro_batch >= 0, got {global_batch} and {micro_batch}")
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} (global) does not divide over {world} ranks")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"batch_size {global_batch} over {world} ranks is {per_rank} per rank, which micro_batch "
                         f"{micro} does not divide (batch_size = ranks x micro_batch x accumulation steps)")
    return micro, per_rank // micro


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` when there is more than one rank; the module itself otherwise.

    Wrap the module whose `forward` computes the loss (the training objective), since DDP synchronises
    gradients only for work that goes through the wrapper's forward.
    """
    if not is_distributed() or world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)

