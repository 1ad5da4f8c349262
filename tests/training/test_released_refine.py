"""Texture refinement, `refine.recipe=released` (training/refine.py), against three steps of the released
`MeshGen.refine_texture` with its optimiser and scheduler (fixture official-gtr-tiny-v2 `refine`, README
"refine.safetensors"): analytic sphere surface points stand in for the rasteriser; loss, every param group's
learning rate, gradient norms, gradients, triplane and f_c after every step.

Every key of the fixture is held below (`HELD`)."""

from __future__ import annotations

import json

import torch

from core.config import RefineConfig, load_config
from tests.training.released import fixture, metadata, tiny_io, tiny_model
from training import cameras
from training.mesh import Surface
from training.refine import fit_texture, recipe_of, released_color_lr_factor

F = fixture("refine")
FIELD = [k.split(".", 1)[1] for k in F if k.startswith("field_init.")]
HELD = ({"code_init", "cond_c2w", "cond_intrinsics", "tex_pts", "hard_masks", "cond_imgs_16_u8", "pred_imgs_16",
         "loss", "final_loss_returned", "lr_initial", "lr_at_step", "lr_after_scheduler_step", "grad_scale",
         "grad_norm_preclip_field_generator", "code_grad", "code_after_step", "code_returned"}
        | {f"field_init.{k}" for k in FIELD} | {f"field_after_step.{k}" for k in FIELD}
        | {f"field_grad.{k}" for k in FIELD if "mlp_color" in k})
# Our names of the released field parameters (decoder.field.mlp_{sigma,color}.layers.i.*).
OURS = {k: k.replace("decoder.field.mlp_sigma", "density_mlp").replace("decoder.field.mlp_color", "color_mlp")
        for k in FIELD}
# Losses are means over 2·512²·3 values after a bilinear 16² -> 512² resize: ours sum in another order, ~1e-7.
# Gradients agree to ~1e-5 relative (rtol 1e-4). Adam's step lr·m/(√v + eps) turns a relative gradient
# difference δ into lr·δ·|g|·eps/(|g| + eps)², largest where |g| ≈ eps = 1e-8: with the code's lr 0.15 and
# δ = 1e-4 that is ≤ 4e-6 (observed 3.8e-6 on one of 1536 values), so parameters are compared at 1e-5.
ATOL_LOSS, ATOL_PARAM, RTOL_GRAD = 1e-6, 1e-5, 1e-4


