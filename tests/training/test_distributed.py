"""Multi-process training on CPU with gloo: the loop's DDP path (gradient averaging, the all-rank skip of a
non-finite step, rank-0 checkpoints with every rank's RNG) against a single-process reference on the same
data, and `torchrun --nproc_per_node 2` running stage 1, each rank reading its own shards."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.config import Config, OptimConfig
from pipelines.shards import pack
from tests.fake_renders import write_renders
from training import distributed as D
from training.loop import train

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import hashlib, json, os, sys
    import training.train_nerf as T
    from training import distributed as D

    out = sys.argv[1]
    real_stream, real_train = T.epoch_stream, T.train

    def recording_stream(loader, position):
        for batch in real_stream(loader, position):
            with open(f"{out}/uids-rank{D.rank()}.jsonl", "a") as f:
                f.write(json.dumps(batch["uid"]) + "\\n")
            yield batch

    def hashing_train(objective, *a, **k):
        result = real_train(objective, *a, **k)
        h = hashlib.sha256()
        for name, t in sorted(objective.model.state_dict().items()):
            h.update(name.encode() + t.detach().cpu().numpy().tobytes())
        with open(f"{out}/weights-rank{D.rank()}.txt", "w") as f:
            f.write(h.hexdigest())
        return result

    T.epoch_stream, T.train = recording_stream, hashing_train
    sys.exit(T.main(sys.argv[2:]))
""")

SMALL = ["loader.input_size=32", "loader.shuffle_buffer=1", "nerf.render_size=32", "nerf.patch_size=8",
         "nerf.batch_size=1", "nerf.sup_views=2", "nerf.lpips_weight=0", "nerf.steps=2", "nerf.ckpt_every=1",
         "nerf.log_every=1", "nerf.image_every=100", "model.samples_per_ray=8", "model.width=32", "model.heads=2",
         "model.head_dim=16", "model.depth=2", "model.plane_res=4", "model.upsample=2", "model.plane_channels=4"]


def test_rank_helpers_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert D.init() == want and not D.is_distributed()
    monkeypatch.setenv("RANK", "1")  # before a process group exists, the loader's split reads the environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (D.rank(), D.world_size(), D.is_main()) == (1, 2, False)


STEPS, ROWS = 5, 8  # rows of the global batch; each of 2 ranks gets half


