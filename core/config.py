"""Typed run configuration: dataclasses with a comment per field, YAML presets and `key=value` overrides.

The defaults are the small CPU demo (`configs/demo.yaml` restates them); `configs/paper.yaml` holds the
paper's values and `configs/official.yaml` the structure of the authors' released model. A preset may name
another as `_base_: other.yaml` and then overrides only what differs. Overrides are `section.key=value`
with the value parsed as YAML and checked against the field's type. An unknown key is an error that names
it. Nothing is ever `exec`'d.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ----------------------------------------------------------------------------------------------------------
# Sections. Each stage owns one; add fields to your own section only, each with a comment.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    max_assets: int = 8  # deterministic sample of kept assets (0 = keep all)
    objaverse_cache: str = ""  # root that holds objaverse's `hf-objaverse-v1/` cache ("" = the package default, ~/.objaverse)
    licenses: list[str] = field(
        default_factory=lambda: ["by", "by-sa", "cc0", "by-nc", "by-nc-sa", "by-nd", "by-nc-nd"]
    )  # license allow-list (objaverse short names: by, by-sa, by-nd, by-nc, by-nc-sa, by-nc-nd, cc0)
    min_faces: int = 100  # face-count floor
    max_faces: int = 500_000  # face-count ceiling
    allow_animation: bool = False  # keep animated assets
    min_textures: int = 1  # keep only assets whose archive holds at least this many textures
    max_archive_bytes: int = 100 * 2**20  # drop assets whose archive (glb) is larger
    allow_age_restricted: bool = False  # keep assets flagged age-restricted
    deny_categories: list[str] = field(default_factory=list)  # Sketchfab category names to drop
    deny_tags: list[str] = field(default_factory=lambda: ["scan", "photogrammetry-scene", "terrain"])  # tags to drop
    deny_names: list[str] = field(default_factory=list)  # substrings of the name to drop (case-insensitive)
    lvis_categories: list[str] = field(default_factory=list)  # keep only uids in these LVIS categories ([] = no LVIS filter)
    uid_allowlist: str = ""  # path to a file with one uid per line; only these pass ("" = no allow-list)
    uid_denylist: str = ""  # path to a file with one uid per line to drop
    download_batch: int = 16  # uids per Ray download task (data.executor=ray; the others take one uid at a time)
    download_retries: int = 3  # attempts per file
    download_timeout_s: float = 120.0  # per-file timeout
    download_processes: int = 1  # processes objaverse.load_objects may use inside one task
    procedural_count: int = 24  # number of procedural assets (SOURCE=procedural; data.max_assets does not sample them)
    procedural_start: int = 0  # index of the first procedural asset (eval's held-out set starts after the training ones)
    procedural_texture_size: int = 512  # texture (atlas) side of procedural assets
    procedural_preset: str = "world"  # world (Zeroverse-class generator) | basic (8 shapes x 4 textures, fast tests)
    procedural_seed: int = 0  # world: which world; asset i is a function of (seed, difficulty, i), all three in its uid
    procedural_difficulty: float = 0.5  # world: 0 = one primitive, easy textures .. 1 = up to 9 parts, every augmentation
    # often (docs/data.md "Procedural world"); 0.5: every kind still appears (0.2 = 1-2 parts: docs/training.md "Rung 2")
    procedural_sheet_assets: int = 16  # make data (procedural): random assets rendered onto OUT/procedural/sheet.png (0 = none)
    executor: str = "ray"  # ray (Ray tasks; local Ray, or RAY_ADDRESS) | process (worker processes) | local (this process, no timeout)
    workers: int = 2  # downloads in flight at once (Ray tasks / worker processes; local: 1)
    objaverse_mirror: str = ""  # base URL standing in for huggingface.co/.../objaverse/resolve/main ("" = Hugging Face)
    local_license: str = "unknown"  # license recorded for local:<dir> assets (the folder carries none)
    local_attribution: str = ""  # attribution for local:<dir> assets ("" = the file's relative path)
    max_file_bytes: int = 512 * 2**20  # largest asset file (the main mesh file) accepted, from any source: a larger
    # one fails its download (objaverse: also data.max_archive_bytes) and the render stage refuses to open one (a
    # download table may name files from elsewhere); bounds the copying, verifying and Blender work per asset
    check_size: bool = True  # objaverse: a glb whose size differs from the annotation's archive size fails
    max_annotation_bytes: int = 256 * 2**20  # objaverse: an annotation .json.gz decompressing to more is refused


@dataclass
class RenderConfig:
    resolution: int = 128  # square image side in pixels (paper: 512)
    views: int = 32  # random training views per asset (the paper's 32, at 512²)
    fov_deg: float = 40.0  # vertical = horizontal field of view
    distance_min: float = 2.4  # camera distance range (normalised units)
    distance_max: float = 2.8  # upper end of the camera distance range
    elevation_min_deg: float = -30.0  # elevation range, drawn area-uniformly
    elevation_max_deg: float = 70.0  # upper end of the elevation range
    samples: int = 64  # Cycles samples per pixel (bench.render: 64 adaptive, no denoiser >= 45 dB, ~3x faster than 128+denoise)
    adaptive_threshold: float = 0.01  # Cycles adaptive sampling noise threshold (0 = off)
    denoise: bool = False  # OpenImageDenoise on the combined pass
    max_bounces: int = 4  # Cycles total bounces
    device: str = "auto"  # auto | cpu | gpu (CUDA/OptiX when present)
    threads: int = 0  # Blender threads per renderer (0 = cores / renderers)
    workers: int = 2  # renderers at once (worker processes / Ray actors), each holding one bpy for many assets
    timeout_s: float = 600.0  # per-asset limit (process, ray): the renderer is killed and replaced after it or a crash
    depth_scale: float = 10000.0  # depth PNG value = z * depth_scale (16-bit)
    light_strength: float = 1.0  # scale of the deterministic per-asset lighting
    world_strength: float = 0.5  # uniform white environment strength
    max_faces: int = 2_000_000  # assets with more faces fail (bounded work)
    max_texture_pixels: int = 8192 * 8192  # textures larger than this fail the asset (size read from the file header)
    max_asset_texture_pixels: int = 4 * 8192 * 8192  # all textures of one asset together (0 = no bound); above: fail
    max_memory_bytes: int = 16 * 2**30  # memory one renderer may add after bpy's start (RLIMIT_AS; 0 = no cap)
    eval_protocol: str = "instantmesh"  # ground-truth views of eval sets: instantmesh (the paper's: eval_orbit_views on
    # InstantMesh's orbit) | lrm64 (GS-LRM / MeshLRM / LRM-Zero: 16 azimuths x elevations 0/20/40/60 at eval_grid_distance)
    eval_grid_distance: float = 2.7  # camera distance of the lrm64 protocol (normalised units, like eval_distance)
    eval_orbit_views: int = 20  # evaluation orbit (paper protocol)
    eval_distance: float = 2.6  # evaluation orbit/input distance
    eval_input_elevation_deg: float = 20.0  # elevation of the 4 evaluation input views
    min_foreground: float = 0.005  # quality: flag views whose mean foreground fraction is below this
    max_border_fraction: float = 0.02  # quality: flag if this fraction of border pixels is foreground
    dark_threshold: float = 0.02  # quality: flag if mean foreground luminance is below this
    bright_threshold: float = 0.98  # quality: flag if mean foreground luminance is above this
    sheet_assets: int = 16  # assets on the contact sheet
    executor: str = "ray"  # ray (Ray actors) | process (worker processes) | local (this process, no timeout)
    sheet_views: int = 6  # views per asset on the contact sheet


@dataclass
class ShardConfig:
    max_count: int = 1000  # samples per shard at most
    max_bytes: int = 1 << 30  # bytes per shard at most (paper ~1 GB)
    val_fraction: float = 0.05  # share of uids in val, by a hash of the uid
    val_uids: str = ""  # path to a file of uids forced into val (the evaluation set)
    mtime: float = 1_700_000_000.0  # fixed tar member mtime for byte-identical shards
    writers: int = 1  # shards written at once (process, ray); above 1 needs shards.executor=process or ray
    executor: str = "local"  # local (this process, one shard after another) | process (worker processes) | ray (tasks)
    geometry: bool = False  # also pack geometry.npz (training never reads it; eval uses the render folders)


@dataclass
class LoaderConfig:
    input_views: int = 4  # views fed to the model
    input_size: int = 128  # input image side after resizing (paper 512)
    background: str = "white"  # white | black | random: compositing colour for RGBA
    shuffle_buffer: int = 64  # sample shuffle buffer: samples held at most
    shuffle_buffer_bytes: int = 512 * 2**20  # ... and bytes of raw sample fields held at most (0 = no byte bound)
    read_timeout_s: float = 60.0  # http(s) shards: longest wait for the next bytes before the shard counts as failed
    shard_failure_budget: int = 5  # failures of one shard before it is skipped for the rest of the pass (0 = never)
    allow_pipe: bool = False  # accept `pipe:<command>` shard URLs (the command runs through /bin/sh)
    workers: int = 0  # DataLoader workers
    resampled: bool = True  # resampled shards (infinite stream) for training
    epoch_samples: int = 0  # with_epoch length per worker (0 = number of samples)
    seed: int = 0  # shard order / view choice seed
    max_side: int = 4096  # stored views must be square with side <= this; larger samples are skipped (memory bound)
    max_consecutive_failures: int = 100  # resampled stream: this many failures before any sample decoded raise (0 = never)


@dataclass
class ModelConfig:
    arch: str = "gtr"  # gtr (paper) | official (authors' released structure)
    in_channels: int = 10  # RGB + mask + Plücker (6)
    input_order: str = "rgb_mask_plucker"  # rgb_mask_plucker | rgb_dir_moment_mask (official; moment = d x o)
    patch_size: int = 16  # encoder stride: image side / patch_size = image tokens per side
    encoder_bias: bool = True  # bias on the stride-16 convolution (official: False)
    img_token_norm: bool = True  # LayerNorm on image tokens (official: on; paper.yaml: off); demo on: tokens grew ~70x without
    lift: bool = True  # input views lifted onto the planes (training.model.lift); paper/official: off (not in them)
    lift_depth: int = 16  # lift: points per plane texel along its normal axis
    lift_hull: bool = True  # with lift: planes carry the hull profile too, f_d reads the hull at the point
    width: int = 128  # transformer width (paper 1024)
    depth: int = 2  # transformer blocks (paper 24)
    heads: int = 4  # attention heads (paper 16)
    head_dim: int = 32  # per-head width (paper 64)
    ffn: str = "gelu"  # gelu | geglu feed-forward (official: geglu)
    ffn_mult: int = 4  # feed-forward hidden = ffn_mult * width
    attn_bias: bool = False  # bias on q/k/v projections
    plane_res: int = 8  # triplane tokens per side (paper 32); demo 8 (x8 below -> the same 64² planes, 4x fewer tokens)
    plane_channels: int = 16  # channels per plane after upsampling (official 40)
    upsample: int = 8  # PixelShuffle factor (paper: 256 / 32 = 8)
    mlp_hidden: int = 32  # f_d / f_c hidden width (paper 512, official 32)
    mlp_init: str = "kaiming"  # f_d / f_c initialisation: kaiming (demo: He-normal hidden layers, zero biases, the
    # default output layer) | xavier (paper/official: xavier-uniform on every layer, zero biases, as released)
    density_layers: int = 3  # f_d linear layers
    color_layers: int = 4  # f_c linear layers
    density_bias: float = -2.0  # before softplus (paper/released 0); -2: the field starts nearly empty (σ≈0.13), not fog
    scene_box: float = 0.55  # half side of the cube the triplane covers (normalised frame)
    samples_per_ray: int = 24  # uniform samples per ray (paper 256); demo: ~0.05 apart, jittered in training
    near_min: float = 0.2  # lowest near distance along a ray
    background: float = 1.0  # volume-rendering background (white)
    color_stretch: float = 0.001  # f_c output = sigmoid * (1 + 2e) - e (released model: 0.001)
    render_chunk: int = 8192  # rays volume-rendered at once per batch element (bounds memory)
    official_frame: bool = False  # cameras/points go through the fixed Z-up -> Y-up similarity (released weights)
    official_frame_scale: float = 2.0  # scale of that similarity: our [-0.5, 0.5]^3 data -> their [-1, 1]^3


@dataclass
class OptimConfig:
    """The optimisation and bookkeeping knobs both training stages share; `training.loop.train` takes one.

    NerfConfig and MeshConfig inherit these fields, so the YAML keys stay `nerf.lr`, `mesh.steps`, ...; a
    stage restates only the defaults it changes."""

    steps: int = 100  # optimisation steps (the LR schedule ends at 0 here)
    batch_size: int = 1  # GLOBAL assets per optimisation step, over all ranks (the paper's 512 / 192 on 32 GPUs)
    micro_batch: int = 0  # assets per rank per forward (0 = batch_size / world size: no accumulation); the
    # rest is gradient accumulation: batch_size = world size x micro_batch x accumulation steps, an error if not
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW weight decay (matrices and kernels only; biases and norms are not shrunk)
    warmup_steps: int = 0  # linear warm-up steps, then cosine to 0
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model's repeated blocks
    activation_checkpointing: bool = False  # recompute the transformer blocks' activations in backward
    ckpt_every: int = 100  # checkpoint period in steps
    keep_last: int = 2  # checkpoints kept
    log_every: int = 10  # scalar logging period in steps
    image_every: int = 100  # validation and TensorBoard image period in steps
    wandb_project: str = ""  # also log to this W&B project when wandb is installed ("" = TensorBoard only)


@dataclass
class NerfConfig(OptimConfig):
    steps: int = 1000  # (OptimConfig) paper 150k; demo: ~5 min on 2 free CPU cores (docs/training.md)
    lr: float = 5e-3  # (OptimConfig) paper 1e-4
    warmup_steps: int = 20  # (OptimConfig)
    ckpt_every: int = 200  # (OptimConfig) also one loader epoch (training.train_nerf)
    image_every: int = 200  # (OptimConfig)
    batch_size: int = 4  # (OptimConfig) global assets per step (paper 512); demo 4 x 1 view: more assets per step told
    # them apart sooner than 2 x 2 views at the same rendering cost
    sup_views: int = 1  # supervision views per asset (paper 4)
    render_size: int = 32  # supervision image side (paper 512)
    patch_size: int = 0  # random patch side rendered per supervision view (paper 128; 0 = the whole view). Demo:
    # whole 32² views, so every step sees whole silhouettes (a 32² window of a 64² view is often background)
    rays: int = 0  # random supervision rays per asset over its sup_views views when patch_size is 0 (0 = whole views or
    # windows, as the paper); opt-in, LPIPS off then; the demo keeps whole 32² views (measured: docs/training.md "Rung 2")
    lpips_weight: float = 0.2  # λ_p (paper 0.5); demo 0.2: on 32² views AlexNet's deepest maps are 1x1, MSE and mask lead
    lpips_net: str = "alex"  # vgg | alex (paper vgg); demo alex: the demo step with VGG takes 1.5x as long (bench.nerf)
    mask_weight: float = 1.0  # optional mask (opacity) MSE (paper 0); demo 1: silhouettes, and opacity -> 1 inside, drive
    # the density above the mesh level (10) that stage 2 needs
    shards: str = ""  # shard URL pattern ("" = OUT/shards/train-*.tar)
    val_shards: str = ""  # fixed validation batch source ("" = OUT/shards/val-*.tar, else the train shards)
    val_assets: int = 2  # assets in the fixed validation batch (PSNR, TensorBoard images)


@dataclass
class MeshConfig(OptimConfig):
    steps: int = 300  # (OptimConfig) paper 50k; demo 300: ~95 s on 2 CPU cores (docs/training.md, "The demo")
    lr: float = 2e-4  # (OptimConfig) paper 5e-5; demo 2e-4: 100 steps of batch 1 barely move at the paper's
    ckpt_every: int = 50  # (OptimConfig)
    image_every: int = 50  # (OptimConfig)
    batch_size: int = 1  # (OptimConfig) global assets per step (paper 192)
    sup_views: int = 4  # supervision views per asset (paper 8); demo 4: half the CPU rasterization per step
    render_size: int = 64  # rasterization / supervision side (paper 512)
    grid: int = 64  # marching-cubes grid G (paper 256)
    sdf_level: float = 10.0  # sdf = -(density - sdf_level); the level when level_mode = fixed (paper: 10)
    level_mode: str = "inputs"  # fixed (sdf_level) | agree: per asset, the level whose mesh covers and sits where the
    # field's volume render does on the input views | inputs: ... covers the input views' masks (training.mesh_level)
    rgb_weight: float = 1.0  # weight of the rendered-colour MSE
    lpips_weight: float = 0.5  # λ_p, weight of LPIPS on the rendered colour
    depth_weight: float = 0.5  # weight of the squared depth error on ground-truth foreground pixels
    depth_units: float = 1.0  # depths (ours and ground truth) are multiplied by this before the depth loss: 2 in
    # paper/official = lengths in the released frame (its [-1, 1] box is twice our [-0.5, 0.5] data), where the
    # weights 0.5 (paper) / 0.2 (released) were set; demo 1 (our units)
    depth_mean_over: str = "foreground"  # pixels (paper/official: the released mean over all pixels of
    # [gt > 0]·err²) | foreground (demo: divided by the foreground count, ~4x stronger on its small silhouettes)
    mask_weight: float = 1.0  # weight of the silhouette (coverage) MSE
    reg_weight: float = 0.5  # ray-opacity regulariser
    lpips_net: str = "alex"  # vgg (paper) | alex (demo: the cheaper trunk, as in stage 1; not timed separately here)
    lpips_size: int = 0  # LPIPS on both images bilinearly resized to this² (paper/official 256, as released); 0 = as rendered
    hard_color: bool = False  # colour under the hard mask, background elsewhere (paper/official, as released: the mask
    # alone carries silhouette gradients); demo false: the colour is antialiased with the mask
    backend: str = ""  # "" (mc_backend / raster_backend below) | torch: the permissive path, our marching-cubes and
    # rasterizer twins for stage 2, refinement, reconstruction and export (no non-commercial op; README
    # "Licences") | cuda: diso + nvdiffrast
    mc_backend: str = "auto"  # auto | torch | diso
    extract: str = "coarse_to_fine"  # dense (f_d at all grid³ samples) | coarse_to_fine (f_d only in coarse cells
    # the surface passes through: the dense mesh for every component it finds; training.sdf_grid says what it can
    # miss, blobs thinner than √3·coarse_stride cells away from other surfaces; docs/mesh.md)
    coarse_stride: int = 4  # coarse_to_fine: coarse cell side in grid cells
    coarse_dilate: int = 1  # coarse_to_fine: coarse cells evaluated around each coarse sign change
    raster_backend: str = "auto"  # auto | torch | nvdiffrast
    init: str = ""  # stage-1 checkpoint path ("" = newest under OUT/runs/nerf)
    shards: str = ""  # shard URL pattern ("" = OUT/shards/train-*.tar)
    val_shards: str = ""  # fixed validation batch source ("" = OUT/shards/val-*.tar, else the train shards)
    val_assets: int = 1  # assets in the fixed validation batch (TensorBoard renders, normals, masks, depth)
    reg_rays: int = 4096  # rays per asset for the ray-opacity regulariser, one random point each (0 = every
    # supervision ray, as released); the loss is a mean over rays, so a subsample estimates the same value
    query_chunk: int = 262144  # points per f_d / f_c call when extracting and colouring the mesh
    antialias: bool = True  # antialias the rasterized colour and mask (gives the mask gradients to vertices)


@dataclass
class RefineConfig:
    recipe: str = "released"  # released (the released refine_texture step for step: 50 steps, L1, AdamW, f_c
    # schedule, 2x render; the default: +0.7 dB held-out PSNR over paper, bench.refine_recipes) | paper (20 steps,
    # L2, Adam, constant lrs: what the paper states, 4x faster); docs/reconstruct.md "Refinement recipes"
    steps: int = 0  # refinement steps (0 = the recipe's: paper 20, released 50)
    lr_triplane: float = 0.15  # triplane learning rate (paper and released)
    lr_color: float = 1e-4  # f_c learning rate (paper and released; the released recipe schedules it)
    loss: str = ""  # l2 | l1 ("" = the recipe's: paper l2, released l1)
    tune: str = "both"  # both | color | triplane (Table 3 ablation)
    render_size: int = 128  # the loss resolution (paper/official 512, the inputs'); released renders at twice it
    texture_size: int = 512  # baked UV texture side (e.g. 1024)
    vertex_colors: bool = False  # also/instead export vertex colours
    export_faces: int = 20_000  # GLBs: faces after quadric decimation, before UV unwrapping (0 = all: minutes in xatlas)


@dataclass
class EvalConfig:
    max_assets: int = 4  # evaluation assets (0 = all)
    methods: list[str] = field(default_factory=lambda: ["feedforward", "refined", "nerf_mc"])  # rows of the report
    ablation: bool = False  # add Table 3's rows (color only, triplane only, both)
    render_size: int = 128  # orbit re-render side
    points: int = 16000  # surface samples for Chamfer / F-score
    fscore_threshold: float = 0.05  # F-score distance threshold in the [-1, 1] frame (16k points lie ~0.025 apart, so smaller τ measures sampling)
    iou_resolution: int = 64  # voxels per side for IoU by winding numbers
    iou_points_resolution: int = 32  # voxels per side for the paper's IoU from the surface points (iou_points; docs/eval.md)
    icp_iterations: int = 50  # rigid ICP iterations
    sheet_views: int = 4  # orbit views per contact sheet
    checkpoint: str = ""  # checkpoint to evaluate ("" = newest mesh-stage checkpoint)
    mesh_export: str = "texture"  # meshes/*.glb: texture (decimated, xatlas + baked UV map, refine.export_faces /
    # texture_size) | vertex (f_c at the full mesh's vertices) | none
    source: str = "procedural"  # eval set when --source/SOURCE is not given: procedural (held-out) | val | objaverse | local: gso: omniobject3d:<dir>
    uids: str = ""  # file of uids or object names (one per line, # comments; docs/eval.md) the eval set is drawn from ("" = all)
    exclude_training: bool = True  # drop candidates whose uid training used (train shards, else OUT/manifest/download.parquet)


@dataclass
class Config:
    out: str = "work"  # root of everything a run writes
    source: str = "procedural"  # procedural | objaverse | local:<dir> | gso:<dir> | omniobject3d:<dir>
    seed: int = 0  # global seed
    data: DataConfig = field(default_factory=DataConfig)  # sources, filter, download (`make data`)
    render: RenderConfig = field(default_factory=RenderConfig)  # Blender renders (`make render`)
    shards: ShardConfig = field(default_factory=ShardConfig)  # WebDataset packing (`make shards`)
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # the training loader, both stages
    model: ModelConfig = field(default_factory=ModelConfig)  # the GTR architecture
    nerf: NerfConfig = field(default_factory=NerfConfig)  # stage 1 (`make train-nerf`)
    mesh: MeshConfig = field(default_factory=MeshConfig)  # stage 2 (`make train-mesh`); also meshing at inference
    refine: RefineConfig = field(default_factory=RefineConfig)  # texture refinement and export (`make reconstruct`)
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation (`make eval`)

    @property
    def out_path(self) -> Path:
        return Path(self.out)


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, saving.
# ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


EXECUTORS = ("local", "process", "ray")  # the values of data/render/shards.executor (pipelines/executor.py)
_RENAMED_EXECUTORS = {"inline": "local", "thread": "process", "auto": "local, or ray with several writers"}


def check_executor(value: str, key: str = "executor") -> str:
    """`value` if it is one of EXECUTORS, else a ConfigError naming the key, the valid values and the rename."""
    if value in EXECUTORS:
        return value
    hint = f" ('{value}' is gone: use {_RENAMED_EXECUTORS[value]})" if value in _RENAMED_EXECUTORS else ""
    raise ConfigError(f"{key} must be local | process | ray, got '{value}'{hint}")


def _check(cfg: Config) -> Config:
    """Checks across fields that a type cannot express."""
    for section in ("data", "render", "shards"):
        check_executor(getattr(cfg, section).executor, f"{section}.executor")
    return cfg


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {tp}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' expects null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from nested dict `data`, checking keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give a mapping, got {value!r}")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    so an edit of the first would change nothing)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                continue  # unhashable keys: SafeLoader's own error says what is wrong
            if key in seen:
                raise ConfigError(f"key {key!r} given twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config preset cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path,))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`render.resolution=128` -> (["render", "resolution"], 128). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset at `path` (with its `_base_` chain), then each `key=value` override."""
    cfg = Config()
    if path:
        _apply(cfg, _read_yaml(Path(path)))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    return _check(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from core.io import atomic_write_text

    path = Path(path)
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