def _plane_major(w: torch.Tensor) -> torch.Tensor:
    """A released first-layer weight [hidden, 3C] in our column order: the released field reads its sampled
    features channel-major (column c·3 + plane), ours plane-major (plane·C + c) (docs/model.md, key map)."""
    hidden, f = w.shape[-2:]
    return w.reshape(*w.shape[:-1], f // 3, 3).transpose(-1, -2).reshape(*w.shape[:-2], hidden, f)


def released(name: str) -> torch.Tensor:
    """A released field tensor in our layout (the first layer's input columns are plane-major in ours)."""
    t = F[name]
    return _plane_major(t) if name.endswith("layers.0.weight") and t.ndim == 2 else t


def test_every_fixture_key_is_held_here():
    assert set(F) == HELD


def _run():
    model = tiny_model()
    hit = F["hard_masks"][..., 0] > 0.5
    surface = Surface(points=F["tex_pts"], depth=torch.zeros_like(F["hard_masks"]), hit=hit, rast=None, clip=None,
                      faces=None, rasterizer=None)
    # the 512² targets refine_texture compares with: the 16² images repeated 32× along H and W, / 255
    target = F["cond_imgs_16_u8"].permute(0, 3, 1, 2).float().repeat_interleave(32, 2).repeat_interleave(32, 3) / 255
    recipe = recipe_of(RefineConfig(recipe="released", steps=3))
    steps: list[dict] = []

    def record(info: dict) -> None:
        steps.append({**info, "planes": info["planes"].detach().clone(),
                      "color": {k: v.detach().clone() for k, v in info["color_mlp"].state_dict().items()}})

    init = {k: v.clone() for k, v in model.state_dict().items()}
    planes, fc, losses = fit_texture(model, F["code_init"], surface, target, recipe, "both", 1.0, on_step=record)
    return model, init, planes, fc, losses, steps


def test_recipe_numbers_are_the_released_ones():
    r = recipe_of(RefineConfig(recipe="released"))
    assert (r.steps, r.loss, r.lr_triplane, r.lr_color, r.optimizer, r.betas, r.weight_decay) == \
        (50, "l1", 0.15, 1e-4, "adamw", (0.9, 0.95), 0.05)
    assert (r.color_schedule, r.color_grad_clip, r.supersample) == ("released", 1.0, 2)  # 1024 -> 512
    meta = metadata("refine")
    assert meta["optimizer"] == "AdamW lr 1e-4 betas (0.9, 0.95) weight_decay 0.05 eps 1e-8, clip_grad_norm_ 1.0 over field+generator params"
    assert meta["scheduler"] == "LambdaLR CosineDecay warm_up_end 1, learning_rate_alpha 0.05, max_steps 500 (groups 0-3 only)"
    official = load_config("configs/official.yaml").refine
    assert recipe_of(official).name == "released" and official.render_size == 512
    p = recipe_of(RefineConfig(recipe="paper"))
    assert (p.steps, p.loss, p.lr_triplane, p.lr_color, p.color_schedule, p.weight_decay) == \
        (20, "l2", 0.15, 1e-4, "constant", 0.0)


def test_learning_rates_of_every_group():
    *_, steps = _run()
    # groups 0-3 of the released optimiser (field/generator × decay/no-decay) share the f_c schedule; group 4
    # (the code) keeps 0.15: ours are [f_c weights, f_c biases, triplane]. The generator groups have no
    # gradient in refinement (AdamW skips them), so they have no counterpart here.
    assert (F["lr_initial"] == 0).all() and released_color_lr_factor(0) == 0.0  # LambdaLR's f(0) = 0
    for k, s in enumerate(steps):
        lr = F["lr_at_step"][k]
        assert lr[0] == lr[1] == lr[2] == lr[3] and lr[4] == 0.15
        assert abs(s["lrs"][0] - lr[0].item()) < 1e-15 and abs(s["lrs"][1] - lr[1].item()) < 1e-15
        assert s["lrs"][2] == lr[4].item()
        after = F["lr_after_scheduler_step"][k]
        assert abs(1e-4 * released_color_lr_factor(k + 1) - after[0].item()) < 1e-15 and after[4] == 0.15
    # the loss scale of the released GradScaler stays 2048 (a power of two in float32: no effect on values)
    assert (F["grad_scale"] == 2048).all()


def test_losses_gradients_and_updates_step_by_step():
    model, init, planes, fc, losses, steps = _run()
    torch.testing.assert_close(torch.tensor(losses), F["loss"], atol=ATOL_LOSS, rtol=0)
    assert abs(losses[-1] - F["final_loss_returned"].item()) < ATOL_LOSS  # refine_texture returns the last one
    for k, s in enumerate(steps):
        # f_c under the hard mask, white elsewhere, at the surface's 16² (before the resize to 512²)
        torch.testing.assert_close(s["shaded"].permute(0, 2, 3, 1), F["pred_imgs_16"][k], atol=1e-5, rtol=0)
        # clip_grad_norm_'s return (before clipping) over the f_c parameters: 0.08-0.11, so never clipped
        assert abs(s["color_grad_norm"] - F["grad_norm_preclip_field_generator"][k].item()) < 1e-6
        torch.testing.assert_close(s["planes_grad"], F["code_grad"][k], atol=1e-9, rtol=RTOL_GRAD)
        torch.testing.assert_close(s["planes"], F["code_after_step"][k], atol=ATOL_PARAM, rtol=0)
        for name, ours in OURS.items():
            key = ours.split(".", 1)[1]
            if name.startswith("decoder.field.mlp_color"):
                torch.testing.assert_close(s["color_grads"][key], _step(f"field_grad.{name}", k), atol=1e-9,
                                           rtol=RTOL_GRAD)
                torch.testing.assert_close(s["color"][key], _step(f"field_after_step.{name}", k), atol=ATOL_PARAM,
                                           rtol=0)
    torch.testing.assert_close(planes, F["code_returned"], atol=ATOL_PARAM, rtol=0)
    # step 0 has lr 0: f_c unchanged after it (its Adam moments were updated, which the later steps show)
    for name, ours in OURS.items():
        if "mlp_color" in name:
            torch.testing.assert_close(steps[0]["color"][ours.split(".", 1)[1]], released(f"field_init.{name}"),
                                       atol=0, rtol=0)
    # the shared model is untouched: f_d (no gradient in the released run either) and f_c
    for name, ours in OURS.items():
        torch.testing.assert_close(init[ours], released(f"field_init.{name}"), atol=0, rtol=0)
        torch.testing.assert_close(model.state_dict()[ours], init[ours], atol=0, rtol=0)
        if "mlp_sigma" in name:
            for k in range(3):  # the released f_d after every step = its init
                torch.testing.assert_close(_step(f"field_after_step.{name}", k), released(f"field_init.{name}"),
                                           atol=0, rtol=0)


def _step(name: str, k: int) -> torch.Tensor:
    t = F[name][k]
    return _plane_major(t) if name.endswith("layers.0.weight") else t


def test_cond_cameras_see_the_surface_points():
    """cond_c2w / cond_intrinsics only made tex_pts: our camera rays through the 16² pixel centres meet the
    stand-in sphere (centre (0.12, −0.03, 0.02), r 0.75) exactly at tex_pts where the hard mask is 1."""
    K = cameras.intrinsics_from_fxfycxcy(F["cond_intrinsics"])
    o, d = cameras.camera_rays(F["cond_c2w"].double(), K.double(), 16, 16)
    c, r = torch.tensor(json.loads(metadata("refine")["sphere"])[0], dtype=torch.float64), 0.75
    oc = o - c
    b = (d * oc).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    hit = disc > 0
    assert torch.equal(hit, F["hard_masks"][..., 0] > 0.5)
    p = o + (-b - disc.clamp(min=0).sqrt())[..., None] * d
    torch.testing.assert_close(p[hit].float(), F["tex_pts"][hit], atol=2e-6, rtol=0)
    assert (F["tex_pts"][~hit] == 0).all()
    # and they are the first fixture's input views; code_init is its triplane
    torch.testing.assert_close(F["cond_c2w"], tiny_io()["cond_poses"][0], atol=0, rtol=0)
    torch.testing.assert_close(F["cond_intrinsics"], tiny_io()["cond_intrinsics"][0], atol=0, rtol=0)
    torch.testing.assert_close(F["code_init"], tiny_io()["triplane"], atol=0, rtol=0)
