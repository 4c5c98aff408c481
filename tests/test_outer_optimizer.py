"""The outer optimizer on the gossip average (DiLoCo / NoLoCo): lr 1 / momentum 0 is the plain
run, two rounds of the simulator against Nesterov written out by hand on the recorded adapters,
the kept (unshared) entries, exact resume, and bad settings."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import d2ora.engine.round as round_module
from d2ora.config_io import ConfigError, load_config
from d2ora.engine.outer_optimizer import OuterOptimizer
from d2ora.recipes.simulate import simulate
from d2ora.recipes.simulate_config import SimulateConfig
from tests.conftest import (
    crash_at_local_step,
    simulate_config,
    stacked_tiny_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NESTEROV = {"outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.9}


def run(model: str, out: Path, network: dict | None = None, resume: bool = False, **changes) -> dict:
    flat = {"model": model, "peers": 4, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_length": 24,
            "max_train_samples": 80, "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 4,
            "r": 2, "lr": 1e-2, "save_merged": False, "save_adapters": False, "tensorboard": False,
            "eval_peers": False, "mixer": "d2ora", "output_dir": out, **changes}
    config = simulate_config(**flat, network=dict(network or {}))
    return simulate(config, console=Console(file=io.StringIO()), resume=resume)


def last_state(out: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's tensors: ``host.adapters`` (P, numel), ``outer.momentum``, ..."""
    return load_file(max((out / "checkpoints" / "rank-0").glob("round-*/state.safetensors")))


