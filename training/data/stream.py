"""The training loader: WebDataset shards -> a stream of batches of picked views (`make_loader`).

Per sample (one asset, docs/CONTRACTS.md "Shards") it draws `Vi` input and `Vs` supervision views (disjoint, seeded),
decodes just those PNGs from the raw tar bytes (`training.data.decode`), composites RGBA on a background,
resizes inputs to `loader.input_size` (K scaled), brings supervision views to the stage's `render_size` with
an optional random patch (K shifted), and writes them into the batch documented in docs/ARCHITECTURE.md
(`training.data.batch`).

Streams: `resampled=True` is the training mode (each node draws from its own share of the shards, each
DataLoader worker with its own seeded RNG, `with_epoch` cuts the infinite stream into epochs);
`resampled=False` visits every sample of the shards exactly once per epoch across nodes x workers (shards
are split, after one seeded shuffle that all ranks agree on). A corrupt shard or sample is skipped with a
warning and counted, never raised; a shard that failed `loader.shard_failure_budget` times is skipped for
the rest of the pass (reported once, counted in `ShardLoader.excluded`), and only a stream where nothing
decodes at all, or whose every shard is skipped, raises DataStalled. What the loader holds is bounded:
the shuffle buffer by `loader.shuffle_buffer` samples and `loader.shuffle_buffer_bytes` bytes, remote reads
by `loader.read_timeout_s`. Everything random comes from one numpy RNG per (seed, epoch, rank, worker),
so the same seed gives the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from core.config import Config
from core.layout import read_index_file
from training import distributed as D
from training.data.batch import as_tensors, decode_batches, finish_batch
from training.data.decode import ViewSpec, view_spec
from training.data.tario import (
    DataStalled,
    SkipCounter,
    expand_urls,
    open_stage,
    shuffle_bounded,
    tar_samples,
)

COMPOSITE = ("loader", "device")  # where uint8 views are composited: in the loader's process, or by the trainer


def _identity(x: Any) -> Any:  # the DataLoader's collate_fn: no default_convert of numpy fields in the worker
    return x


def skip_unused(spec: ViewSpec) -> Any:
    """Members the loader never reads for `spec` (normals; depth unless asked; geometry): not kept in memory."""
    def skip(name: str) -> bool:
        return name.endswith((".normal.png", ".geometry.npz")) or (not spec.depths and name.endswith(".depth.png"))

    return skip


class SampleStream(torch.utils.data.IterableDataset):
    """The per-process pipeline; built inside each DataLoader worker so it knows its own worker id."""

    def __init__(self, urls: list[str], spec: ViewSpec, batch_size: int, *, resampled: bool, seed: int,
                 rank: int, world_size: int, shuffle_buffer: int, batches_per_epoch: int = 0,
                 max_consecutive_failures: int = 100, shuffle_buffer_bytes: int = 0, read_timeout_s: float = 60.0,
                 shard_failure_budget: int = 0, allow_pipe: bool = False):
        super().__init__()
        if not urls:
            raise ValueError("no shard URLs")
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.resampled, self.seed, self.rank, self.world_size = resampled, seed, rank, world_size
        self.shuffle_buffer, self.batches_per_epoch = shuffle_buffer, batches_per_epoch
        self.shuffle_buffer_bytes, self.read_timeout_s = shuffle_buffer_bytes, read_timeout_s
        self.max_consecutive_failures, self.shard_failure_budget = max_consecutive_failures, shard_failure_budget
        self.allow_pipe = allow_pipe
        self.epoch = 0

    def node_shards(self) -> list[str]:
        """This node's shards: one seeded shuffle every rank agrees on, then every world_size-th shard."""
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if self.resampled and len(order) < self.world_size:
            return order  # too few shards to split; ranks still differ through their RNG seeds
        return order[self.rank::self.world_size]

    def _shards(self, worker: int, workers: int, rng: random.Random, handler: SkipCounter) -> Iterator[dict]:
        shards = self.node_shards()
        if self.resampled:
            if not shards:
                return
            while True:  # with_epoch cuts this
                left = [u for u in shards if u not in handler.excluded]
                if not left:
                    raise DataStalled(f"all {len(shards)} shard(s) of this stream failed "
                                      f"{handler.shard_failure_budget} times each and were skipped; the last "
                                      f"failure: {handler.last}")
                yield {"url": rng.choice(left)}
        else:
            for u in shards[worker::workers]:
                yield {"url": u}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # One seed per (seed, epoch, rank, worker): numpy's SeedSequence, not hash(), so it is the same everywhere.
        ss = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker])
        rng = np.random.default_rng(ss)
        py_rng = random.Random(int(ss.generate_state(1)[0]))
        # A resampled stream never ends: a systematic failure must raise instead of warning forever. A
        # finite pass (resampled=False) just skips what is bad and ends.
        handler = SkipCounter(max_consecutive=self.max_consecutive_failures if self.resampled else 0,
                              shard_failure_budget=self.shard_failure_budget)

        def tagged(batches: Iterator[dict]) -> Iterator[dict]:
            for b in batches:
                b["_worker"], b["_skipped"], b["_excluded"] = worker, handler.count, sorted(handler.excluded)
                yield b

        stages: list[Any] = [
            lambda: self._shards(worker, workers, py_rng, handler),
            partial(open_stage, handler=handler, read_timeout_s=self.read_timeout_s, allow_pipe=self.allow_pipe),
            partial(tar_samples, handler=handler, skip=skip_unused(self.spec)),
        ]
        if self.shuffle_buffer > 1:
            stages.append(partial(shuffle_bounded, max_samples=self.shuffle_buffer,
                                  max_bytes=self.shuffle_buffer_bytes, rng=py_rng))
        # Batches are decoded straight into (shared-memory, in a worker) buffers: no per-sample stack, no copy
        # into shared memory when the DataLoader sends them to the trainer.
        stages += [partial(decode_batches, spec=self.spec, rng=rng, batch_size=self.batch_size, handler=handler,
                           partial=not self.resampled, shared=info is not None), tagged]
        pipe = wds.DataPipeline(*stages)
        if self.resampled:
            pipe = pipe.with_epoch(nbatches=self.batches_per_epoch)
        yield from pipe


