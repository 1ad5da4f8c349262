"""training/model against closed forms: triplane sampling of linear planes, volume rendering of a constant-
density sphere, FLOPs against torch's own flop counter; shapes of every block; the paper config builds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core import cameras as npcam
from core.config import ModelConfig, load_config
from training import cameras
from training.model import GTR, flops_per_sample, parameter_count
from training.model.decoders import ColorMLP, DensityMLP
from training.model.encoder import ImageEncoder
from training.model.lift import FEATURES
from training.model.renderer import ray_box, render_rays
from training.model.transformer import FeedForward, TriplaneTransformer
from training.model.triplane import sample_triplane
from training.model.upsampler import TriplaneUpsampler

torch.set_num_threads(2)


def _views(B: int, V: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c2w = torch.stack([torch.from_numpy(npcam.random_views(f"asset{b}", V)["c2w"]) for b in range(B)])
    K = torch.from_numpy(npcam.intrinsics(40.0, size)).expand(B, V, 3, 3).clone()
    return c2w, K


# -- blocks ------------------------------------------------------------------------------------------------

def test_block_shapes():
    enc = ImageEncoder(10, 32, 4, bias=False, token_norm=True)
    assert enc(torch.rand(2, 3, 10, 16, 8)).shape == (2, 3 * 4 * 2, 32)
    with pytest.raises(ValueError, match="multiple"):
        enc(torch.rand(1, 1, 10, 10, 10))
    tfm = TriplaneTransformer(32, 2, 4, 8, plane_res=3, ffn="geglu")
    assert tfm.planes.shape == (3, 32, 3, 3)
    assert tfm(torch.rand(2, 7, 32)).shape == (2, 3, 32, 3, 3)
    assert len(tfm.blocks) == 2
    ff = FeedForward(32, 64, "geglu")
    assert ff.proj_in.weight.shape == (128, 32) and ff.proj_out.weight.shape == (32, 64)
    up = TriplaneUpsampler(32, 5, 4)
    assert up(torch.rand(2, 3, 32, 3, 3)).shape == (2, 3, 5, 12, 12)
    assert DensityMLP(15, 16, 3)(torch.rand(4, 15)).shape == (4, 1)
    assert ColorMLP(15, 16, 4)(torch.rand(4, 15)).shape == (4, 3)
    assert len(DensityMLP(15, 16, 3).layers) == 3 and len(ColorMLP(15, 16, 4).layers) == 4


def test_image_tokens_do_not_reach_the_output_order():
    # Triplane token i must come out at the plane/row/column it went in at: with zero blocks the output
    # is the final LayerNorm of the learned planes, independent of the image tokens.
    tfm = TriplaneTransformer(16, 0, 2, 8, plane_res=4)
    out = tfm(torch.rand(1, 5, 16))
    ref = torch.nn.functional.layer_norm(tfm.planes.permute(0, 2, 3, 1), (16,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out[0], ref)


def test_decoder_activations():
    d = DensityMLP(6, 8, 1, bias=0.5)
    x = torch.randn(10, 6)
    torch.testing.assert_close(d(x), torch.log1p(torch.exp(d.layers[0](x) + 0.5)))
    c = ColorMLP(6, 8, 1, stretch=0.001)
    torch.testing.assert_close(c(x), torch.sigmoid(c.layers[0](x)) * 1.002 - 0.001)
    big = torch.full((1, 6), 1e4)
    c.layers[0].weight.data.fill_(1.0)
    assert c(big).max() > 1.0  # the stretch reaches past 1 (and so reaches exactly 1 at finite input)


# -- triplane sampling --------------------------------------------------------------------------------------

def test_triplane_sampling_of_linear_planes_is_exact():
    # Plane p channel 0 = its column coordinate, channel 1 = its row coordinate, at texel centres
    # (align_corners=False: texel j sits at (2j + 1)/R - 1). Bilinear interpolation of a linear function is
    # exact, so the features of (x, y, z) are (x, y | x, z | y, z) / box, clamped to the outermost centres.
    R, box = 8, 0.55
    c = (2 * torch.arange(R, dtype=torch.float64) + 1) / R - 1
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    plane = torch.stack([cols, rows])  # [2, R, R]
    planes = plane.expand(1, 3, 2, R, R).clone()
    pts = torch.from_numpy(np.random.default_rng(0).uniform(-0.7, 0.7, size=(1, 500, 3)))
    f = sample_triplane(planes, pts, box)
    assert f.shape == (1, 500, 6)
    q = (pts[0] / box).clamp(-1 + 1 / R, 1 - 1 / R)  # border padding holds the edge value
    expected = torch.stack([q[:, 0], q[:, 1], q[:, 0], q[:, 2], q[:, 1], q[:, 2]], dim=1)
    torch.testing.assert_close(f[0], expected, atol=1e-12, rtol=0)


# -- volume rendering ---------------------------------------------------------------------------------------

def _sphere_field(radius: float, sigma: float, color: tuple[float, float, float]):
    col = torch.tensor(color, dtype=torch.float64)

    def field(p: torch.Tensor):
        inside = (p.norm(dim=-1, keepdim=True) < radius).to(p.dtype)
        return sigma * inside, col.expand(*p.shape[:-1], 3)

    return field


def test_volume_rendering_of_a_constant_density_sphere():
    # Closed form for a ray with impact parameter b < r through a sphere of constant density s:
    # chord L = 2 sqrt(r^2 - b^2), opacity 1 - exp(-sL), rgb = c * opacity + bg * (1 - opacity),
    # expected termination depth t_in + 1/s - L exp(-sL) / (1 - exp(-sL)).
    r, s, color, bg = 0.4, 3.0, (0.2, 0.5, 0.9), 1.0
    b = torch.linspace(0.0, 0.55, 12, dtype=torch.float64)
    origin_dist = 2.0
    o = torch.stack([b, torch.zeros_like(b), torch.full_like(b, -origin_dist)], dim=1)[None]
    d = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(o).contiguous()
    out = render_rays(_sphere_field(r, s, color), o, d, box=0.55, samples=4096, near_min=0.0, background=bg,
                      chunk=5)
    hit = b < r
    L = 2 * torch.sqrt((r * r - b * b).clamp(min=0))
    opacity = 1 - torch.exp(-s * L)
    t_in = origin_dist - L / 2
    depth = torch.where(hit, t_in + 1 / s - L * torch.exp(-s * L) / (1 - torch.exp(-s * L)).clamp(min=1e-12),
                        torch.zeros_like(b))
    rgb = torch.tensor(color, dtype=torch.float64) * opacity[:, None] + bg * (1 - opacity[:, None])
    # Tolerances: 4096 bins over a 1.1-long segment are 2.7e-4 wide, and the sphere's edge falls anywhere
    # inside a bin, so the chord (and with it opacity, via s * dL) is known to ~1e-3.
    torch.testing.assert_close(out["opacity"][0, :, 0], opacity, atol=2e-3, rtol=0)
    torch.testing.assert_close(out["depth"][0, :, 0], depth, atol=2e-3, rtol=0)
    torch.testing.assert_close(out["rgb"][0], rgb, atol=2e-3, rtol=0)
    assert (out["opacity"][0, ~hit] == 0).all() and (out["depth"][0, ~hit] == 0).all()


def test_stratified_sampling_and_chunks():
    field = _sphere_field(0.4, 3.0, (0.0, 0.0, 0.0))
    o = torch.tensor([[[0.1, 0.0, -2.0]] * 6], dtype=torch.float64)
    d = torch.tensor([[[0.0, 0.0, 1.0]] * 6], dtype=torch.float64)
    mid = render_rays(field, o, d, box=0.55, samples=256, chunk=6)
    mid2 = render_rays(field, o, d, box=0.55, samples=256, chunk=4)
    torch.testing.assert_close(mid["rgb"], mid2["rgb"])
    g = torch.Generator().manual_seed(0)
    strat = render_rays(field, o, d, box=0.55, samples=256, stratified=True, generator=g)
    assert not torch.equal(strat["opacity"], mid["opacity"])  # jittered
    torch.testing.assert_close(strat["opacity"], mid["opacity"], atol=3e-2, rtol=0)  # same integral
    # per-ray jitter differs between rays that are otherwise identical
    assert strat["opacity"][0, :, 0].unique().numel() > 1


def test_ray_box_slab():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 2.0, -3.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.1]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    near, far, hit = ray_box(o, d, 1.0, near_min=0.2)
    torch.testing.assert_close(near[:, 0], torch.tensor([2.0, far[1, 0], 0.2, 0.2]))
    torch.testing.assert_close(far[[0, 2, 3], 0], torch.tensor([4.0, 1.0, 0.7]))
    assert hit[:, 0].tolist() == [True, False, True, True]


# -- the model ----------------------------------------------------------------------------------------------

def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(width=32, depth=2, heads=2, head_dim=16, plane_res=4, plane_channels=6, upsample=2,
                mlp_hidden=16, samples_per_ray=16, patch_size=8,
                density_bias=0.0, img_token_norm=False, lift_hull=False)  # pinned: the demo defaults of these changed
    base.update(kw)
    return ModelConfig(**base)


def test_gtr_api_shapes_and_gradients():
    torch.manual_seed(0)
    model = GTR(_tiny_cfg())
    B, V, S = 2, 3, 16
    c2w, K = _views(B, V, S)
    planes = model.triplane(torch.rand(B, V, 4, S, S), c2w, K)
    assert planes.shape == (B, 3, 6, 8, 8)
    density, rgb = model.query(planes, torch.rand(B, 10, 3) - 0.5)
    assert density.shape == (B, 10, 1) and rgb.shape == (B, 10, 3) and (density >= 0).all()
    out = model.render_views(planes, c2w[:, :2], K[:, :2], S, S, patch=(4, 2, 6, 5))
    assert out["rgb"].shape == (B, 2, 3, 6, 5)
    assert out["depth"].shape == out["opacity"].shape == (B, 2, 1, 6, 5)
    loss = out["rgb"].mean() + out["opacity"].mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert len(model.blocks) == 2


def test_render_views_patch_and_planar_depth():
    torch.manual_seed(1)
    model = GTR(_tiny_cfg(density_bias=2.0)).eval()
    c2w, K = _views(1, 1, 12)
    with torch.no_grad():
        planes = model.triplane(torch.rand(1, 1, 4, 16, 16), c2w, cameras.intrinsics_from_fxfycxcy(
            torch.tensor([[[20.0, 20.0, 8.0, 8.0]]])))
        full = model.render_views(planes, c2w, K, 12, 12)
        part = model.render_views(planes, c2w, K, 12, 12, patch=(2, 3, 5, 4))
        torch.testing.assert_close(part["rgb"], full["rgb"][..., 2:7, 3:7])
        # planar depth: the rendered point o + t d has camera z equal to the reported depth
        o, d = cameras.camera_rays(c2w, K, 12, 12)
        rays = model.render_rays(planes, o.reshape(1, -1, 3), d.reshape(1, -1, 3))
    t = rays["depth"].reshape(12, 12)
    seen = (t > 0).reshape(-1).numpy()  # rays that hit the box (missed ones report depth 0)
    assert seen.sum() > 50
    pts = (o + t[..., None] * d)[0, 0].reshape(-1, 3).numpy()[seen]
    _, z = npcam.project(pts.astype(np.float64), c2w[0, 0].numpy(), K[0, 0].numpy())
    np.testing.assert_allclose(full["depth"][0, 0, 0].reshape(-1).numpy()[seen], z, atol=1e-4)
    assert (full["opacity"] > 0.01).any()


def test_official_frame_is_applied_inside_the_model():
    # A model in the official frame, fed our cameras, must equal the same weights fed cameras that were
    # moved by hand (its depth coming back in our units).
    torch.manual_seed(2)
    cfg = _tiny_cfg(official_frame=True, official_frame_scale=2.0, scene_box=1.0, density_bias=1.0)
    a = GTR(cfg).eval()
    b = GTR(_tiny_cfg(official_frame=False, scene_box=1.0, density_bias=1.0)).eval()
    b.load_state_dict(a.state_dict())
    c2w, K = _views(1, 2, 16)
    imgs = torch.rand(1, 2, 4, 16, 16)
    with torch.no_grad():
        pa = a.triplane(imgs, c2w, K)
        pb = b.triplane(imgs, cameras.to_official_frame(c2w, 2.0), K)
        torch.testing.assert_close(pa, pb)
        o, d = cameras.camera_rays(c2w[:, 0], K[:, 0], 16, 16)
        o, d = o.reshape(1, -1, 3), d.reshape(1, -1, 3)
        ra = a.render_rays(pa, o, d)
        rb = b.render_rays(pb, cameras.points_to_official_frame(o, 2.0), cameras.points_to_official_frame(d, 1.0))
    torch.testing.assert_close(ra["rgb"], rb["rgb"])
    torch.testing.assert_close(ra["depth"] * 2.0, rb["depth"])



def _constant_density(model: GTR, sigma: float) -> None:
    """f_d outputs softplus(b) = sigma everywhere (all weights zero)."""
    with torch.no_grad():
        for layer in model.density_mlp.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        model.density_mlp.layers[-1].bias.fill_(math.log(math.expm1(sigma)))


@pytest.mark.parametrize("official", [False, True])
def test_box_and_ray_segments_in_our_frame(official):
    # With the official frame, scene_box 1 and near_min 0.2 are THEIR units (scale 2): the box is ±0.5 in
    # ours and the near limit 0.1. Closed form: a ray from (0, 0, −3) along +z enters at 2.5, leaves at 3.5.
    cfg = _tiny_cfg(official_frame=official, official_frame_scale=2.0, scene_box=1.0, near_min=0.2,
                    samples_per_ray=8)
    model = GTR(cfg).eval()
    s = 2.0 if official else 1.0
    assert model.units_per_ours == s
    assert model.box_half_size_ours() == 1.0 / s and model.near_min_ours() == pytest.approx(0.2 / s)
    o = torch.tensor([[[0.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.2, -0.1, 0.05], [0.0, 0.9, -3.0]]])
    d = torch.nn.functional.normalize(torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.3, 0.5, -0.8],
                                                     [0.0, 0.0, 1.0]]]), dim=-1)
    near, far, hit = model.ray_box(o, d)
    h = 1.0 / s
    assert near[0, 0, 0].item() == pytest.approx(3.0 - h) and far[0, 0, 0].item() == pytest.approx(3.0 + h)
    assert near[0, 1, 0].item() == pytest.approx(0.2 / s) and far[0, 1, 0].item() == pytest.approx(h)
    assert hit[0, :, 0].tolist() == [True, True, True, not official]  # y = 0.9: inside ±1, outside ±0.5
    # The renderer samples exactly that segment: under a constant density σ (per model unit) the opacity is
    # 1 − exp(−σ·(far − near)·units_per_ours) and the depth the segment's weighted midpoint, in our units.
    sigma = 0.7
    _constant_density(model, sigma)
    model.double()  # float64: a float32 cumulative sum over 4096 bins would err by ~1e-4
    o, d = o.double(), d.double()
    near, far, _ = model.ray_box(o, d)
    planes = torch.zeros(1, 3, cfg.plane_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = model.render_rays(planes, o, d, samples=4096)
    length = (far - near) * model.units_per_ours
    torch.testing.assert_close(out["opacity"], 1 - torch.exp(-sigma * length), atol=1e-9, rtol=1e-9)
    # Expected termination distance of a homogeneous slab of optical depth τ = σ·L: near + L_ours·m(τ),
    # m(τ) = 1/τ − e^−τ/(1 − e^−τ) (the mean of a truncated exponential, as a share of the length).
    # Midpoint sampling of 4096 bins: the discretisation error is O(bin²), far below 1e-6 here.
    tau = sigma * length
    m = 1 / tau - torch.exp(-tau) / (1 - torch.exp(-tau))
    want = torch.where(hit, near + (far - near) * m, torch.zeros_like(near))
    torch.testing.assert_close(out["depth"], want, atol=1e-6, rtol=0)


def test_query_halves_equal_query_and_skip_the_other_decoder():
    torch.manual_seed(3)
    model = GTR(_tiny_cfg(official_frame=True, scene_box=1.0)).eval()
    planes = torch.randn(2, 3, 6, 8, 8)
    pts = torch.rand(2, 50, 3) - 0.5
    calls = {"density_mlp": 0, "color_mlp": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad():
        density, rgb = model.query(planes, pts)
        calls.update(density_mlp=0, color_mlp=0)
        rgb_only = model.query_color(planes, pts)
        assert calls == {"density_mlp": 0, "color_mlp": 1}
        density_only = model.query_density(planes, pts)
        assert calls == {"density_mlp": 1, "color_mlp": 1}
    assert rgb_only.shape == (2, 50, 3) and density_only.shape == (2, 50, 1)
    torch.testing.assert_close(rgb_only, rgb, rtol=0, atol=0)
    torch.testing.assert_close(density_only, density, rtol=0, atol=0)

@pytest.mark.parametrize("hull", [False, True])
def test_flops_match_torch_flop_counter(hull: bool):
    cfg = _tiny_cfg(ffn="geglu", lift_hull=hull, lift_depth=4)
    model = GTR(cfg).eval()
    V, S, rays = 2, 16, 7
    est = flops_per_sample(cfg, V, rays, image_size=S)
    x = torch.rand(1, V, 10, S, S)
    # The math SDPA backend runs attention as matmuls, which the counter sees (the fused CPU kernel it
    # does not count).
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        planes = model.generate(x)
    assert fc.get_total_flops() == est["encoder"] + est["transformer"] + est["upsampler"]
    if hull:  # the lifted hull profile's channels (their values do not change the count)
        planes = torch.cat([planes, torch.rand(1, 3, cfg.lift_depth, *planes.shape[-2:])], dim=2)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.query(planes, torch.rand(1, rays * cfg.samples_per_ray, 3))
    assert fc.get_total_flops() == est["decoders"]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="arch"):
        GTR(_tiny_cfg(arch="lrm"))
    with pytest.raises(ValueError, match="feed-forward"):
        GTR(_tiny_cfg(ffn="swiglu"))


def architecture_parameters(cfg: ModelConfig) -> int:
    """Parameters of the GTR architecture counted from its description (paper §3.1, docs/model.md), not
    from the modules: a stride-p convolution encoder (+ optional token LayerNorm), 3·R² learned triplane
    tokens, `depth` pre-norm blocks (two LayerNorms, q/k/v/out projections, a GELU or GEGLU feed-forward)
    and a final LayerNorm, a 1x1 convolution to C·f² channels before PixelShuffle, and the f_d / f_c MLPs
    on the 3·C sampled features."""
    W, p = cfg.width, cfg.patch_size
    inner, hidden, norm = cfg.heads * cfg.head_dim, cfg.ffn_mult * cfg.width, 2 * cfg.width  # LayerNorm: γ, β
    encoder = cfg.in_channels * W * p * p + (W if cfg.encoder_bias else 0) + (norm if cfg.img_token_norm else 0)
    tokens = 3 * W * cfg.plane_res ** 2
    attention = 3 * (W * inner + (inner if cfg.attn_bias else 0)) + inner * W + W  # output projection has a bias
    ffn_in = 2 * hidden if cfg.ffn == "geglu" else hidden  # GEGLU: value and gate
    block = norm + attention + norm + (W * ffn_in + ffn_in) + (hidden * W + W)
    up = cfg.plane_channels * cfg.upsample ** 2
    feat, h = 3 * cfg.plane_channels, cfg.mlp_hidden

    def mlp(out: int, layers: int, extra: int = 0) -> int:
        dims = [feat + extra] + [h] * (layers - 1) + [out]
        return sum(a * b + b for a, b in zip(dims, dims[1:]))

    lift = (FEATURES + cfg.lift_depth + 1) * cfg.plane_channels if cfg.lift else 0  # 1×1 conv with bias
    return (encoder + tokens + cfg.depth * block + norm + (W * up + up)
            + mlp(1, cfg.density_layers, 3 if cfg.lift and cfg.lift_hull else 0) + mlp(3, cfg.color_layers) + lift)


@pytest.mark.parametrize("preset", ["configs/paper.yaml", "configs/official.yaml", None])
def test_parameter_count_is_the_architectures(preset):
    """The built model has exactly the parameters its description implies, for the paper, official and
    demo presets (built on the meta device: no memory, no time)."""
    cfg = load_config(preset).model
    with torch.device("meta"):
        assert parameter_count(GTR(cfg)) == architecture_parameters(cfg)


def test_official_preset_has_the_released_parameter_count():
    cfg = load_config("configs/official.yaml").model
    with torch.device("meta"):
        n = parameter_count(GTR(cfg))
    assert n == 411_403_556  # the header of official_full_keys.txt (the aabb buffer is not a parameter)


@pytest.mark.slow
def test_paper_config_builds_and_runs_forward_on_cpu():
    # configs/paper.yaml: 412,306,436 parameters (the released model's 411.4 M with f_d / f_c at hidden 512). Forward at 64² input (4 views x 16 tokens + 3072 triplane
    # tokens through 24 blocks of width 1024): about 1.9 TFLOP, ~1.5 min on 2 shared cores.
    cfg = load_config("configs/paper.yaml").model
    torch.manual_seed(0)
    model = GTR(cfg).eval()
    assert parameter_count(model) == architecture_parameters(cfg) == 412_306_436  # the figure docs/model.md quotes
    c2w, K = _views(1, 4, 64)
    with torch.no_grad():
        planes = model.triplane(torch.rand(1, 4, 4, 64, 64), c2w, K)
        assert planes.shape == (1, 3, 40, 256, 256)
        out = model.render_views(planes, c2w[:, :1], K[:, :1], 64, 64, patch=(24, 24, 8, 8))
    assert out["rgb"].shape == (1, 1, 3, 8, 8)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert math.isfinite(float(planes.std())) and float(planes.std()) > 0
