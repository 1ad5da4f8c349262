"""Multi-process training: `torchrun --nproc_per_node 2` with gloo runs stage 1 for 2 steps; each rank reads
its own shards (the loader's node splitting) and DDP keeps the replicas identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.config import Config
from pipelines.shards import pack
from tests.fake_renders import write_renders
from training import distributed as D

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import hashlib, json, os, sys
    import training.train_nerf as T
    from training import distributed as D

    out = sys.argv[1]
    real_stream, real_train = T.epoch_stream, T.train

    def recording_stream(loader, position, per_epoch):
        for batch in real_stream(loader, position, per_epoch):
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
    assert D.init() == torch.device("cpu") or torch.cuda.is_available()
    assert not D.is_distributed()
    assert list(D.split_by_node(iter(range(5)))) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(D.split_by_node(iter(range(5)))) == [1, 3]


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
