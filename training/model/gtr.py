"""GTR: posed images → triplane → density and colour anywhere in the scene box, and volume renders of it.

    planes = model.triplane(images, c2w, K)      # images [B,V,4,H,W] RGB+mask, OpenCV c2w/K -> [B,3,C,R',R']
    density, rgb = model.query(planes, points)   # points [B,N,3] (our normalised frame) -> [B,N,1], [B,N,3]
    density = model.query_density(planes, points) # -> [B,N,1] without f_c;  rgb = model.query_color(...) without f_d
    half = model.box_half_size_ours()             # the cube the triplane covers, half side in OUR frame
    near, far, hit = model.ray_box(o, d)          # the renderer's ray segments, our frame and units
    out = model.render_rays(planes, o, d)         # rays [B,N,3] -> rgb [B,N,3], depth [B,N,1], opacity [B,N,1]
    out = model.render_views(planes, c2w, K, h, w) # -> rgb [B,V,3,h,w], depth/opacity [B,V,1,h,w]

The API always speaks the contract's frame and cameras. With `cfg.official_frame` (the released weights), the fixed
similarity of `training.cameras` is applied inside `_to_model_frame`, the single place cameras, points and
rays enter the model's own frame; depths come back in our units. `cfg.scene_box` and `cfg.near_min` are in
the model's units, so code outside the model never reads them: it asks `box_half_size_ours`, `near_min_ours`,
`ray_box` and `units_per_ours` (docs/model.md, "Frames"). The model is written for one device;
checkpointing of `model.blocks`, compile, autocast and DDP are the trainer's business.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from core.config import ModelConfig
from training import cameras
from training.model.decoders import ColorMLP, DensityMLP
from training.model.encoder import ImageEncoder, image_tokens
from training.model.lift import ViewLift, hull_at
from training.model.renderer import ray_box as _ray_box
from training.model.renderer import render_rays as _render_rays
from training.model.transformer import TriplaneTransformer
from training.model.triplane import sample_triplane
from training.model.upsampler import TriplaneUpsampler

ARCHS = ("gtr", "official")


def reads_hull(cfg: ModelConfig) -> bool:
    """Whether f_d also reads the 3 planes' estimates of the input views' visual hull at the point. Like
    lift_depth, lift_hull only means something with lift on (the hull comes from the lifted views), so
    `model.lift=false` alone turns both off."""
    return bool(cfg.lift and cfg.lift_hull)


class GTR(nn.Module):
    """The large reconstruction model of the paper (or, with configs/official.yaml, of the released code)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown model.arch {cfg.arch!r} (one of {', '.join(ARCHS)})")
        if cfg.input_order not in cameras.INPUT_ORDERS:
            raise ValueError(f"unknown model.input_order {cfg.input_order!r}")
        if cfg.in_channels != 10:
            raise ValueError(f"model.in_channels must be 10 (RGB, mask, Plücker), got {cfg.in_channels}")
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg.in_channels, cfg.width, cfg.patch_size, cfg.encoder_bias,
                                    cfg.img_token_norm)
        self.transformer = TriplaneTransformer(cfg.width, cfg.depth, cfg.heads, cfg.head_dim, cfg.plane_res,
                                               cfg.ffn, cfg.ffn_mult, cfg.attn_bias)
        self.upsampler = TriplaneUpsampler(cfg.width, cfg.plane_channels, cfg.upsample)
        feat = 3 * cfg.plane_channels
        self.hull = reads_hull(cfg)
        self.density_mlp = DensityMLP(feat + 3 * self.hull, cfg.mlp_hidden, cfg.density_layers, cfg.density_bias,
                                      cfg.mlp_init)
        self.color_mlp = ColorMLP(feat, cfg.mlp_hidden, cfg.color_layers, cfg.color_stretch, cfg.mlp_init)
        # Demo option (not in the paper or the released model): no parameters, no state-dict keys, when off.
        self.lift = (ViewLift(cfg.plane_channels, cfg.plane_res * cfg.upsample, cfg.scene_box, cfg.lift_depth)
                     if cfg.lift else None)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, for activation checkpointing / compile applied from outside."""
        return self.transformer.blocks

    # -- frames ---------------------------------------------------------------------------------------------

    def _to_model_frame(self, c2w: Tensor | None = None, points: Tensor | None = None,
                        dirs: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Our frame → the model's own (identity unless cfg.official_frame). The only place this happens."""
        if not self.cfg.official_frame:
            return c2w, points, dirs
        s = self.cfg.official_frame_scale
        return (None if c2w is None else cameras.to_official_frame(c2w, s),
                None if points is None else cameras.points_to_official_frame(points, s),
                None if dirs is None else cameras.points_to_official_frame(dirs, 1.0))

    @property
    def units_per_ours(self) -> float:
        """Model-frame length per unit length of our frame: `official_frame_scale`, or 1.

        Densities are per model unit, so the opacity of a segment of length L (our units) is
        1 − exp(−σ · L · units_per_ours); the renderer does exactly that, in the model's frame.
        """
        return float(self.cfg.official_frame_scale) if self.cfg.official_frame else 1.0

    def box_half_size_ours(self) -> float:
        """Half side of the cube the triplane covers, in our normalised frame: the box is [-h, h]^3.

        The frame change is an axis permutation with signs times a scale, so the model's centred,
        axis-aligned cube stays one in our frame, with its half side divided by the scale.
        """
        return float(self.cfg.scene_box) / self.units_per_ours

    def near_min_ours(self) -> float:
        """The lowest near distance of a rendered ray (cfg.near_min is in the model's units), in ours."""
        return float(self.cfg.near_min) / self.units_per_ours

    def ray_box(self, rays_o: Tensor, rays_d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The segment `render_rays` samples, for rays [..., 3] in our frame (unit d): near, far [..., 1] in
        our units and hit [..., 1] (bool); missed rays have near = far."""
        return _ray_box(rays_o, rays_d, self.box_half_size_ours(), self.near_min_ours())

    # -- triplane -------------------------------------------------------------------------------------------

    def generate(self, x: Tensor) -> Tensor:
        """Built input [B, V, 10, H, W] (model frame) → planes [B, 3, C, R·f, R·f]."""
        return self.upsampler(self.transformer(self.encoder(x)))

    def triplane(self, images: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
        """images [B,V,4,H,W] (RGB on the background, then mask), c2w [B,V,4,4], K [B,V,3,3] → planes."""
        if images.ndim != 5 or images.shape[2] != 4:
            raise ValueError(f"images must be [B,V,4,H,W] (RGB + mask), got {tuple(images.shape)}")
        c2w_m, _, _ = self._to_model_frame(c2w=c2w)
        x = cameras.build_input(images[:, :, :3], images[:, :, 3:], c2w_m, K, self.cfg.input_order)
        planes = self.generate(x)
        if self.lift is not None:
            lifted, profile = self.lift(images[:, :, :3], images[:, :, 3:], c2w_m, K, self.cfg.background)
            planes = planes + lifted
            if self.hull:  # the profile rides along as extra channels: every consumer still passes planes only
                planes = torch.cat([planes, profile.to(planes.dtype)], dim=2)
        return planes

    # -- field ----------------------------------------------------------------------------------------------

    def _decode(self, planes: Tensor, points: Tensor, density: bool = True, color: bool = True
                ) -> tuple[Tensor | None, Tensor | None]:
        """Points [B,N,3] in the model's frame → (density, rgb), each None when not asked for."""
        channels = self.cfg.plane_channels + self.cfg.lift_depth * self.hull
        if planes.shape[2] != channels:  # planes made elsewhere (tests, tools) must carry what f_d reads
            raise ValueError(f"planes have {planes.shape[2]} channels per plane, this model reads {channels}"
                             + (" (plane_channels + the lift_depth hull profile)" if self.hull else ""))
        feats = sample_triplane(planes, points, self.cfg.scene_box)  # [B, N, 3·channels]
        hull = None
        if self.hull:  # one grid_sample for both: per plane, C generated channels then the hull profile
            B, N, C = feats.shape[0], feats.shape[1], self.cfg.plane_channels
            per_plane = feats.reshape(B, N, 3, planes.shape[2])  # explicit: N may be 0
            feats, hull = per_plane[..., :C].reshape(B, N, 3 * C), per_plane[..., C:]
        sigma = rgb = None
        if density:
            x = feats if hull is None else torch.cat([feats, hull_at(hull, points, self.cfg.scene_box)], -1)
            sigma = self.density_mlp(x)
        if color:
            rgb = self.color_mlp(feats)
        return sigma, rgb

    def _query_model_frame(self, planes: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        return self._decode(planes, points)  # type: ignore[return-value]

    def _model_points(self, points: Tensor) -> Tensor:
        _, p, _ = self._to_model_frame(points=points)
        return p

    def query(self, planes: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """planes [B,3,C,R,R], points [B,N,3] in our frame → density [B,N,1] (after softplus, per model unit
        of length, see `units_per_ours`), rgb [B,N,3]. The definition of the field; the two below are its halves."""
        return self._decode(planes, self._model_points(points))  # type: ignore[return-value]

    def query_density(self, planes: Tensor, points: Tensor) -> Tensor:
        """density [B,N,1] at points [B,N,3] (our frame), = query(...)[0] without evaluating f_c."""
        return self._decode(planes, self._model_points(points), color=False)[0]  # type: ignore[return-value]

    def query_color(self, planes: Tensor, points: Tensor) -> Tensor:
        """rgb [B,N,3] at points [B,N,3] (our frame), = query(...)[1] without evaluating f_d."""
        return self._decode(planes, self._model_points(points), density=False)[1]  # type: ignore[return-value]

    # -- rendering ------------------------------------------------------------------------------------------

    def render_rays(self, planes: Tensor, rays_o: Tensor, rays_d: Tensor, *, samples: int | None = None,
                    stratified: bool | None = None, background: float | Tensor | None = None,
                    chunk: int | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Rays [B,N,3] (our frame, unit directions) → rgb [B,N,3], depth [B,N,1] (distance along the ray,
        our units; 0 where nothing is hit), opacity [B,N,1]. Stratified jitter defaults to `self.training`."""
        _, o, d = self._to_model_frame(points=rays_o, dirs=rays_d)
        out = _render_rays(lambda p: self._query_model_frame(planes, p), o, d, box=self.cfg.scene_box,
                           samples=samples or self.cfg.samples_per_ray, near_min=self.cfg.near_min,
                           background=self.cfg.background if background is None else background,
                           stratified=self.training if stratified is None else stratified,
                           chunk=chunk or self.cfg.render_chunk, generator=generator)
        if self.cfg.official_frame:
            out["depth"] = out["depth"] / self.cfg.official_frame_scale
        return out

    def render_views(self, planes: Tensor, c2w: Tensor, K: Tensor, height: int, width: int,
                     patch: cameras.Patch | None = None, *, chunk: int | None = None, **kw: Any
                     ) -> dict[str, Tensor]:
        """Render V cameras per asset: c2w [B,V,4,4], K [B,V,3,3] for a (height, width) image.

        patch = (top, left, h, w) renders only that window (the same one for every view; for per-view
        windows pass K already shifted to each window, as the loader does, with height, width = the window).
        Returns rgb [B,V,3,h,w], depth [B,V,1,h,w] as planar z in our units (the contract's depth convention),
        opacity [B,V,1,h,w]. Other keywords go to `render_rays`.
        """
        B, V = c2w.shape[:2]
        o, d = cameras.camera_rays(c2w, K, height, width, patch)  # [B,V,h,w,3]
        h, w = o.shape[2:4]
        out = self.render_rays(planes, o.reshape(B, -1, 3), d.reshape(B, -1, 3), chunk=chunk, **kw)
        # distance along the unit ray -> planar z: z = t · (d · camera forward axis)
        cos = (d * c2w[:, :, None, None, :3, 2]).sum(-1, keepdim=True).reshape(B, -1, 1)
        out["depth"] = out["depth"] * cos

        def image(t: Tensor) -> Tensor:  # [B, V·h·w, c] -> [B, V, c, h, w]
            return t.reshape(B, V, h, w, -1).permute(0, 1, 4, 2, 3)

        return {k: image(v) for k, v in out.items()}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(cfg: ModelConfig, input_views: int, rays: int, image_size: int = 512,
                     samples: int | None = None) -> dict[str, float]:
    """Model FLOPs (2 per multiply-add, matmuls and convolutions only) for one asset.

    One asset = `input_views` images of `image_size`² through encoder, transformer and upsampler, plus `rays`
    rendered rays of `samples` (default cfg.samples_per_ray) points through f_d and f_c. Triplane sampling
    and compositing are elementwise and left out (a few % at most). "train" counts the backward pass as
    twice the forward (the usual 3× rule); activation checkpointing adds one more transformer forward.
    """
    W, inner = cfg.width, cfg.heads * cfg.head_dim
    n_img = input_views * image_tokens(image_size, image_size, cfg.patch_size)
    n_tri = 3 * cfg.plane_res ** 2
    n = n_img + n_tri
    hidden = cfg.ffn_mult * W
    enc = n_img * cfg.in_channels * cfg.patch_size ** 2 * W
    ffn = n * W * hidden * (3 if cfg.ffn == "geglu" else 2)
    block = n * W * 3 * inner + 2 * n * n * inner + n * inner * W + ffn
    tfm = cfg.depth * block
    up = n_tri * W * cfg.plane_channels * cfg.upsample ** 2
    feat, hid = 3 * cfg.plane_channels, cfg.mlp_hidden

    def mlp(layers: int, out: int, extra: int = 0) -> int:
        dims = [feat + extra] + [hid] * (layers - 1) + [out]
        return sum(a * b for a, b in zip(dims[:-1], dims[1:]))

    points = rays * (samples or cfg.samples_per_ray)
    hull = 3 * reads_hull(cfg)  # f_d's hull inputs
    dec = points * (mlp(cfg.density_layers, 1, hull) + mlp(cfg.color_layers, 3))
    fwd = 2.0 * (enc + tfm + up + dec)
    return {"encoder": 2.0 * enc, "transformer": 2.0 * tfm, "upsampler": 2.0 * up, "decoders": 2.0 * dec,
            "forward": fwd, "train": 3.0 * fwd, "train_checkpointed": 3.0 * fwd + 2.0 * tfm}
