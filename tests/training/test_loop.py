"""The generic loop: non-finite steps skipped and counted, the LR schedule, gradient clipping, speed-ups."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from core.config import OptimConfig
from training.checkpoint import CheckpointError, TrainState, rng_state, save_checkpoint
from training.loop import (
    apply_speedups,
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    repeated_blocks,
    train,
    train_step,
)

CPU = torch.device("cpu")


class Poisonable(torch.nn.Module):
    """Linear regression whose loss becomes NaN (or its gradient inf) when the batch says so."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)

    def forward(self, batch):
        loss = ((self.model(batch["x"]) - batch["y"]) ** 2).mean()
        if batch["poison"] == "nan":
            loss = loss * float("nan")
        elif batch["poison"] == "inf_grad":
            loss = loss + torch.sqrt((self.model.weight * 0).sum())  # finite value, d/dw sqrt(0) = inf
        return loss, {}


def batches(poison_at: dict[int, str]):
    def data(position: int):
        for i in itertools.count(position):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(4, 3, generator=g)
            yield {"x": x, "y": x.sum(1, keepdim=True), "poison": poison_at.get(i + 1, ""), "uid": ["u"] * 4}
    return data


def settings(**kw) -> OptimConfig:
    return OptimConfig(**{**dict(steps=6, lr=1e-2, warmup_steps=0, ckpt_every=3, log_every=1, image_every=100),
                          **kw})


@pytest.mark.parametrize("poison", ["nan", "inf_grad"])
def test_non_finite_step_leaves_parameters_and_optimizer_untouched(poison):
    obj = Poisonable()
    s = settings()
    opt = make_optimizer(obj, s)
    clean = next(batches({})(0))
    train_step(obj, opt, clean, s, CPU, None)  # give the optimizer some state
    before = {k: v.clone() for k, v in obj.model.state_dict().items()}
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in obj.model.parameters()]
    _, _, applied = train_step(obj, opt, {**clean, "poison": poison}, s, CPU, None)
    assert not applied
    for k, v in obj.model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, m in zip(obj.model.parameters(), exp_avg):
        assert torch.equal(opt.state[p]["exp_avg"], m)


def test_non_finite_steps_are_counted_and_never_checkpointed(tmp_path):
    res = train(Poisonable(), batches({2: "nan", 3: "inf_grad", 5: "nan"}), tmp_path, settings(), progress=False)
    assert res.step == 6 and res.skipped == 3
    assert math.isnan(res.losses[2]) and math.isfinite(res.losses[4])
    meta = json.loads((tmp_path / "step-6" / "meta.json").read_text())
    assert meta["skipped"] == 3
    from safetensors.torch import load_file

    for t in load_file(tmp_path / "step-6" / "model.safetensors").values():
        assert torch.isfinite(t).all()
    # The counter is in TensorBoard too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/skipped_steps")][-1] == 3


def test_nan_weights_refused_by_checkpoint(tmp_path):
    obj = Poisonable()
    with torch.no_grad():
        obj.model.weight[0, 0] = float("nan")
    opt = make_optimizer(obj, settings())
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(tmp_path, TrainState(step=1), obj.model, opt, make_scheduler(opt, settings()),
                        [rng_state()])
    assert not any(tmp_path.iterdir())


def test_warmup_cosine_schedule_against_closed_form():
    peak, w, total = 2e-3, 10, 110
    obj = Poisonable()
    s = settings(lr=peak, warmup_steps=w, steps=total)
    opt = make_optimizer(obj, s)
    sched = make_scheduler(opt, s)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(peak / 10)  # linear warm-up: (s + 1) / w
    assert lrs[4] == pytest.approx(peak * 0.5)
    assert lrs[w] == pytest.approx(peak)  # warm-up ends at the peak
    # Cosine over the 100 steps after warm-up: quarter, half, three quarters, end.
    assert lrs[w + 25] == pytest.approx(peak * (1 + math.sqrt(0.5)) / 2)
    assert lrs[w + 50] == pytest.approx(peak / 2)
    assert lrs[w + 75] == pytest.approx(peak * (1 - math.sqrt(0.5)) / 2)
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    # Both param groups (decayed and not) follow it.
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_gradient_clipping_scales_to_the_limit():
    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.p = torch.nn.Parameter(torch.zeros(4))
            self.c = torch.tensor([3.0, 4.0, 0.0, 12.0])  # |c| = 13

        def forward(self, batch):
            return (self.c * self.model.p).sum(), {}

    obj = Linear()
    opt = make_optimizer(obj, settings(grad_clip=1.0))
    _, scalars, applied = train_step(obj, opt, {}, settings(grad_clip=1.0), CPU, None)
    assert applied and scalars["grad_norm"] == pytest.approx(13.0)
    g = obj.model.p.grad
    assert g.norm() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(g, obj.c / 13.0, atol=1e-6)
    obj.model.p.grad = None
    train_step(obj, opt, {}, settings(grad_clip=0.0), CPU, None)  # 0 = off
    assert torch.allclose(obj.model.p.grad, obj.c)


def test_weight_decay_only_on_matrices():
    obj = Poisonable()
    opt = make_optimizer(obj, settings(weight_decay=0.05))
    by_wd = {g["weight_decay"]: [p.shape for p in g["params"]] for g in opt.param_groups}
    assert by_wd == {0.05: [torch.Size([1, 3])], 0.0: [torch.Size([1])]}


def test_activation_checkpointing_keeps_gradients_and_names():
    """Checkpointed blocks recompute activations in backward; the gradients and state-dict keys must equal
    the plain model's (reference: the same model without the patch)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8),
                                   torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
                                                        for _ in range(3)]))

    def run(m):
        h = m[0](torch.linspace(-1, 1, 10).reshape(2, 5))
        for blk in m[1]:
            h = blk(h)
        h.square().sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    plain, patched = make(), make()
    assert len(repeated_blocks(patched)) == 3
    assert apply_speedups(patched, settings(activation_checkpointing=True)) == 3
    assert list(plain.state_dict()) == list(patched.state_dict())
    for a, b in zip(run(plain), run(patched)):
        assert torch.allclose(a, b, atol=1e-6)


def test_precision_choice():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp8", CPU)


def test_stage_sections_are_the_loop_settings():
    """Both stages' sections are OptimConfigs: the YAML keys the loop reads are `nerf.lr`, `mesh.steps`, ...,
    and a stage's own default changes only that stage."""
    from core.config import MeshConfig, NerfConfig, load_config

    cfg = load_config("configs/paper.yaml", ["mesh.compile=true", "mesh.warmup_steps=7"])
    assert isinstance(cfg.nerf, OptimConfig) and isinstance(cfg.mesh, OptimConfig)
    assert (cfg.nerf.steps, cfg.nerf.lr, cfg.nerf.weight_decay, cfg.nerf.warmup_steps) == (150000, 1e-4, 0.05, 2000)
    assert cfg.nerf.activation_checkpointing and not cfg.mesh.activation_checkpointing
    assert (cfg.mesh.steps, cfg.mesh.lr, cfg.mesh.compile, cfg.mesh.warmup_steps) == (50000, 5e-5, True, 7)
    assert (NerfConfig().lr, MeshConfig().lr, OptimConfig().lr) == (5e-3, 2e-4, 1e-4)
    opt = make_optimizer(Poisonable(), cfg.mesh)
    assert opt.param_groups[0]["lr"] == 5e-5 and opt.param_groups[0]["weight_decay"] == 0.05