class Regression(torch.nn.Module):
    """A small deterministic objective (no dropout): MSE of an MLP; `batch["poison"]` makes its loss NaN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = ((self.model(batch["x"]) - batch["y"]) ** 2).mean()
        return (loss * float("nan") if batch["poison"] else loss), {}


def global_batches(rank: int, world: int, micro: int, poison: tuple[int, int] | None = None):
    """data(position) for the loop: this rank's micro-batches of one fixed global batch of ROWS rows per step
    (rank r holds rows [r·ROWS/world, (r+1)·ROWS/world), cut into micro-batches of `micro` rows, taken in
    order); `poison` = (step, row) makes the micro-batch holding that row non-finite."""
    per_rank = ROWS // world
    accumulation = per_rank // micro

    def data(position: int):
        for p in itertools.count(position):
            i, j = divmod(p, accumulation)
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(ROWS, 4, generator=g)
            y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
            rows = slice(rank * per_rank + j * micro, rank * per_rank + (j + 1) * micro)
            bad = poison is not None and poison[0] == i + 1 and rows.start <= poison[1] < rows.stop
            yield {"x": x[rows], "y": y[rows], "uid": ["a"] * micro, "poison": bad}
    return data


def _settings(micro: int = 0) -> OptimConfig:
    # grad_clip 0.5 is hit on the first steps: clipping must act on the averaged gradient, as in one process.
    # batch_size is the global batch (all ranks); micro_batch 0 = batch_size / world size.
    return OptimConfig(steps=STEPS, lr=0.05, warmup_steps=1, grad_clip=0.5, ckpt_every=100, log_every=1,
                       batch_size=ROWS, micro_batch=micro)


# name: (poison (step, row), micro-batch per rank). Row 6 is in rank 1's half. "accumulate": 2 ranks x 2
# micro-batches of 2 rows = the global batch of 8, with gradient accumulation.
SCENARIOS = {"clean": (None, 0), "nan_on_rank1_step3": ((3, 6), 0), "accumulate": (None, 2),
             "accumulate_nan": ((2, 1), 2)}


def _ddp_rank(rank: int, world: int, ports: list[int], out: str) -> None:
    """One rank: every scenario in turn (one process group each), so the test pays one spawn."""
    torch.set_num_threads(1)
    for (name, (poison, micro)), port in zip(SCENARIOS.items(), ports):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        objective = Regression()
        try:
            result = train(objective, global_batches(rank, world, micro or ROWS // world, poison),
                           Path(out) / name / "run", _settings(micro), seed=0, progress=False)
        finally:
            D.shutdown()
        torch.save({"params": [p.detach() for p in objective.model.parameters()], "skipped": result.skipped,
                    "grad_norms": result.grad_norms, "losses": result.losses}, Path(out) / name / f"rank{rank}.pt")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_2_gloo_ranks_equals_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    """2 ranks, each with half of every global batch (in one micro-batch, or in two with gradient
    accumulation), train through the loop's DDP path; a single process trains on the whole batches (its
    mean loss = the mean of the halves' means, so its gradient = DDP's average of the accumulated ones).
    Gradient norms at every step and parameters after the run are equal on both ranks and to the
    reference. With a NaN loss on one rank only, both ranks skip that step (the reference skips it too)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on CPU in the ranks, also on a GPU machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_rank, args=(2, [_free_port() for _ in SCENARIOS], str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch.set_num_threads(1)
    init = list(Regression().model.parameters())
    for name, (poison, micro) in SCENARIOS.items():
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        reference = Regression()
        ref = train(reference, global_batches(0, 1, ROWS, poison), tmp_path / name / "reference", _settings(),
                    seed=0, progress=False)
        assert ref.skipped == (1 if poison else 0), name
        assert ranks[0]["skipped"] == ranks[1]["skipped"] == ref.skipped, name
        assert set(ranks[0]["grad_norms"]) == set(ref.grad_norms), name  # the same steps were applied
        for step, norm in ref.grad_norms.items():
            # the all-reduced gradient: equal on both ranks, and (to float32 reduction order) the reference's
            assert ranks[0]["grad_norms"][step] == ranks[1]["grad_norms"][step], (name, step)
            assert abs(ranks[0]["grad_norms"][step] - norm) <= 1e-5 * norm + 1e-7, (name, step)
        for step in ref.losses:  # the global batch's loss is the mean of the two ranks' losses
            mean = 0.5 * (ranks[0]["losses"][step] + ranks[1]["losses"][step])
            assert (math.isnan(mean) and math.isnan(ref.losses[step])) or abs(mean - ref.losses[step]) < 1e-5, name
        for p0, p1, p in zip(ranks[0]["params"], ranks[1]["params"], reference.model.parameters()):
            assert torch.equal(p0, p1), name  # DDP keeps the replicas identical
            # float32 reduction order differs (all-reduce of two half-batch gradients vs one backward)
            torch.testing.assert_close(p0, p.detach(), rtol=1e-5, atol=1e-6)
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(ranks[0]["params"], init)), name  # it trained
        step = tmp_path / name / "run" / f"step-{STEPS}"
        meta = json.loads((step / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["skipped"] == ref.skipped
        assert meta["position"] == STEPS * (ROWS // 2 // (micro or ROWS // 2)), name  # micro-batches consumed
        rng = torch.load(step / "rng.pt", weights_only=True)
        assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


def test_batch_split_is_global_over_ranks_and_accumulation():
    assert D.batch_split(512, 0, 32) == (16, 1)  # the paper's stage 1: 16 assets per GPU
    assert D.batch_split(512, 4, 32) == (4, 4)  # 4 per forward, 4 accumulation steps
    assert D.batch_split(192, 2, 32) == (2, 3)  # stage 2
    assert D.batch_split(8, 0, 1) == (8, 1)
    with pytest.raises(ValueError, match="does not divide over 5 ranks"):
        D.batch_split(512, 0, 5)
    with pytest.raises(ValueError, match="micro_batch 5 does not divide"):
        D.batch_split(192, 5, 32)


def _uids_in(shard: Path) -> str:
    """The sample keys of a shard, read with tarfile (independent of the loader), as JSON."""
    import tarfile

    with tarfile.open(shard) as tar:
        return json.dumps(sorted({m.name.split(".", 1)[0] for m in tar.getmembers()}))


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path):
    uids = [f"asset{i}" for i in range(4)]
    write_renders(tmp_path, uids, views=6, size=32)
    cfg = Config(out=str(tmp_path))
    cfg.shards.val_fraction, cfg.shards.max_count = 0.0, 2
    pack(cfg, executor="local")
    shards = sorted((tmp_path / "shards").glob("train-*.tar"))
    assert len(shards) == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # torchrun runs a script file: write the driver out.
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(tmp_path), "--out", str(tmp_path), *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    seen = {r: [u for line in (tmp_path / f"uids-rank{r}.jsonl").read_text().splitlines()
                for u in json.loads(line)] for r in (0, 1)}
    assert len(seen[0]) == 2 and len(seen[1]) == 2  # 2 steps x batch 1 on each rank
    # Within an epoch (here one step: nerf.ckpt_every=1) each rank reads only its own shard, so at every
    # step the two ranks hold assets of different shards (the split is reshuffled per epoch).
    shard_of = {u: i for i, sh in enumerate(shards) for u in json.loads(_uids_in(sh))}
    for a, b in zip(seen[0], seen[1]):
        assert shard_of[a] != shard_of[b], (seen, shard_of)
    # DDP averaged the gradients: both replicas end with the same weights.
    assert (tmp_path / "weights-rank0.txt").read_text() == (tmp_path / "weights-rank1.txt").read_text()
    meta = json.loads((tmp_path / "runs" / "nerf" / "step-2" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
    rng = torch.load(tmp_path / "runs" / "nerf" / "step-2" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
