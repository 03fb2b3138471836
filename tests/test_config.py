from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lvr.config import ConfigError, config_hash, load_config, to_yaml


@dataclass
class Caption:
    backend: Literal["openai", "hf", "annotations"] = "annotations"
    frames: int = 8
    temperature: float = 0.0


@dataclass
class Cfg:
    name: str = "x"
    clip_s: float = 10.0
    shots: bool = False
    frames: list[int] = field(default_factory=lambda: [8])
    out: Path | None = None
    caption: Caption = field(default_factory=Caption)


def test_defaults_file_and_overrides_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("clip_s: 5\ncaption:\n  backend: hf\n  frames: 4\n")
    cfg = load_config(Cfg, f, ["caption.frames=16", "frames=8,16,32", "shots=true", "out=runs/a"])
    assert cfg.clip_s == 5.0 and isinstance(cfg.clip_s, float)
    assert cfg.caption.backend == "hf" and cfg.caption.frames == 16
    assert cfg.frames == [8, 16, 32] and cfg.shots is True and cfg.out == Path("runs/a")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("clip=3", "unknown config key 'clip' (did you mean 'clip_s'?); valid keys: name, clip_s"),
        (
            "caption.bakend=hf",
            "unknown config key 'caption.bakend' (did you mean 'caption.backend'?)",
        ),
        (
            "caption.backend=vllm",
            "config key 'caption.backend' must be one of openai, hf, annotations",
        ),
        ("caption.frames=many", "config key 'caption.frames' expects an integer, got 'many'"),
        ("shots=maybe", "config key 'shots' expects true or false"),
        ("frames=8,x", "config key 'frames[1]' expects an integer"),
        ("caption=3", "config key 'caption' is a section"),
        ("noequals", "must look like key=value"),
    ],
)
def test_errors_name_the_key_and_choices(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, None, [override])
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, tmp_path / "list.yaml")


def test_yaml_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config(Cfg, None, ["caption.frames=3", "out=x/y"])
    f = tmp_path / "eff.yaml"
    f.write_text(to_yaml(cfg))
    again = load_config(Cfg, f)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Cfg, None, ["caption.frames=4"])) != config_hash(cfg)


def test_float_fields_accept_exponents_yaml_reads_as_strings() -> None:
    # YAML 1.1 parses "1e-4" (no dot) as a string; a float field must still take it.
    cfg = load_config(Cfg, None, ["clip_s=1e-4"])
    assert cfg.clip_s == 1e-4
    with pytest.raises(ConfigError, match="expects a number"):
        load_config(Cfg, None, ["clip_s=fast"])
