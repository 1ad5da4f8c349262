"""Convert the authors' released checkpoint (`ckpt.pth`) into our `official`-preset GTR model.

The released file is `{"pipeline": {"generator": state_dict, "field": state_dict}}` (key layout:
tests/fixtures/official-gtr-tiny/official_full_keys.txt). It is read with `torch.load(weights_only=True)`
so it stays data, and is size-bounded. Every released key must map onto exactly one of ours with the same
shape, and every one of ours must be filled; anything else is an error naming the keys.

    python -m training.convert_official ckpt.pth out.safetensors [--config configs/official.yaml]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.config import ModelConfig
from training.model import GTR

MAX_CKPT_BYTES = 8 << 30  # the real checkpoint is ~1.6 GB (411 M float32 parameters)

# released generator/field key (regex) -> ours (template with the regex groups)
_RULES: list[tuple[str, str]] = [
    (r"generator\.conv_proj\.weight", "encoder.proj.weight"),
    (r"generator\.norm1\.(weight|bias)", "encoder.norm.{0}"),
    (r"generator\.norm2\.(weight|bias)", "transformer.norm.{0}"),
    (r"generator\.attn_layers\.(\d+)\.self_attn\.to_([qkv])\.weight", "transformer.blocks.{0}.attn.to_{1}.weight"),
    (r"generator\.attn_layers\.(\d+)\.self_attn\.to_out\.0\.(weight|bias)", "transformer.blocks.{0}.attn.to_out.{1}"),
    (r"generator\.attn_layers\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", "transformer.blocks.{0}.ff.proj_in.{1}"),
    (r"generator\.attn_layers\.(\d+)\.ff\.net\.2\.(weight|bias)", "transformer.blocks.{0}.ff.proj_out.{1}"),
    (r"generator\.attn_layers\.(\d+)\.norm([12])\.(weight|bias)", "transformer.blocks.{0}.norm{1}.{2}"),
    (r"generator\.out\.proj\.(weight|bias)", "upsampler.proj.{0}"),
    (r"field\.decoder\.field\.mlp_sigma\.layers\.(\d+)\.(weight|bias)", "density_mlp.layers.{0}.{1}"),
    (r"field\.decoder\.field\.mlp_color\.layers\.(\d+)\.(weight|bias)", "color_mlp.layers.{0}.{1}"),
]


class ConversionError(ValueError):
    """The checkpoint does not fit the configured `official` model."""


def model_config_from_official(sizes: dict[str, Any]) -> ModelConfig:
    """A ModelConfig of the released structure from the released config's sizes.

    `sizes` holds "generator" (in_channels, plane_resolution, out_channels, patch_size, model_channels,
    num_layers, num_heads, num_head_channels, upsample_factor, img_token_normalization), "field"
    (layer_width, num_layers_sigma, num_layers_color, activation, sigma_activation) and "scene_box" [lo, hi]
    — the layout of the fixture's official_tiny_config.json. Cameras are taken as already in their frame.
    """
    g, f = sizes["generator"], sizes["field"]
    lo, hi = sizes.get("scene_box", [-1.0, 1.0])
    if lo != -hi:
        raise ConversionError(f"only a centred scene box is supported, got [{lo}, {hi}]")
    if f.get("activation", "gelu") != "gelu" or f.get("sigma_activation", "softplus") != "softplus":
        raise ConversionError(f"field activations {f.get('activation')}/{f.get('sigma_activation')} are not "
                              "the released gelu/softplus")
    in_dim = f.get("in_dim", 3 * g["out_channels"])
    if in_dim != 3 * g["out_channels"]:
        raise ConversionError(f"field in_dim {in_dim} != 3 x generator out_channels {g['out_channels']}")
    return ModelConfig(
        arch="official", in_channels=g["in_channels"], input_order="rgb_dir_moment_mask",
        patch_size=g["patch_size"], encoder_bias=False,
        img_token_norm=bool(g.get("img_token_normalization", True)), width=g["model_channels"],
        depth=g["num_layers"], heads=g["num_heads"], head_dim=g["num_head_channels"], ffn="geglu", ffn_mult=4,
        attn_bias=False, plane_res=g["plane_resolution"], plane_channels=g["out_channels"],
        upsample=g["upsample_factor"], mlp_hidden=f["layer_width"], density_layers=f["num_layers_sigma"],
        color_layers=f["num_layers_color"], scene_box=float(hi), official_frame=False,
        density_bias=0.0,  # the released f_d is softplus(x): no extra bias, whatever the demo default
        lift=False)  # the demo's lifted input views are not part of the released model


def _ours(key: str) -> str | None:
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups())
    return None


def convert_state_dict(pipeline: dict[str, dict[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    """The released `pipeline` entry → a state dict of `GTR(cfg)`; strict on keys and shapes."""
    if not isinstance(pipeline, dict) or set(pipeline) != {"generator", "field"}:
        got = sorted(pipeline) if isinstance(pipeline, dict) else type(pipeline).__name__
        raise ConversionError(f"checkpoint 'pipeline' must hold exactly 'generator' and 'field', got {got}")
    flat = {f"{part}.{k}": v for part, sd in pipeline.items() for k, v in sd.items()}
    with torch.device("meta"):  # shapes only: nothing allocated for a 411 M-parameter template
        expected = {k: tuple(v.shape) for k, v in GTR(cfg).state_dict().items()}
    out: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in flat.items():
        if not isinstance(value, Tensor):
            raise ConversionError(f"checkpoint entry {key} is a {type(value).__name__}, not a tensor")
        if key == "generator.planes":  # ours has no leading batch axis: (1,3,W,R,R) -> (3,W,R,R)
            ours, value = "transformer.planes", value.squeeze(0) if value.ndim == 5 else value
        elif key == "field.aabb":  # not a parameter of ours: it must agree with the configured box
            box = cfg.scene_box
            want = torch.tensor([-box, -box, -box, box, box, box], dtype=value.dtype)
            if value.shape != (6,) or not torch.allclose(value.cpu(), want):
                raise ConversionError(f"checkpoint aabb {value.tolist()} does not match model.scene_box {box}")
            continue
        else:
            ours = _ours(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if tuple(value.shape) != expected[ours]:
            mismatched.append(f"{key} {tuple(value.shape)} -> {ours} {expected[ours]}")
            continue
        if ours.endswith("mlp.layers.0.weight"):
            value = _plane_major(value)
        out[ours] = value.detach().to(torch.float32).contiguous()
    missing = sorted(set(expected) - set(out))
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if missing:
        problems.append(f"missing (ours): {', '.join(missing)}")
    if problems:
        raise ConversionError("checkpoint does not fit the configured model: " + " | ".join(problems))
    return out


def _plane_major(w: Tensor) -> Tensor:
    """First decoder layer [hidden, 3C]: the released field interleaves the sampled features channel-major
    (index c·3 + plane); ours concatenates planes (index plane·C + c). Permute the input columns to match."""
    hidden, f = w.shape
    return w.reshape(hidden, f // 3, 3).transpose(1, 2).reshape(hidden, f)


def read_checkpoint(path: str | Path, max_bytes: int = MAX_CKPT_BYTES) -> dict[str, dict[str, Tensor]]:
    """The `pipeline` entry of a released checkpoint, loaded as plain tensors (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ConversionError(f"checkpoint {path} is {size} bytes, over the {max_bytes}-byte limit")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption: say which file
        raise ConversionError(f"cannot read {path} as a weights-only checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "pipeline" not in ckpt:
        raise ConversionError(f"{path} has no 'pipeline' entry (keys: {list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt)})")
    return ckpt["pipeline"]


def load_official(path: str | Path, cfg: ModelConfig) -> GTR:
    """A GTR(cfg) holding the released weights at `path`."""
    model = GTR(cfg)
    model.load_state_dict(convert_state_dict(read_checkpoint(path), cfg), strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from core.cli import config_from_args, stage_parser
    from core.config import ConfigError, to_dict
    from core.io import atomic_path

    p = stage_parser(__doc__.split("\n\n")[0])
    p.set_defaults(config="configs/official.yaml")
    p.add_argument("checkpoint", help="released ckpt.pth")
    p.add_argument("output", help="output .safetensors (model weights; the model config goes in its metadata)")
    p.add_argument("--sizes", default="", help="released config JSON with generator/field sizes "
                   "(like the fixture's official_tiny_config.json) instead of the preset's model section")
    args = p.parse_args(argv)
    # argparse hands the leading positionals to `overrides` (nargs="*", declared first): re-split by form.
    seq = [*args.overrides, args.checkpoint, args.output]
    paths, args.overrides = [s for s in seq if "=" not in s], [s for s in seq if "=" in s]
    if len(paths) != 2:
        p.error(f"expected a checkpoint and an output path, got {paths}")
    args.checkpoint, args.output = paths
    try:
        if args.sizes:
            mcfg = model_config_from_official(json.loads(Path(args.sizes).read_text()))
        else:
            mcfg = config_from_args(args).model
        state = convert_state_dict(read_checkpoint(args.checkpoint), mcfg)
    except (ConversionError, ConfigError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"model_config": json.dumps(to_dict(mcfg)), "source": str(Path(args.checkpoint).name)}
    with atomic_path(args.output) as tmp:
        save_file(state, str(tmp), metadata=meta)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.output}: {len(state)} tensors, {n} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