@pytest.fixture(scope="module")
def plain_run(tiny_bert_dir: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    run(tiny_bert_dir, out)
    return out


def test_lr_one_momentum_zero_is_the_plain_run(tiny_bert_dir: str, plain_run: Path, tmp_path: Path) -> None:
    run(tiny_bert_dir, tmp_path / "unit", {"outer_optimizer": "nesterov", "outer_lr": 1.0, "outer_momentum": 0.0})
    plain, unit = last_state(plain_run), last_state(tmp_path / "unit")
    assert "outer.momentum" not in unit  # momentum 0 keeps no state
    # Bit for bit: the step runs in float64, where x_start − (x_start − x_mixed) rounds back to x_mixed.
    assert torch.equal(unit["host.adapters"], plain["host.adapters"])
    # ... and the hook does act: lr 0.7 lands elsewhere.
    run(tiny_bert_dir, tmp_path / "damped", {"outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.0})
    assert float((last_state(tmp_path / "damped")["host.adapters"] - plain["host.adapters"]).abs().max()) > 1e-4


def test_two_rounds_on_a_complete_graph_match_nesterov_by_hand(tiny_bert_dir: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Complete graph, uniform weights, D²ORA: every peer's mix is the mean of all x_end. From the
    recorded x_start (before the local steps) and x_end (before the gossip) of each round, DiLoCo's
    outer step: Δ = x_start − mean(x_end), b ← μb + Δ, x ← x_start − η(Δ + μb)."""
    starts: list[torch.Tensor] = []
    ends: list[torch.Tensor] = []
    local_steps, gossip = round_module.local_steps, round_module.gossip

    def recording_local_steps(host, *args, **kwargs):
        starts.append(host.peer_model.flat().double())
        return local_steps(host, *args, **kwargs)

    def recording_gossip(host, *args, **kwargs):
        ends.append(host.peer_model.flat().double())
        return gossip(host, *args, **kwargs)

    monkeypatch.setattr(round_module, "local_steps", recording_local_steps)
    monkeypatch.setattr(round_module, "gossip", recording_gossip)
    out = tmp_path / "run"
    run(tiny_bert_dir, out, NESTEROV, topology="complete", mixing="uniform")
    assert len(starts) == len(ends) == 2
    lr, mu = NESTEROV["outer_lr"], NESTEROV["outer_momentum"]
    momentum = torch.zeros_like(starts[0])
    x = starts[0]
    for start, end in zip(starts, ends):
        assert float((start - x).abs().max()) <= 1e-6  # round 2 starts where round 1's outer step ended
        delta = start - end.mean(0, keepdim=True)
        assert float(delta.abs().max()) > 1e-4  # the peers did move
        momentum = mu * momentum + delta
        x = start - lr * (delta + mu * momentum)
    state = last_state(out)
    scale = float(x.abs().max())
    assert float((state["host.adapters"].double() - x).abs().max()) <= 1e-6 * scale
    assert float((state["outer.momentum"] - momentum).abs().max()) <= 1e-6 * scale
    # Not the plain mix: with η·(1 + μ) = 1.33 the outer step overshoots the average.
    assert float((state["host.adapters"].double() - ends[-1].mean(0)).abs().max()) > 1e-4


@pytest.fixture(scope="module")
def small_peers(one_layer_classifier_dir: str):
    """Three stacked adapters over a one-layer classifier, for the hook on its own."""
    return stacked_tiny_classifier(one_layer_classifier_dir, 3)


def test_unshared_entries_stay_as_mixed(small_peers) -> None:
    """Only what the gossip averages gets the outer step (checked against Nesterov by hand); a kept
    entry is the peer's own, left as the mix left it, and gathers no momentum."""
    numel = small_peers.flat().shape[1]
    shared = torch.arange(numel) % 3 != 0
    lr, mu = 0.5, 0.8
    hook = OuterOptimizer(small_peers, lr=lr, momentum=mu, shared=shared)
    g = torch.Generator().manual_seed(1)
    momentum = torch.zeros(small_peers.flat().shape, dtype=torch.float64)
    for _ in range(2):  # the second round uses the first's momentum
        hook.begin_round()
        start = small_peers.flat().double()
        small_peers.load_flat((start + 0.01 * torch.randn(start.shape, generator=g, dtype=torch.float64)).float())
        mixed = small_peers.flat().double()  # what a mix would have left
        hook.after_mix([], [])
        delta = torch.where(shared, start - mixed, 0.0)
        momentum = mu * momentum + delta
        expected = torch.where(shared, start - lr * (delta + mu * momentum), mixed)
        now = small_peers.flat().double()
        assert float((now - expected).abs().max()) <= 1e-6
        assert torch.equal(now[:, ~shared], mixed[:, ~shared])
    assert float(hook.momentum_buffer[:, ~shared].abs().max()) == 0
    assert float((hook.momentum_buffer - momentum).abs().max()) <= 1e-9


def test_resume_continues_exactly(tiny_bert_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = run(tiny_bert_dir, tmp_path / "straight", NESTEROV, rounds=3)
    crash_at_local_step(monkeypatch, 2 * 2 + 1)  # dies in round 3: the momentum of rounds 1-2 is on disk only
    with pytest.raises(RuntimeError, match="power cut"):
        run(tiny_bert_dir, tmp_path / "resumed", NESTEROV, rounds=3)
    monkeypatch.undo()
    resumed = run(tiny_bert_dir, tmp_path / "resumed", NESTEROV, rounds=3, resume=True)
    assert resumed["final"]["train_loss"] == straight["final"]["train_loss"]
    assert resumed["final"]["consensus_test"] == straight["final"]["consensus_test"]
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "resumed")
    assert torch.equal(a["host.adapters"], b["host.adapters"])
    assert torch.equal(a["outer.momentum"], b["outer.momentum"]) and float(a["outer.momentum"].abs().max()) > 0


def test_momentum_that_does_not_fit_is_refused(small_peers) -> None:
    with pytest.raises(ValueError, match=r"momentum of shape \(2, 3\) does not fit"):
        OuterOptimizer(small_peers).load_state_dict({"momentum": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="no outer-optimizer momentum"):
        OuterOptimizer(small_peers).load_state_dict({})
    with pytest.raises(ValueError, match="outer_momentum is 0"):
        OuterOptimizer(small_peers, momentum=0.0).load_state_dict({"momentum": torch.zeros(3, 1)})


@pytest.mark.parametrize(("sets", "message"), [
    (["network.outer_optimizer=adam"], "unknown outer_optimizer 'adam'; choose one of none, nesterov"),
    (["network.outer_optimizer=nesterov", "network.mixer=decaf"], "which mixer decaf re-bases"),
    (["network.outer_optimizer=nesterov", "network.mixer=dora_exact"], "which mixer dora_exact re-bases"),
    (["network.outer_optimizer=nesterov", "network.mixer=local"], "mixer local do not mix"),
    (["network.outer_optimizer=nesterov", "network.mixer=centralized"], "mode centralized"),
    (["network.outer_lr=0"], "outer_lr"),
    (["network.outer_lr=.inf"], "outer_lr"),
    (["network.outer_momentum=1"], "outer_momentum"),
    (["network.outer_momentum=-0.1"], "outer_momentum"),
])
def test_bad_settings_give_one_clear_line(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(SimulateConfig, None, sets)
    assert "\n" not in str(caught.value)


def test_hook_refuses_what_the_config_refuses(small_peers) -> None:
    peers = small_peers
    with pytest.raises(ValueError, match="outer_lr must be a positive finite number"):
        OuterOptimizer(peers, lr=0.0)
    with pytest.raises(ValueError, match=r"outer_momentum must be in \[0, 1\)"):
        OuterOptimizer(peers, momentum=1.0)
    with pytest.raises(ValueError, match="mixer decaf re-bases"):
        OuterOptimizer(peers, mixer="decaf", factors_replaced=True)
    with pytest.raises(RuntimeError, match="before begin_round"):
        OuterOptimizer(peers).after_mix([], [])
