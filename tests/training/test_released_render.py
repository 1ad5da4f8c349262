"""training/model/renderer.py + GTR.render_rays / render_views against the released eval-mode volume renderer
(fixture official-gtr-tiny-v2 `render`: 64 labelled rays and two 8×8 images, README "render.safetensors").

Every key of the fixture is held below; `HELD` lists them so a key added to the fixture fails this module."""

from __future__ import annotations

import torch

from tests.training.released import fixture, tiny_io, tiny_model
from training import cameras
from training.model.renderer import bin_edges, composite, ray_box, ray_samples

F = fixture("render")
BOX, NEAR_MIN, S = 1.0, 0.2, 256  # the released BaseNeRF settings of the fixture (aabb [-1,1]^3, min_near 0.2)
HELD = {"rays_o", "rays_d", "ray_category", "near_raw", "far_raw", "is_ray_valid", "near", "far", "bin_edges",
        "sample_positions", "sample_density_unmasked", "sample_rgb", "weights", "rgb", "accumulation",
        "accum_mask", "depth_median_extra", "depth_expected_extra", "img_poses", "img_intrinsics", "img_rgb",
        "img_accumulation", "img_accum_mask"}
VALID = F["is_ray_valid"].bool()
# Distances reach ~17 (the far of invalid rays) and ~5 on valid ones: a float32 ulp there is ~5e-7, and the
# edges are computed in the released order (x·far + (1−x)·near), so they agree to a few ulps.
ATOL_T = 2e-6
# Field values: the same trilinear/MLP maths in a different summation order (grid_sample vs the released
# decoder, our plane-major first layer) — a few ulps of O(1) values, as in test_convert_official.
ATOL = 1e-5


def test_every_fixture_key_is_held_here():
    assert set(F) == HELD


def test_ray_box_matches_intersect_aabb_on_every_category():
    near, far, hit = ray_box(F["rays_o"], F["rays_d"], BOX, NEAR_MIN)
    # valid = far > near in both codes; the two degenerate rays (category 10: origin on a face plane with a
    # zero direction component) are NaN there and an empty interval here: a miss in both.
    assert torch.equal(hit[:, 0], VALID)
    assert torch.isnan(F["near_raw"][F["ray_category"] == 10]).all()
    torch.testing.assert_close(near[VALID, 0], F["near_raw"][VALID], atol=ATOL_T, rtol=0)
    torch.testing.assert_close(far[VALID, 0], F["far_raw"][VALID], atol=ATOL_T, rtol=0)
    # the released code marks misses with 1e10 (or NaN); ours with an empty segment near = far
    assert ((F["near_raw"][~VALID] == 1e10) | torch.isnan(F["near_raw"][~VALID])).all()
    assert torch.equal(near[~VALID], far[~VALID])
    # after the per-call replacement the released near/far of valid rays are untouched ...
    torch.testing.assert_close(F["near"][VALID], F["near_raw"][VALID], atol=0, rtol=0)
    torch.testing.assert_close(F["far"][VALID], F["far_raw"][VALID], atol=0, rtol=0)
    # ... and invalid rays get the batch's min near / max far, a batch-dependent value whose density the
    # released code then zeroes (apply_ray_mask); ours never samples them (Δ = 0), so both accumulate 0.
    assert torch.equal(F["near"][~VALID], F["near"][VALID].min().expand(int((~VALID).sum())))
    assert torch.equal(F["far"][~VALID], F["far"][VALID].max().expand(int((~VALID).sum())))


def test_eval_bin_edges_and_sample_positions():
    edges, t, delta, points = ray_samples(F["rays_o"], F["rays_d"], BOX, S, NEAR_MIN)
    torch.testing.assert_close(edges[VALID], F["bin_edges"][VALID], atol=ATOL_T, rtol=0)
    torch.testing.assert_close(points[VALID], F["sample_positions"][VALID], atol=ATOL_T, rtol=0)
    # the released edges of every ray (invalid ones too) are x·far + (1−x)·near of its near/far, exactly
    exact = bin_edges(F["near"][:, None], F["far"][:, None], S)
    torch.testing.assert_close(exact, F["bin_edges"], atol=0, rtol=0)
    assert (delta[~VALID] == 0).all()


