"""Drift corrections of the local steps (FedProx, QGM, K-GT) against hand computations, an explicit
proximal loss, gradient tracking's invariant, and an uninterrupted run (resume)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2ora.data.tasks import ClassificationTask
from d2ora.engine.drift import LocalCorrection, kept_coordinates, tangent_factors
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.metrics_log import read_rows
from d2ora.engine.peers import PeerModel
from d2ora.recipes.simulate import simulate
from tests.conftest import crash_at_local_step, simulate_config, stacked_tiny_classifier, tiny_features

PEERS = 3
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
TASK = ClassificationTask(label_names=["a", "b", "c"])


pytestmark = pytest.mark.usefixtures("one_thread")


def peer_model(path: str) -> PeerModel:
    return stacked_tiny_classifier(path, PEERS)


def features(seed: int) -> list[list[dict]]:
    return tiny_features(seed, PEERS)


def trainer(peers: PeerModel, **kw) -> LocalTrainer:
    return LocalTrainer(peers, TASK, TASK.collator(TOKENIZER), lr=5e-2, total_steps=4, max_grad_norm=0.5, **kw)


class ProximalTask:
    """The reference: the task's per-peer losses plus μ/2·||x_k − x_k,0||² written out as a loss,
    differentiated by autograd (no hook involved)."""

    def __init__(self, peers: PeerModel, anchor: torch.Tensor, mu: float) -> None:
        self.peers, self.anchor, self.mu = peers, anchor, mu

    def peer_losses(self, model, batch, count):
        losses = TASK.peer_losses(model, batch, count)
        views = self.peers.layout().views(self.anchor)
        prox = sum(((p - views[f"{m}.{n}"]) ** 2).flatten(1).sum(1) for m, _, n, p in self.peers.named_stacked())
        return losses + 0.5 * self.mu * prox


def test_fedprox_hook_equals_the_explicit_proximal_loss(one_layer_classifier_dir: str) -> None:
    mu = 0.7
    ours = peer_model(one_layer_classifier_dir)
    correction = LocalCorrection(ours, prox_mu=mu)
    hooked = trainer(ours, correction=correction)
    correction.begin_round()
    reference = peer_model(one_layer_classifier_dir)
    explicit = trainer(reference)
    explicit.task = ProximalTask(reference, reference.flat(), mu)
    for step in range(3):
        hooked.step(features(step))
        explicit.step(features(step))
    moved = (ours.flat() - correction.anchor).norm()
    assert moved > 0
    torch.testing.assert_close(ours.flat(), reference.flat(), rtol=1e-5, atol=1e-6)
    # And the term matters: without it the peers end elsewhere.
    plain_model = peer_model(one_layer_classifier_dir)
    plain = trainer(plain_model)
    for step in range(3):
        plain.step(features(step))
    assert (plain_model.flat() - ours.flat()).norm() > 1e-3 * moved


def test_qgm_by_hand(one_layer_classifier_dir: str) -> None:
    """m̂ ← β m̂ + (1 − β)(x_r − x_{r+1}) / Σ η; each step moves x by −η β m̂ (hand-computed)."""
    peers = peer_model(one_layer_classifier_dir)
    beta = 0.8
    corr = LocalCorrection(peers, "qgm", beta=beta)
    start = peers.flat()
    corr.begin_round()
    peers.load_flat(start + 0.01)  # what an optimizer step did
    corr.adjust_parameters(0.1)  # m̂ = 0: nothing added
    torch.testing.assert_close(peers.flat(), start + 0.01)
    mixed = start - 0.3
    peers.load_flat(mixed)  # after the mix
    corr.finish_round()
    momentum = (1 - beta) * (start - mixed) / 0.1
    torch.testing.assert_close(corr.state, momentum)
    corr.begin_round()
    corr.adjust_parameters(0.05)
    torch.testing.assert_close(peers.flat(), mixed - 0.05 * beta * momentum)


def test_corrections_skip_factors_a_mixer_rebases(one_layer_classifier_dir: str) -> None:
    peers = peer_model(one_layer_classifier_dir)
    layout = peers.layout()
    keep = kept_coordinates(layout, factors_replaced=True)
    kinds = {e.kind: bool(keep[e.offset]) for e in layout.entries}
    assert kinds == {"lora_A": False, "lora_B": False, "lora_magnitude_vector": True, "dense": True}
    assert kept_coordinates(layout, factors_replaced=False).all()
    corr = LocalCorrection(peers, "kgt", factors_replaced=True)
    corr.begin_round()
    corr.adjust_parameters(0.1)
    own = torch.randn(PEERS, layout.numel)
    corr.finish_round(own, torch.zeros_like(own))
    torch.testing.assert_close(corr.state, -own * keep / 0.1)


def dense_tangent_projection(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Reference: P_U X + X P_V − P_U X P_V with U, V orthonormal bases of B's columns and A's rows (dense SVD)."""
    u = torch.linalg.svd(b, full_matrices=False).U
    v = torch.linalg.svd(a.mT, full_matrices=False).U
    pu, pv = u @ u.mT, v @ v.mT
    return pu @ x + x @ pv - pu @ x @ pv