class ShardLoader:
    """Iterable of batches (dicts, see docs/ARCHITECTURE.md). `set_epoch(e)` reseeds; `skipped` counts skips.

    `composite="device"` leaves views that need no resize as uint8 views (`training.data.batch.UINT8_KEYS`)
    for `finish_batch(b, device)` to composite on the training device (batches are then pinned when CUDA is
    there); `composite="loader"` gives finished float32 batches on the CPU, composited in this process."""

    def __init__(self, stream: SampleStream, workers: int, composite: str = "loader"):
        if composite not in COMPOSITE:
            raise ValueError(f"composite must be one of {COMPOSITE}, got {composite!r}")
        self.stream, self.workers, self.composite = stream, workers, composite
        self._skipped: dict[int, int] = {}
        self._excluded: dict[int, list[str]] = {}

    @property
    def skipped(self) -> int:
        """Corrupt shards/samples skipped so far in this epoch (summed over workers)."""
        return sum(self._skipped.values())

    @property
    def excluded(self) -> list[str]:
        """Shards skipped for the rest of this epoch after loader.shard_failure_budget failures (any worker)."""
        return sorted({u for us in self._excluded.values() for u in us})

    @property
    def batches_per_epoch(self) -> int:
        """Batches one epoch of this loader yields in this process: every DataLoader worker runs its own
        resampled stream of `stream.batches_per_epoch` batches (0 for a finite, non-resampled pass)."""
        return self.stream.batches_per_epoch * max(1, self.workers)

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._skipped, self._excluded = {}, {}
        on_device = self.composite == "device"
        if self.workers > 0:
            # The workers' base seed comes from a generator of its own (our pipeline seeds its RNGs itself):
            # drawn from the global torch RNG, it would shift the trainer's random stream by the moment an
            # epoch starts, and a run resumed mid-epoch (RNG restored from the checkpoint, then a new
            # DataLoader) would diverge from the uninterrupted one.
            s = self.stream
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([s.seed, s.epoch, s.rank]).generate_state(1)[0]))
            it: Any = torch.utils.data.DataLoader(s, batch_size=None, num_workers=self.workers,
                                                  persistent_workers=False, collate_fn=_identity,
                                                  pin_memory=on_device and torch.cuda.is_available(), generator=gen)
        else:
            it = self.stream
        for b in it:
            w = b.pop("_worker")
            self._skipped[w], self._excluded[w] = b.pop("_skipped"), b.pop("_excluded")
            b = as_tensors(b)
            yield b if on_device else finish_batch(b)


