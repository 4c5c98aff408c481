"""config_io: YAML + --set overrides into pydantic models, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from d2ora.config_io import (
    ConfigError,
    load_config,
    parse_override,
    parse_value,
    to_yaml,
)
from d2ora.recipes.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 8
    names: list[str] = Field(default_factory=lambda: ["a"])


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-3
    steps: int | None = None
    label: str = "x"
    flag: bool = False
    inner: Inner = Field(default_factory=Inner)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-4", 1e-4), ("-2E3", -2000.0), ("3", 3), ("0.5", 0.5), ("[query,value]", ["query", "value"]),
     ("null", None), ("", None), ("true", True), ("hello", "hello"), ("'007'", "007")],
)
def test_values_are_parsed_as_yaml(text: str, expected) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 5.0e-2\nlabel: from-file\ninner:\n  r: 4\n")
    cfg = load_config(Outer, path, ["label=from-set", "inner.names=[q,v]", "steps=10"])
    assert cfg.lr == 0.05 and cfg.label == "from-set" and cfg.steps == 10
    assert cfg.inner.r == 4 and cfg.inner.names == ["q", "v"]
    assert load_config(Outer, None, []) == Outer()


def test_yaml_file_reads_exponent_floats(tmp_path: Path) -> None:
    assert load_config(Outer, write(tmp_path, "lr: 1e-4\n"), []).lr == 1e-4


def test_later_override_wins_and_updates_win_over_set() -> None:
    cfg = load_config(Outer, None, ["lr=1", "lr=2"], updates={"label": "typed"})
    assert cfg.lr == 2.0 and cfg.label == "typed"
    assert load_config(Outer, None, ["label=a"], updates={"label": "b"}).label == "b"


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    assert load_config(Outer, write(tmp_path, "# nothing\n"), []) == Outer()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(Outer, tmp_path / "nope.yaml", [])


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "lr: [1, 2\n"), [])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"), [])


def test_unknown_keys_are_named_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Outer, write(tmp_path, "lrr: 1\n"), [])
    assert "unknown key 'lrr'" in str(info.value) and "did you mean 'lr'" in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown key 'inner\.rr' \(from the command line\); did you mean 'r'"):
        load_config(Outer, None, ["inner.rr=3"])


def test_invalid_values_name_each_key_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, ["lr=abc", "inner.r=[1]", "flag=maybe"])
    err = info.value
    assert len(err.problems) == 3
    assert any(p.startswith("lr (from the command line):") and "'abc'" in p for p in err.problems)
    assert any(p.startswith("inner.r (from the command line):") for p in err.problems)
    assert any(p.startswith("flag (from the command line):") for p in err.problems)
    assert "\n" not in str(err)


def test_malformed_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("lr")
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        load_config(Outer, write(tmp_path, "lr: 1\n"), ["lr.x=3"])
    with pytest.raises(ConfigError, match=r"lr \(from the command line\): .*valid number"):  # not in the file: a nested value, rejected by type
        load_config(Outer, None, ["lr.x=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("names=[a,")


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    cfg = Outer(lr=3e-4, steps=5, inner=Inner(r=2, names=["x", "y"]))
    assert load_config(Outer, write(tmp_path, to_yaml(cfg)), []) == cfg


def test_train_config_overrides_and_errors() -> None:
    cfg = load_config(TrainConfig, None, ["optim.lr=1e-4", "adapter.target_modules=[query,value]", "adapter.use_dora=false",
                                          "run.max_steps=3"])
    assert cfg.optim.lr == 1e-4 and cfg.adapter.target_modules == ["query", "value"] and cfg.adapter.use_dora is False
    assert cfg.run.max_steps == 3
    with pytest.raises(ConfigError, match="adapter.use_dora .*valid boolean"):
        load_config(TrainConfig, None, ["adapter.use_dora=qlora"])
    with pytest.raises(ConfigError, match="leaves no training data"):
        load_config(TrainConfig, None, ["data.val_fraction=0.5", "data.test_fraction=0.5"])
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(TrainConfig, None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="device .*not a torch device"):
        load_config(TrainConfig, None, ["run.device=gpu0"])
    assert load_config(TrainConfig, None, ["run.device=cpu"]).run.device == "cpu"


def test_shipped_default_yaml_equals_train_config_defaults() -> None:
    assert load_config(TrainConfig, REPO / "configs" / "train_default.yaml", []) == TrainConfig()


def test_every_train_config_field_is_documented() -> None:
    from d2ora.recipes.simulate_config import SimulateConfig

    for config_cls in (TrainConfig, SimulateConfig):
        for name, field in config_cls.model_fields.items():
            assert field.description, name
            section = field.annotation
            missing = [f"{name}.{key}" for key, f in section.model_fields.items() if not f.description]
            assert not missing


def test_a_bare_off_for_trust_is_the_mode_not_a_boolean() -> None:
    """YAML 1.1 reads `off` as false; `--set trust.mode=off` and the shipped default file must still work."""
    from d2ora.recipes.simulate_config import SimulateConfig

    assert load_config(SimulateConfig, None, ["trust.mode=off"]).trust.mode == "off"
    assert load_config(SimulateConfig, None, ["trust.mode=simulated"]).trust.mode == "simulated"