def test_tangent_factors_equal_the_dense_tangent_projection() -> None:
    g = torch.Generator().manual_seed(5)
    h, out, r, q, inp = 3, 9, 2, 5, 7
    left, right = torch.randn(h, out, q, generator=g, dtype=torch.float64), torch.randn(h, q, inp, generator=g, dtype=torch.float64)
    b, a = torch.randn(h, out, r, generator=g, dtype=torch.float64), torch.randn(h, r, inp, generator=g, dtype=torch.float64)
    delta_b, delta_a = tangent_factors(left, right, b, a)
    change = delta_b @ a + b @ delta_a
    for k in range(h):
        torch.testing.assert_close(change[k], dense_tangent_projection(left[k] @ right[k], b[k], a[k]))
    torch.testing.assert_close(b.mT @ delta_b, torch.zeros(h, r, r, dtype=torch.float64), atol=1e-10, rtol=0)
    # A direction already tangent at (B, A) keeps its product change exactly.
    m_b, m_a = torch.randn(h, out, r, generator=g, dtype=torch.float64), torch.randn(h, r, inp, generator=g, dtype=torch.float64)
    delta_b, delta_a = tangent_factors(torch.cat([m_b, b], -1), torch.cat([a, m_a], -2), b, a)
    torch.testing.assert_close(delta_b @ a + b @ delta_a, m_b @ a + b @ m_a)


def test_qgm_carries_factor_momentum_through_a_rebasing_mix(one_layer_classifier_dir: str) -> None:
    """Under a re-basing mixer QGM's A/B momentum is β·(old momentum's product change) + (1 − β)·(the
    round's product move)/Σ η, projected onto the tangent space at the new factors (dense reference);
    the magnitudes and the head follow the flat rule."""
    peers = peer_model(one_layer_classifier_dir)
    layout = peers.layout()
    beta, lr = 0.7, 0.1
    corr = LocalCorrection(peers, "qgm", beta=beta, factors_replaced=True)
    g = torch.Generator().manual_seed(9)
    corr.state.copy_(torch.randn(corr.state.shape, generator=g) * 0.1)  # a momentum from earlier rounds
    old_state = corr.state.clone()
    start = peers.flat()
    corr.begin_round()
    corr.adjust_parameters(lr)
    mixed = start + torch.randn(start.shape, generator=g) * 0.2  # new factors, new magnitudes, new head
    peers.load_flat(mixed)
    corr.finish_round()
    assert corr.transport_factors
    before, after, m_old, m_new = (layout.views(t) for t in (start, mixed, old_state, corr.state))
    for entry in layout.entries:
        if entry.kind in ("lora_magnitude_vector", "dense"):
            expected = beta * m_old[entry.key] + (1 - beta) * (before[entry.key] - after[entry.key]) / lr
            torch.testing.assert_close(m_new[entry.key], expected)
    for module in layout.scalings:
        b_key, a_key = f"{module}.lora_B", f"{module}.lora_A"
        for k in range(PEERS):
            b_r, a_r, b_n, a_n = (v[key][k].double() for v, key in ((before, b_key), (before, a_key), (after, b_key), (after, a_key)))
            old = m_old[b_key][k].double() @ a_r + b_r @ m_old[a_key][k].double()
            target = beta * old + (1 - beta) * (b_r @ a_r - b_n @ a_n) / lr
            got = m_new[b_key][k].double() @ a_n + b_n @ m_new[a_key][k].double()
            torch.testing.assert_close(got, dense_tangent_projection(target, b_n, a_n), rtol=1e-4, atol=1e-5)
    # K-GT has no such transport: its A/B entries stay uncorrected under a re-basing mixer.
    assert not LocalCorrection(peers, "kgt", factors_replaced=True).transport_factors


