"""Checkpoint folders: a killed write leaves no valid step, keep-last, safe loading, exact resume."""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import OptimConfig
from training.checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.loop import make_optimizer, make_scheduler, train

ROOT = Path(__file__).resolve().parents[2]


class ToyObjective(torch.nn.Module):
    """A stand-in for a stage objective: an MLP with dropout (torch RNG) and numpy noise (numpy RNG), so
    resume exactness depends on every RNG stream and the optimizer state being restored."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                         torch.nn.Linear(32, 1))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        pred = self.model(batch["x"])
        noise = float(np.random.rand()) * 1e-3
        return ((pred - batch["y"]) ** 2).mean() + noise, {"noise": noise}


def toy_data(position: int):
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    for i in itertools.count(position):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(8, 4, generator=g)
        yield {"x": x, "y": torch.sin(x @ w), "uid": [f"a{i}"] * 8}


def settings(**kw) -> OptimConfig:
    base = dict(steps=8, lr=1e-2, warmup_steps=2, ckpt_every=100, keep_last=2, log_every=1, image_every=1000)
    base.update(kw)
    return OptimConfig(**base)


RUN = {"seed": 3, "progress": False}  # train()'s own arguments in every run here


def fresh() -> ToyObjective:
    torch.manual_seed(0)
    return ToyObjective()


def test_rng_roundtrip_all_streams():
    import random

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _save(run: Path, step: int, obj: ToyObjective, keep: int = 0) -> Path:
    opt = make_optimizer(obj, settings())
    sched = make_scheduler(opt, settings())
    return save_checkpoint(run, TrainState(step=step, position=step), obj.model, opt, sched, [rng_state()],
                           keep_last=keep)


def test_keep_last_and_newest(tmp_path):
    obj = fresh()
    for step in range(1, 6):
        _save(tmp_path, step, obj, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-5"]  # no leftovers


def test_killed_write_leaves_no_valid_step(tmp_path):
    """SIGKILL in the middle of writing step-2 (after the optimizer file): step-1 stays the newest valid."""
    obj = fresh()
    _save(tmp_path, 1, obj)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import tests.training.test_checkpoint as T
        real = torch.save
        def dying_save(obj, path, *a, **k):
            real(obj, path, *a, **k)
            if str(path).endswith("scheduler.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        T._save(T.Path({str(tmp_path)!r}), 2, T.fresh())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and any((tmp_path / n / "optimizer.pt").exists() for n in leftovers)  # it was mid-write
    assert not (tmp_path / "step-2").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    _save(tmp_path, 3, obj)  # the next save cleans the temporaries
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_damaged_checkpoint_is_skipped(tmp_path):
    obj = fresh()
    _save(tmp_path, 1, obj)
    _save(tmp_path, 2, obj)
    (tmp_path / "step-2" / "rng.pt").unlink()  # e.g. a copy that stopped half-way
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-2", obj.model)


def test_untrusted_pickle_is_not_executed(tmp_path):
    obj = fresh()
    folder = _save(tmp_path, 1, obj)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    opt = make_optimizer(obj, settings())
    with pytest.raises(CheckpointError):
        load_checkpoint(folder, obj.model, opt)
    assert not marker.exists()


def test_wrong_model_is_a_clear_error(tmp_path):
    folder = _save(tmp_path, 1, fresh())
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(folder, other)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """8 steps straight vs. stopped after 3 (checkpoint) and resumed by rerunning: the next steps' losses
    and the final weights agree (bitwise here; the tolerance is only the contract's 1e-6)."""
    torch.set_num_threads(1)
    straight = train(fresh(), toy_data, tmp_path / "a", settings(), **RUN)
    first = train(fresh(), toy_data, tmp_path / "b", settings(), stop_at=3, **RUN)
    assert first.step == 3 and latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "step-3"
    torch.manual_seed(123)  # a different process state before the rerun must not matter
    np.random.seed(123)
    resumed_obj = fresh()
    resumed = train(resumed_obj, toy_data, tmp_path / "b", settings(), **RUN)
    assert resumed.resumed_from == tmp_path / "b" / "step-3"
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert abs(resumed.losses[step] - straight.losses[step]) <= 1e-6, step
    a = torch.load(tmp_path / "a" / "step-8" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "step-8" / "optimizer.pt", weights_only=True)
    for k in a["state"]:
        assert torch.allclose(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"], atol=1e-7, rtol=0)
    # And the rerun of a finished run does nothing.
    again = train(fresh(), toy_data, tmp_path / "b", settings(), **RUN)
    assert again.losses == {} and again.step == 8
