"""End to end: `d2ora simulate` / `compare` on MiniLM + BBC News, small enough for CI.

What is checked against something independent: the saved per-peer adapters load in PEFT and give
the d2ora peer's logits; the merged consensus model loads in plain transformers and gives the
consensus adapter's logits; a seeded run repeats bit for bit; the bytes each peer sends follow
from the graph; the CLI turns bad configs into one red line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from d2ora import load_adapter
from d2ora.cli import app
from d2ora.config_io import ConfigError, load_config
from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.compare import compare, parse_mixers
from d2ora.recipes.simulate import simulate
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.topology import mixing_matrix, ring
from tests.conftest import dotted, load_minilm_classifier, minilm_path, relative_error, simulate_config

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "peers": 4, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
}


def tiny_config(tmp_path: Path, **changes) -> SimulateConfig:
    return simulate_config(**{**TINY, "output_dir": tmp_path, **changes})


def _logits(model, texts: list[str]) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=24, return_token_type_ids=False)
    with torch.no_grad():
        return model(**enc).logits


TEXTS = ["Shares fell sharply after the bank's results.", "The striker scored twice in the final."]


@pytest.fixture(scope="module")
def decaf_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("decaf")
    summary = simulate(tiny_config(out, mixer="decaf"))
    return out, summary


def test_run_writes_report_metrics_and_files(decaf_run) -> None:
    out, summary = decaf_run
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["samples_seen"] == TINY["rounds"] * TINY["local_steps"] * TINY["peers"] * TINY["batch_size"]
    for name in ("report.md", "metrics.csv", "summary.json", "config.yaml", "plots/metric.png", "plots/consensus.png"):
        assert (out / name).is_file(), name
    assert len(summary["adapters"]) == TINY["peers"]
    assert len(summary["peak_memory_mb"]) == 1 and summary["peak_memory_mb"][0] > 50  # one process, torch loaded
    assert "- peak memory per process: " in (out / "report.md").read_text()
    # Round 0: every peer is the same model, so the distances are exactly zero.
    assert rows[0]["consensus_distance"]["product"] == 0
    assert rows[1]["consensus_distance"]["product"] > 0
    # On a ring each peer sends its whole adapter to its 2 neighbours per round.
    w = mixing_matrix(ring(TINY["peers"]))
    receivers = (w != 0).sum(axis=0) - 1
    assert rows[1]["bytes_sent"] == [int(n) * summary["message_bytes"] for n in receivers]
    assert summary["message_bytes"] == 4 * summary["trainable_params_per_peer"]  # fp32 m, B, A and head


def test_saved_peer_adapter_loads_in_peft_with_the_same_logits(decaf_run) -> None:
    out, _ = decaf_run
    peer = out / "adapters" / "peer-1"
    ours = load_minilm_classifier()
    load_adapter(ours, peer)
    config = json.loads((peer / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == TINY["r"]
    theirs = PeftModel.from_pretrained(load_minilm_classifier(), peer).eval()
    assert relative_error(_logits(ours.eval(), TEXTS), _logits(theirs, TEXTS)) < 1e-5


def test_merged_consensus_model_equals_consensus_adapter(decaf_run) -> None:
    out, _ = decaf_run
    merged = AutoModelForSequenceClassification.from_pretrained(out / "consensus" / "merged").eval()
    adapted = load_minilm_classifier()
    load_adapter(adapted, out / "consensus" / "adapter")
    assert relative_error(_logits(merged, TEXTS), _logits(adapted.eval(), TEXTS)) < 1e-4


def test_tensorboard_events_hold_the_logged_rounds(decaf_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = decaf_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_rows(out)
    consensus = events.Scalars("test/consensus_accuracy")
    assert [e.step for e in consensus] == [r["round"] for r in rows]
    assert all(abs(e.value - r["consensus_test"]["accuracy"]) < 1e-6 for e, r in zip(consensus, rows))
    peer1 = events.Scalars("peers/train_loss/peer-1")  # per-peer scalars, grouped
    assert [e.step for e in peer1] == [1, 2] and abs(peer1[-1].value - rows[-1]["train_loss"][1]) < 1e-6
    assert events.Scalars("bytes/sent_total")[-1].value == rows[-1]["bytes_sent_total"]
    assert {"consensus_distance/product", "test/mean_peer_accuracy"} <= set(events.Tags()["scalars"])


def test_seeded_run_repeats_exactly(decaf_run, tmp_path: Path) -> None:
    out, _ = decaf_run
    again = tmp_path / "again"
    simulate(tiny_config(again, mixer="decaf"))
    for a, b in zip(read_rows(out), read_rows(again), strict=True):
        for row in (a, b):
            row.pop("wall_time_s"), row.pop("round_seconds", None)
        assert a == b
    # Tensors bit for bit (the file bytes may not be: safetensors orders header metadata freely).
    first = load_file(out / "adapters" / "peer-2" / "adapter_model.safetensors")
    second = load_file(again / "adapters" / "peer-2" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_compare_runs_every_mixer_on_the_same_partition(tmp_path: Path) -> None:
    summaries = compare(tiny_config(tmp_path, rounds=1, eval_peers=False, save_merged=False), ["local", "fedavg", "centralized"])
    assert [s["mixer"] for s in summaries] == ["local", "fedavg", "centralized"]
    local, fedavg, central = summaries
    assert local["label_counts"] == fedavg["label_counts"]  # same seed: same partition
    assert local["final"]["bytes_sent_total"] == 0
    # No server process: every peer sends its adapter to the P - 1 others and takes the server's average.
    assert fedavg["final"]["bytes_sent_total"] == TINY["peers"] * (TINY["peers"] - 1) * fedavg["message_bytes"]
    assert central["peers"] == 1 and central["batch_size"] == TINY["peers"] * TINY["batch_size"]
    assert central["final"]["samples_seen"] == local["final"]["samples_seen"]
    assert fedavg["final"]["consensus_distance"]["product"] < 1e-10  # everyone holds the server's average
    text = (tmp_path / "compare.md").read_text()
    assert all(name in text for name in ("local", "fedavg", "centralized"))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="mixer"):
        load_config(SimulateConfig, None, ["network.mixer=gossipy"])
    with pytest.raises(ConfigError, match="peer_group_size"):
        load_config(SimulateConfig, None, ["network.peers=2", "run.peer_group_size=4"])
    with pytest.raises(ValueError, match="unknown mixer"):
        parse_mixers("local,nope")


def test_default_config_file_equals_the_defaults() -> None:
    assert load_config(SimulateConfig, REPO / "configs" / "simulate_default.yaml", []) == SimulateConfig()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "network.topology=torus", "--set", "network.peers=7"], "torus"),
        (["--set", "data.dirichlet_alpha=-1"], "dirichlet_alpha"),
        (["--mixer", "nope"], "unknown mixer"),
    ],
)
def test_cli_bad_input_is_one_red_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", *args, "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "metrics.jsonl").exists()


def test_more_gossip_steps_per_round_cost_bytes_and_buy_consensus(decaf_run, tmp_path: Path) -> None:
    """Same seed, same local steps in round 1: three gossip steps send three times the bytes and
    leave the peers closer together than one."""
    out, summary = decaf_run
    one = read_rows(out)[1]
    three = read_rows(_run(tmp_path, mixing_steps=3))[1]
    assert three["train_loss"] == one["train_loss"]  # identical local training before the mix
    assert three["bytes_sent"] == [3 * b for b in one["bytes_sent"]]
    assert three["consensus_distance"]["product"] < 0.5 * one["consensus_distance"]["product"]


def _run(tmp_path: Path, **changes) -> Path:
    simulate(tiny_config(tmp_path, save_adapters=False, save_merged=False, eval_peers=False, **changes))
    return tmp_path


def test_a_diverging_peer_stops_the_run_with_one_line_and_keeps_the_logged_rounds(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", *dotted(**TINY),
                                      "--set", "optim.lr=1e12", "--set", "optim.max_grad_norm=null", "--set", "network.mixer=local",
                                      "-o", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "diverged" in result.output and "Traceback" not in result.output
    assert read_rows(tmp_path)[0]["round"] == 0  # round 0 was logged before training began


def test_dora_exact_run_ends_round_one_closer_in_merged_weights_than_decaf(decaf_run, tmp_path: Path) -> None:
    """Same seed, so round 1's local training is identical; DoRA-exact's mix leaves the peers'
    merged weights closer together than DeCAF's (it fits the mean merged weight, not the mean product)."""
    out, _ = decaf_run
    exact = read_rows(_run(tmp_path, mixer="dora_exact", rounds=1))[1]
    decaf = read_rows(out)[1]
    assert exact["train_loss"] == decaf["train_loss"]
    assert exact["consensus_distance"]["merged"] < decaf["consensus_distance"]["merged"]


@pytest.mark.parametrize("mixer", ["fedavg_products", "fedavg_exact"])
def test_server_rules_over_products_leave_every_peer_on_the_servers_adapter(mixer: str, tmp_path: Path) -> None:
    summary = simulate(tiny_config(tmp_path, mixer=mixer, rounds=1, eval_peers=False, save_merged=False))
    assert summary["final"]["bytes_sent_total"] == TINY["peers"] * (TINY["peers"] - 1) * summary["message_bytes"]
    distances = summary["final"]["consensus_distance"]
    assert distances["product"] < 1e-10 and distances["merged"] < 1e-8