def test_bad_correction_settings(one_layer_classifier_dir: str) -> None:
    peers = peer_model(one_layer_classifier_dir)
    with pytest.raises(ValueError, match="unknown drift correction 'momentum'"):
        LocalCorrection(peers, "momentum")
    with pytest.raises(ValueError, match="drift_beta"):
        LocalCorrection(peers, "qgm", beta=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        LocalCorrection(peers, "qgm").load_state(torch.zeros(2, 3))


@pytest.mark.parametrize(("changes", "message"), [
    ({"drift": "kgt", "mixer": "local"}, "mixer local have none"),
    ({"drift": "qgm", "mixer": "centralized"}, "mode centralized"),
    ({"drift": "kgt", "robust": "centered_clipping"}, "robust: none"),
    ({"drift": "tracking"}, "unknown drift 'tracking'"),
    ({"prox_mu": -1}, "prox_mu"),
])
def test_config_refuses_undefined_combinations(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_config(**changes)


TINY = {
    "peers": 4, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
    "save_merged": False, "save_adapters": False, "tensorboard": False, "eval_peers": False, "mixer": "d2ora",
}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    simulate(simulate_config(**TINY, output_dir=out))
    return out


def test_kgt_doubles_the_bytes_and_its_corrections_sum_to_zero(plain_run: Path, tmp_path: Path) -> None:
    """Gradient tracking's invariant: with a doubly stochastic W (Metropolis–Hastings on a ring),
    Σ_i c_i stays 0, since Σ_i (Σ_j w_ij Δ_j − Δ_i) = 0."""
    summary = simulate(simulate_config(**TINY, drift="kgt", output_dir=tmp_path))
    plain, kgt = read_rows(plain_run), read_rows(tmp_path)
    assert kgt[1]["train_loss"] == plain[1]["train_loss"]  # c = 0 in round 1
    assert kgt[2]["train_loss"] != plain[2]["train_loss"]  # then it corrects
    assert kgt[-1]["bytes_sent_total"] == 2 * plain[-1]["bytes_sent_total"]
    assert summary["name"] == "d2ora+kgt" and summary["drift"] == "kgt"
    state = load_file(next((tmp_path / "checkpoints").rglob("state.safetensors")))["drift.state"]
    assert state.abs().max() > 0
    assert float(state.sum(0).abs().max()) < 1e-4 * float(state.abs().max())


def test_qgm_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = simulate(simulate_config(**{**TINY, "mixer": "decaf"}, drift="qgm", output_dir=tmp_path / "straight"))
    crash_at_local_step(monkeypatch, TINY["local_steps"] + 1)  # dies in round 2
    with pytest.raises(RuntimeError, match="power cut"):
        simulate(simulate_config(**{**TINY, "mixer": "decaf"}, drift="qgm", output_dir=tmp_path / "resumed"))
    monkeypatch.undo()
    resumed = simulate(simulate_config(**{**TINY, "mixer": "decaf"}, drift="qgm", output_dir=tmp_path / "resumed"), resume=True)
    assert resumed["final"]["consensus_test"] == straight["final"]["consensus_test"]
    assert resumed["final"]["train_loss"] == straight["final"]["train_loss"]
    assert resumed["final"]["consensus_distance"] == straight["final"]["consensus_distance"]
