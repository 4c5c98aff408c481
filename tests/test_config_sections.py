"""Config in sections: every shipped and recorded config loads, old flat keys name their new place,
the two commands share their sections, and --print-config / ``d2ora config migrate`` round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.config_io import ConfigError, load_config, read_yaml
from d2ora.dora.config import DoRAConfig
from d2ora.recipes.sections import DataSection, ModelSection, OptimSection, dotted_items, migrate_flat, nested
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.recipes.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TRAIN_FILES = ("train_default.yaml", "train_config.yaml")


def shipped_configs() -> list[Path]:
    found = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "experiments").rglob("*.yaml"))
    return [p for p in found if p.is_file()]


def test_every_config_under_configs_and_experiments_loads() -> None:
    paths = shipped_configs()
    assert len(paths) > 2  # the two defaults and the experiments' recorded runs
    for path in paths:
        config_cls = TrainConfig if path.name in TRAIN_FILES else SimulateConfig
        load_config(config_cls, path)  # raises ConfigError naming the file and key


def test_train_and_simulate_share_data_model_adapter_and_optim() -> None:
    for section, base in (("data", DataSection), ("model", ModelSection), ("adapter", DoRAConfig), ("optim", OptimSection)):
        train_type = TrainConfig.model_fields[section].annotation
        simulate_type = SimulateConfig.model_fields[section].annotation
        assert issubclass(train_type, base) and issubclass(simulate_type, base), section
    # The adapter section is the library's own DoRAConfig, not a copy of its fields.
    assert SimulateConfig.model_fields["adapter"].annotation is DoRAConfig is TrainConfig.model_fields["adapter"].annotation


@pytest.mark.parametrize(("config_cls", "flat_file", "default_file"), [
    (SimulateConfig, "simulate_flat_v0.yaml", "simulate_default.yaml"),
    (TrainConfig, "train_flat_v0.yaml", "train_default.yaml"),
])
def test_old_flat_default_file_names_each_key_and_migrates_to_the_new_default(config_cls, flat_file, default_file) -> None:
    flat = read_yaml(DATA / flat_file)
    with pytest.raises(ConfigError) as caught:
        load_config(config_cls, DATA / flat_file)
    problems = caught.value.problems
    assert len(problems) == len(flat)  # one line per old key
    for key in flat:
        line = next(p for p in problems if p.startswith(f"'{key}' moved"))
        places = config_cls.moved_keys[key]
        for place in (places,) if isinstance(places, str) else places:
            assert place in line
    # The old default file, migrated, is the new default config (the shipped file says the same).
    assert config_cls.model_validate(migrate_flat(config_cls, flat)) == config_cls()
    assert load_config(config_cls, REPO / "configs" / default_file) == config_cls()


def test_moved_key_on_the_command_line_names_its_section() -> None:
    with pytest.raises(ConfigError, match=r"'mixer' moved into a section: use network\.mixer \(from the command line\)"):
        load_config(SimulateConfig, None, ["mixer=dimat"])
    with pytest.raises(ConfigError, match=r"'data' moved into a section: use data\.source: 'my\.csv'"):
        load_config(SimulateConfig, None, ["data=my.csv"])
    with pytest.raises(ValueError, match=r"'method' moved into a section: use adapter\.use_dora: false"):
        SimulateConfig(method="lora")
    # A misspelt key inside a section gets the spelling hint, not a migration line.
    with pytest.raises(ConfigError, match=r"unknown key 'network\.mixr'.*did you mean 'mixer'"):
        load_config(SimulateConfig, None, ["network.mixr=dimat"])


def test_sections_take_dotted_overrides_and_validate_across_sections() -> None:
    cfg = load_config(SimulateConfig, None, ["network.mixer=centralized", "run.rounds=2", "adapter.r=4"])
    assert cfg.centralized and cfg.network.mixer == "local" and cfg.run.rounds == 2 and cfg.adapter.r == 4
    assert cfg.run_name == "centralized"
    with pytest.raises(ConfigError, match="network.drift: kgt .* trust.robust: none"):
        load_config(SimulateConfig, None, ["network.drift=kgt", "trust.robust=median"])
    with pytest.raises(ConfigError, match=r"run\.peer_group_size=4 exceeds network\.peers=2"):
        load_config(SimulateConfig, None, ["network.peers=2", "run.peer_group_size=4"])


def test_a_partly_given_section_keeps_the_commands_own_defaults(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("optim: {lr: 1.0e-3}\nadapter: {r: 4}\nmodel: {task: classification}\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.batch_size == TrainConfig().optim.batch_size == 16
    assert cfg.adapter.r == 4 and cfg.adapter.dropout == TrainConfig().adapter.dropout == 0.05
    assert cfg.model.base_dropout is True
    assert load_config(SimulateConfig, None, ["optim.lr=1e-3"]).optim.batch_size == SimulateConfig().optim.batch_size == 8


def test_result_config_is_dotted_and_leaves_out_neutral_keys() -> None:
    base = SimulateConfig()
    result = base.result_config()
    assert "network.mixer" in result and "run.output_dir" not in result and "run.device" not in result
    assert set(result) | set(SimulateConfig.result_neutral_keys) == set(dotted_items(base.model_dump(mode="json")))
    # Changing a neutral key leaves it equal; a result key does not.
    assert base.updated({"run.eval_batch_size": 7, "run.output_dir": "elsewhere"}).result_config() == result
    assert base.updated({"optim.lr": 1e-3}).result_config() != result
    with pytest.raises(ValueError):
        base.updated({"network.peers": 0})  # validated afresh


def test_nested_inverts_dotted_items() -> None:
    data = SimulateConfig().model_dump(mode="json")
    assert nested(dotted_items(data)) == data


def test_print_config_shows_the_resolved_config() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--set", "network.mixer=dimat", "--set", "run.rounds=3", "--print-config"])
    assert result.exit_code == 0, result.output
    shown = SimulateConfig.model_validate(yaml.safe_load(result.output))
    assert shown == SimulateConfig().updated({"network.mixer": "dimat", "run.rounds": 3})
    result = runner.invoke(app, ["train", "--method", "lora", "--print-config"])
    assert result.exit_code == 0, result.output
    assert TrainConfig.model_validate(yaml.safe_load(result.output)).adapter.use_dora is False


def test_old_flat_key_on_the_cli_is_one_red_line() -> None:
    result = CliRunner().invoke(app, ["simulate", "--set", "peers=4", "--print-config"])
    assert result.exit_code == 2
    assert "'peers' moved into a section: use network.peers" in result.output


def test_config_migrate_writes_a_file_that_loads(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("mixer: dimat\npeers: 4\nmethod: lora\nlora_alpha: 8\ntrust: simulated\nnetwork: {share: direction}\n")
    out = tmp_path / "new.yaml"
    result = CliRunner().invoke(app, ["config", "migrate", str(old), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(SimulateConfig, out)
    assert (cfg.network.mixer, cfg.network.peers, cfg.network.share) == ("dimat", 4, "direction")
    assert (cfg.adapter.use_dora, cfg.adapter.alpha, cfg.trust.mode) == (False, 8.0, "simulated")
    assert old.read_text().startswith("mixer: dimat")  # the old file is left as it was
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers: 0\n")
    result = CliRunner().invoke(app, ["config", "migrate", str(bad)])
    assert result.exit_code == 2 and "network.peers" in result.output