def make_loader(cfg: Config, urls: str | Sequence[str], stage: str = "nerf", *, batch_size: int | None = None,
                resampled: bool | None = None, epoch_samples: int | None = None, workers: int | None = None,
                seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                composite: str = "loader", **spec_overrides: Any) -> ShardLoader:
    """Batches for `stage` ("nerf" | "mesh") from shard `urls` (`composite`: see ShardLoader).

    Arguments left None come from the config (`loader.*`; batches of the stage's per-rank micro-batch,
    `training.distributed.batch_split` of its global `batch_size`); rank/world size from torch.distributed or
    RANK/WORLD_SIZE. `epoch_samples` is per worker for the resampled stream (0 = the
    number of samples the index lists for these shards, spread over ranks x workers). `spec_overrides` are
    ViewSpec fields (e.g. `depths=True`, `patch=0`, `background="random"`).
    """
    spec = view_spec(cfg, stage, **spec_overrides)
    lc = cfg.loader
    resampled = lc.resampled if resampled is None else resampled
    workers = lc.workers if workers is None else workers
    seed = lc.seed if seed is None else seed
    rank = D.rank() if rank is None else rank
    world_size = D.world_size() if world_size is None else world_size
    if not batch_size:
        section = cfg.nerf if stage == "nerf" else cfg.mesh
        batch_size, _ = D.batch_split(section.batch_size, section.micro_batch, world_size)
    shard_list = expand_urls(urls)
    if not shard_list:
        raise FileNotFoundError(f"no shards match {urls!r}")
    per_epoch = 0
    if resampled:
        n = lc.epoch_samples if epoch_samples is None else epoch_samples
        if n <= 0:
            n = -(-_indexed_samples(shard_list) // (world_size * max(1, workers)))
        per_epoch = max(1, n // batch_size)
    stream = SampleStream(shard_list, spec, batch_size, resampled=resampled, seed=seed, rank=rank,
                          world_size=world_size, shuffle_buffer=lc.shuffle_buffer, batches_per_epoch=per_epoch,
                          max_consecutive_failures=lc.max_consecutive_failures,
                          shuffle_buffer_bytes=lc.shuffle_buffer_bytes, read_timeout_s=lc.read_timeout_s,
                          shard_failure_budget=lc.shard_failure_budget, allow_pipe=lc.allow_pipe)
    return ShardLoader(stream, workers, composite)


def _indexed_samples(urls: list[str]) -> int:
    """Samples in these shards according to the index.parquet beside them (local shards only)."""
    first = Path(urls[0].removeprefix("file:"))
    index = first.parent / "index.parquet"
    if urlparse(urls[0]).scheme not in ("", "file") or not index.is_file():
        raise ValueError("loader.epoch_samples=0 needs index.parquet beside local shards; set loader.epoch_samples")
    names = {Path(u.removeprefix("file:")).name for u in urls}
    return sum(r["count"] for r in read_index_file(index) if r["shard"] in names)