def test_field_at_the_released_sample_positions():
    model = tiny_model()
    with torch.no_grad():
        density, rgb = model.query(_triplane(), F["sample_positions"].reshape(1, -1, 3))
    torch.testing.assert_close(density.reshape(64, S), F["sample_density_unmasked"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(rgb.reshape(64, S, 3), F["sample_rgb"], atol=ATOL, rtol=0)


def _triplane() -> torch.Tensor:
    return tiny_io()["triplane"]  # the code every v2 item uses (its README: "triplane" / `code`)


def test_weights_rgb_and_accumulation():
    # Composite the released densities/colours with our quadrature: weights, rgb, accumulation.
    _, t, delta, _ = ray_samples(F["rays_o"], F["rays_d"], BOX, S, NEAR_MIN)
    sigma = F["sample_density_unmasked"][..., None] * VALID[:, None, None]  # the released apply_ray_mask
    out = composite(sigma, F["sample_rgb"], t, delta, torch.ones(3), clamp=True)
    # weights are products of exp of cumulative sums of up to 256 terms: float32 agreement ~1e-6 relative
    torch.testing.assert_close(out["weights"][..., 0], F["weights"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out["rgb"], F["rgb"], atol=2e-6, rtol=0)
    torch.testing.assert_close(out["opacity"], F["accumulation"], atol=2e-6, rtol=0)
    torch.testing.assert_close(out["opacity"].clamp(0, 1), F["accum_mask"], atol=2e-6, rtol=0)
    assert (F["accumulation"][~VALID] == 0).all() and (out["opacity"][~VALID] == 0).all()
    # Depth: the released forward returns none (base_nerf.py:227 is commented out); its DepthRenderer
    # 'expected' is Σ w t / (Σ w + 1e-10), ours Σ w t / Σ w — equal wherever something accumulates. Our
    # renderer has no median depth (nothing of ours uses one); the fixture's median is the released
    # definition, checked here on our weights to show the two quadratures put mass in the same bins.
    lit = F["accumulation"][:, 0] > 1e-3
    torch.testing.assert_close(out["depth"][lit], F["depth_expected_extra"][lit], atol=1e-4, rtol=1e-5)
    cum = torch.cumsum(out["weights"][..., 0], dim=-1)
    idx = torch.searchsorted(cum, torch.full((64, 1), 0.5), side="left").clamp(0, S - 1)
    median = torch.gather(t[..., 0], -1, idx)
    torch.testing.assert_close(median[VALID & lit], F["depth_median_extra"][VALID & lit], atol=ATOL_T, rtol=0)


def test_render_rays_end_to_end():
    model = tiny_model()
    with torch.no_grad():
        out = model.render_rays(_triplane(), F["rays_o"][None], F["rays_d"][None], samples=S)
    # The whole path (slab test, edges, field, weights, white background, eval clamp) on all 64 rays,
    # including non-unit directions (category 8: t, near_min and Δ in units of |d|, as released) and
    # invalid/NaN rays, which render pure background in both.
    torch.testing.assert_close(out["rgb"][0], F["rgb"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["opacity"][0], F["accumulation"], atol=ATOL, rtol=0)


def test_images_through_the_released_camera_path():
    model = tiny_model()
    K = cameras.intrinsics_from_fxfycxcy(F["img_intrinsics"])[None]
    with torch.no_grad():
        out = model.render_views(_triplane(), F["img_poses"][None], K, 8, 8, samples=S)
    # rows = image v (down), cols = u in both; OpenCV c2w, pixel centres at +0.5, unit directions
    torch.testing.assert_close(out["rgb"][0].permute(0, 2, 3, 1), F["img_rgb"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["opacity"][0].permute(0, 2, 3, 1), F["img_accumulation"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["opacity"][0].permute(0, 2, 3, 1).clamp(0, 1), F["img_accum_mask"],
                               atol=ATOL, rtol=0)


def test_training_mode_edges_are_the_released_stratified_jitter():
    """Training mode is not in the fixture (its jitter comes from torch.rand); the released rule
    (README "Training mode", SpacedSampler): edge i uniform between the neighbouring bin centres, one draw
    per edge, midpoints as samples, per-sample Δ = end − start. Written out here from that statement."""
    near, far = torch.tensor([[0.5], [1.0]]), torch.tensor([[2.5], [1.5]])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    edges = bin_edges(near, far, 8, stratified=True, generator=g1)
    u = torch.rand(2, 9, generator=g2)
    x = torch.linspace(0, 1, 9)
    c = (x[1:] + x[:-1]) / 2
    lo, hi = torch.cat([x[:1], c]), torch.cat([c, x[-1:]])
    want = (lo + (hi - lo) * u) * far + (1 - (lo + (hi - lo) * u)) * near
    torch.testing.assert_close(edges, want, atol=1e-6, rtol=0)
    assert (edges[:, 1:] >= edges[:, :-1]).all()  # still ordered: each edge stays inside its own window
    assert torch.equal(edges[:, 0] >= near[:, 0], torch.tensor([True, True]))
    # the samples a training render uses: midpoints and per-sample lengths of those jittered bins
    o, d = torch.zeros(1, 2, 3), torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    o[..., 2] = -2.0
    g3, g4 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    e, t, delta, _ = ray_samples(o, d, 1.0, 8, 0.0, stratified=True, generator=g3)
    torch.testing.assert_close(t[..., 0], (e[..., 1:] + e[..., :-1]) / 2)
    torch.testing.assert_close(delta[..., 0], e[..., 1:] - e[..., :-1])
    assert delta.std() > 0  # per-sample Δ, not one length per ray
    n, f, _ = ray_box(o, d, 1.0)
    torch.testing.assert_close(e, bin_edges(n, f, 8, stratified=True, generator=g4))
