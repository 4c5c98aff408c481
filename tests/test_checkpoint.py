"""Checkpoints and exact resume of ``d2ora simulate``: a run that crashes mid-round and is resumed
ends exactly where an uninterrupted run does; broken checkpoints fall back or fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.engine import checkpoint as checkpoint_module
from d2ora.engine.checkpoint import CheckpointError, rank_dir
from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.simulate import simulate
from d2ora.recipes.simulate_config import SimulateConfig
from tests.conftest import crash_at_local_step, simulate_config

TINY = {
    "peers": 4, "rounds": 3, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
    "save_merged": False, "tensorboard": False,
    # Dropout draws from torch's RNG and DeCAF resets AdamW's factor moments: both must survive a resume.
    "dropout": 0.1, "mixer": "decaf",
}


def config(out: Path, **changes) -> SimulateConfig:
    return simulate_config(**{**TINY, "output_dir": out, **changes})


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """The process dies in the middle of a round: the ``calls``-th local step raises."""
    crash_at_local_step(monkeypatch, calls, Crash)


def rows_without_time(out: Path) -> list[dict]:
    rows = read_rows(out)
    for row in rows:
        row.pop("wall_time_s")
        row.pop("round_seconds", None)
    return rows


def adapters(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for folder in sorted((out / "adapters").glob("peer-*")) + [out / "consensus" / "adapter"]:
        for key, value in load_file(folder / "adapter_model.safetensors").items():
            found[f"{folder.name}/{key}"] = value
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    simulate(config(out))
    return out


def test_crash_mid_round_then_resume_equals_an_uninterrupted_run(uninterrupted: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    crash_after(monkeypatch, TINY["local_steps"] + 1)  # first local step of round 2
    with pytest.raises(Crash):
        simulate(config(tmp_path))
    assert [r["round"] for r in read_rows(tmp_path)] == [0, 1]  # round 1 logged, round 2 lost
    monkeypatch.undo()
    simulate(config(tmp_path), resume=True)
    assert rows_without_time(tmp_path) == rows_without_time(uninterrupted)
    ours, reference = adapters(tmp_path), adapters(uninterrupted)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.allclose(ours[key], reference[key], rtol=0, atol=1e-6), key
    # The checkpoints hold only safetensors and JSON (nothing a loader could be made to execute).
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix or p.name for p in files} <= {".safetensors", ".json", "latest"}


def test_resume_after_the_last_round_rewrites_the_same_outputs(uninterrupted: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "run")
    before = adapters(tmp_path / "run")
    simulate(config(tmp_path / "run"), resume=True)
    after = adapters(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rows_without_time(tmp_path / "run") == rows_without_time(uninterrupted)


def test_keeps_the_newest_checkpoints_and_a_pointer(uninterrupted: Path) -> None:
    directory = rank_dir(uninterrupted, 0)
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["round-000002", "round-000003"]
    assert (directory / "latest").read_text().strip() == "round-000003"
    meta = json.loads((directory / "round-000003" / "state.json").read_text())
    assert meta["state"]["loop.round"] == 3 and [r["round"] for r in meta["rows"]] == [0, 1, 2, 3]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:  # round 2's checkpoint: half a file, then the process dies
            Path(path).write_bytes(b"\x00" * 100)
            raise Crash("killed while writing")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save)
    with pytest.raises(Crash):
        simulate(config(tmp_path))
    directory = rank_dir(tmp_path, 0)
    assert [p.name for p in directory.iterdir() if p.is_dir()] == ["round-000001"]  # no half folder under a final name
    assert (directory / "latest").read_text().strip() == "round-000001"
    monkeypatch.undo()
    simulate(config(tmp_path), resume=True)
    assert [r["round"] for r in read_rows(tmp_path)] == [0, 1, 2, 3]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(uninterrupted: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    newest = rank_dir(run, 0) / "round-000003" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the tensor data
    newest.write_bytes(bytes(data))
    simulate(config(run), resume=True)
    assert "skipping checkpoint round-000003" in capsys.readouterr().out
    assert rows_without_time(run) == rows_without_time(uninterrupted)  # round 3 redone from round 2
    (rank_dir(run, 0) / "round-000003" / "state.json").write_text("{not json")
    (rank_dir(run, 0) / "round-000002" / "state.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        simulate(config(run), resume=True)


def test_resume_refuses_a_changed_config_naming_the_keys(uninterrupted: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(CheckpointError, match=r"differs in optim.lr, run.local_steps"):
        simulate(config(run, lr=1e-3, local_steps=3), resume=True)
    simulate(config(run, eval_batch_size=5), resume=True)  # cannot change results: accepted


def test_cli_resume_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to resume" in result.output and "Traceback" not in result.output
    (tmp_path / "config.yaml").write_text(f"network: {{peers: 4}}\nrun: {{output_dir: {tmp_path}}}\n")
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "no checkpoints" in result.output and "Traceback" not in result.output


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(uninterrupted: Path, tmp_path: Path) -> None:
    """A checkpoint written by an earlier d2ora (format 1: optimizer state by parameter index) is not
    skipped as damaged nor half-loaded: the resume stops with one line saying to rerun."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for meta_path in rank_dir(run, 0).glob("round-*/state.json"):
        meta = json.loads(meta_path.read_text())
        old = {"format": 1, "round": meta["state"]["loop.round"], "config": meta["config"], "rows": meta["rows"],
               "tensors_sha256": meta["tensors_sha256"]}
        meta_path.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"written by an earlier d2ora \(checkpoint format 1; .*rerun"):
        simulate(config(run), resume=True)
    result = CliRunner().invoke(app, ["simulate", "--resume", str(run)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and "earlier d2ora" in errors[0] and "rerun" in result.output, result.output
    assert "skipping checkpoint" not in result.output
