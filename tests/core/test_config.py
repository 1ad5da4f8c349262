"""The config system: defaults, presets with `_base_`, `key=value` overrides, type checks, unknown keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import Config, ConfigError, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_demo_preset():
    # configs/demo.yaml restates the defaults: loading it must change nothing
    assert dataclasses.asdict(load_config(ROOT / "configs/demo.yaml")) == dataclasses.asdict(Config())


def test_paper_preset_holds_paper_values():
    cfg = load_config(ROOT / "configs/paper.yaml")
    assert (cfg.render.resolution, cfg.model.width, cfg.model.depth, cfg.nerf.steps) == (512, 1024, 24, 150000)
    assert cfg.nerf.lr == pytest.approx(1e-4) and cfg.mesh.grid == 256


def test_base_chain_overrides_only_what_differs(tmp_path):
    (tmp_path / "a.yaml").write_text("render:\n  resolution: 256\n  views: 12\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nrender:\n  views: 4\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.render.resolution, cfg.render.views) == (256, 4)
    # official.yaml builds on paper.yaml: it keeps the paper's width and changes the architecture
    off = load_config(ROOT / "configs/official.yaml")
    assert off.model.arch == "official" and off.model.width == 1024


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(None, ["render.resolution=64", "data.licenses=[cc0, by]", "data.allow_animation=true",
                             "render.fov_deg=30", "source=local:/tmp"])
    assert cfg.render.resolution == 64 and isinstance(cfg.render.resolution, int)
    assert cfg.data.licenses == ["cc0", "by"] and cfg.data.allow_animation is True
    assert cfg.render.fov_deg == 30.0 and isinstance(cfg.render.fov_deg, float)
    assert cfg.source == "local:/tmp"
    assert parse_override("a.b=") == (["a", "b"], "")


@pytest.mark.parametrize("override, message", [
    ("render.resolution=abc", "render.resolution"),
    ("data.allow_animation=3", "data.allow_animation"),
    ("data.licenses=cc0", "data.licenses"),
    ("render=3", "render"),
])
def test_type_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [("render.resolutoin=64", "render.resolutoin"), ("nope=1", "nope"),
                                           ("data.max_asset=3", "data.max_asset")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_unknown_key_in_a_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("data:\n  max_asets: 3\n")
    with pytest.raises(ConfigError, match="data.max_asets"):
        load_config(tmp_path / "bad.yaml")


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a preset edited at the first would change nothing."""
    p = tmp_path / "twice.yaml"
    p.write_text("mesh:\n  sdf_level: 10.0\n  grid: 64\n  sdf_level: 20.0\n")
    with pytest.raises(ConfigError, match=r"twice.yaml.*'sdf_level' given twice.*line 4"):
        load_config(p)
    for preset in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        load_config(preset)  # every shipped preset holds each key once


def test_not_key_value_and_missing_file():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["render.resolution"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.max_assets=3", "render.views=5"])
    path = save_config(cfg, tmp_path / "cfg.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["data"]["max_assets"] == 3 and data["render"]["views"] == 5
    assert dataclasses.asdict(load_config(path)) == dataclasses.asdict(cfg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_stage_cli_exits_2_naming_the_key(capsys):
    from pipelines.data import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(ROOT / "configs/demo.yaml"), "data.nope=1"])
    assert e.value.code == 2 and "data.nope" in capsys.readouterr().err


def test_every_config_field_has_a_comment():
    """STYLE: a comment on every field. Read from the source: each annotated field of core/config.py's
    dataclasses has a `#` comment on one of its lines."""
    import ast
    import io
    import tokenize

    src = (ROOT / "core" / "config.py").read_text()
    commented = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    missing = [f"{cls.name}.{st.target.id}" for cls in ast.parse(src).body if isinstance(cls, ast.ClassDef)
               for st in cls.body if isinstance(st, ast.AnnAssign)
               and not commented & set(range(st.lineno, st.end_lineno + 1))]
    assert not missing, missing
