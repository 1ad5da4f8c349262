"""The command-line surface every stage shares: `--config`, `--out`, `--source` and `key=value` overrides."""

from __future__ import annotations

import argparse
import sys

from core.config import Config, ConfigError, load_config, save_config

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3  # EXIT_PARTIAL: finished, some items failed (manifest)


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="YAML preset (default: %(default)s)")
    p.add_argument("--out", default=None, help="root of everything the run writes (default: config 'out', ./work)")
    p.add_argument("--source", default=None,
                   help="procedural | objaverse | local:<dir> | gso:<dir> | omniobject3d:<dir> (default: config 'source')")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. render.resolution=128 render.views=8")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.source:
        overrides.append(f"source={args.source}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def save_resolved(cfg: Config, stage: str) -> None:
    """Keep the resolved config beside the stage's outputs: OUT/configs/<stage>.yaml."""
    save_config(cfg, cfg.out_path / "configs" / f"{stage}.yaml")
