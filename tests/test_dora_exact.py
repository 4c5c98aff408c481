"""DoRA-exact consensus against dense fp64 merged weights, and against DeCAF."""

from __future__ import annotations

import pytest
import torch

from d2ora.dora.math import merged_weight
from d2ora.engine.consensus import merged_distance
from d2ora.mixers import DecafMixer, DoraExactMixer, FedAvgExactMixer, LayerStack, Neighbourhoods, mix_stacks
from d2ora.mixers.dora_exact import dora_exact_factors
from d2ora.topology import build_topology, mixing_matrix

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: BLAS thread hand-off would dominate
    yield
    torch.set_num_threads(before)


def ring(peers: int) -> torch.Tensor:
    return torch.as_tensor(mixing_matrix(build_topology("ring", peers), "metropolis_hastings"), dtype=F64)


def peers_stack(peers: int, w0: torch.Tensor, r: int, *, seed: int, shared_a: bool = False, dora: bool = True,
                spread: float = 0.3) -> LayerStack:
    """Trained-looking adapters: B, A of a size comparable to W0, magnitudes around W0's row norms."""
    g = torch.Generator().manual_seed(seed)
    out, n_in = w0.shape
    a = torch.randn(1 if shared_a else peers, r, n_in, generator=g, dtype=F64) / n_in ** 0.5
    a = a.expand(peers, r, n_in).clone()
    b = torch.randn(peers, out, r, generator=g, dtype=F64) * 0.5
    m = w0.norm(dim=1) * (1 + spread * torch.randn(peers, out, generator=g, dtype=F64)).abs() if dora else None
    return LayerStack(lora_a=a, lora_b=b, magnitude=m, scaling=2.0)


def dense_merged(w0: torch.Tensor, stack: LayerStack) -> torch.Tensor:
    """(P, out, in) merged weights, dense fp64: the reference."""
    return torch.stack([
        merged_weight(w0, stack.lora_a[p], stack.lora_b[p], stack.scaling, None if stack.magnitude is None else stack.magnitude[p])
        for p in range(stack.lora_a.shape[0])
    ])


def test_without_truncation_the_new_merged_weight_is_the_mean_merged_weight() -> None:
    """Peers sharing A: D = Σ diag(c_j) B_j A has rank ≤ r, so every receiver's new merged weight
    is exactly its weighted mean of the neighbours' merged weights."""
    w0 = torch.randn(12, 10, dtype=F64, generator=torch.Generator().manual_seed(1))
    stack = peers_stack(5, w0, r=3, seed=2, shared_a=True)
    weights = ring(5)
    out = mix_stacks(DoraExactMixer(), {"q": stack}, weights, base_weights={"q": w0})
    got = dense_merged(w0, out.layers["q"])
    expected = torch.einsum("ij,jab->iab", weights, dense_merged(w0, stack))
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_with_truncation_it_is_the_best_rank_r_fit_at_the_mean_scale() -> None:
    """General adapters: the error against the mean merged weight equals the Eckart–Young tail of
    diag(ḡ)·s·D (dense SVD), and no other rank-r adapter at scale ḡ does better (DeCAF's product)."""
    w0 = torch.randn(9, 7, dtype=F64, generator=torch.Generator().manual_seed(3))
    stack = peers_stack(4, w0, r=2, seed=4)
    weights = torch.full((1, 4), 0.25, dtype=F64)
    hood = Neighbourhoods(layers={"q": LayerStack(stack.lora_a[None], stack.lora_b[None], stack.magnitude[None], 2.0)},
                          weights=weights, own=torch.zeros(1, dtype=torch.long), base_weights={"q": w0})
    new = DoraExactMixer().mix(hood).layers["q"]
    got = merged_weight(w0, new.lora_a[0], new.lora_b[0], 2.0, new.magnitude[0])
    mean = dense_merged(w0, stack).mean(0)
    # ḡ and diag(ḡ)·s·D from the dense definitions.
    g = torch.stack([stack.magnitude[p] / (w0 + 2.0 * stack.lora_b[p] @ stack.lora_a[p]).norm(dim=1) for p in range(4)])
    g_bar = g.mean(0)
    target = sum(0.25 * g[p, :, None] * 2.0 * (stack.lora_b[p] @ stack.lora_a[p]) for p in range(4))
    sigma = torch.linalg.svdvals(target)
    tail = float(sigma[2:].square().sum().sqrt())
    assert float((got - mean).norm()) == pytest.approx(tail, rel=1e-8)
    decaf = DecafMixer().mix(hood).layers["q"]
    decaf_at_mean_scale = g_bar[:, None] * (w0 + 2.0 * decaf.lora_b[0] @ decaf.lora_a[0])
    assert float((decaf_at_mean_scale - mean).norm()) > tail


def test_lora_equals_decaf() -> None:
    w0 = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(5))
    stack = peers_stack(6, w0, r=2, seed=6, dora=False)
    weights = ring(6)
    exact = mix_stacks(DoraExactMixer(), {"q": stack}, weights, base_weights={"q": w0}).layers["q"]
    decaf = mix_stacks(DecafMixer(), {"q": stack}, weights).layers["q"]
    assert exact.magnitude is None
    torch.testing.assert_close(exact.lora_b @ exact.lora_a, decaf.lora_b @ decaf.lora_a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_one_mix_leaves_the_merged_weights_closer_than_decaf(seed: int) -> None:
    w0 = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(100 + seed))
    stack = peers_stack(8, w0, r=3, seed=seed, spread=0.5)
    weights = ring(8)
    sq = w0.square().sum(1)
    before = merged_distance(w0, sq, stack.lora_a, stack.lora_b, stack.magnitude, 2.0)
    exact = mix_stacks(DoraExactMixer(), {"q": stack}, weights, base_weights={"q": w0}).layers["q"]
    decaf = mix_stacks(DecafMixer(), {"q": stack}, weights).layers["q"]
    d_exact = merged_distance(w0, sq, exact.lora_a, exact.lora_b, exact.magnitude, 2.0)
    d_decaf = merged_distance(w0, sq, decaf.lora_a, decaf.lora_b, decaf.magnitude, 2.0)
    assert d_exact < d_decaf < before


def test_zero_rows_stay_zero_and_finite() -> None:
    """A zero row of W0 whose magnitude is 0 everywhere: ḡ is 0 there; the row stays 0, no NaN."""
    w0 = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(7))
    w0[2] = 0
    stack = peers_stack(3, w0, r=2, seed=8)
    stack.lora_b[:, 2] = 0
    stack.magnitude[:, 2] = 0
    out = mix_stacks(DoraExactMixer(), {"q": stack}, ring(3), base_weights={"q": w0}).layers["q"]
    assert torch.isfinite(out.lora_a).all() and torch.isfinite(out.lora_b).all() and torch.isfinite(out.magnitude).all()
    merged = dense_merged(w0, out)
    assert merged[:, 2].abs().max() == 0
    expected = torch.einsum("ij,jab->iab", ring(3), dense_merged(w0, stack))
    assert float((merged - expected).norm() / expected.norm()) < 0.5  # the other rows are still mixed


def test_all_zero_adapters_at_start_keep_the_base() -> None:
    """Round 1 of a run: B = 0 everywhere and m = ||W0||_c: the mix is the start adapter's W0."""
    w0 = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    a = torch.randn(4, 2, 5, dtype=F64)
    stack = LayerStack(lora_a=a, lora_b=torch.zeros(4, 7, 2, dtype=F64), magnitude=w0.norm(dim=1).expand(4, 7).clone(), scaling=2.0)
    out = mix_stacks(DoraExactMixer(), {"q": stack}, ring(4), base_weights={"q": w0}).layers["q"]
    torch.testing.assert_close(dense_merged(w0, out), w0.expand(4, 7, 5))
    assert (out.lora_a.norm(dim=-1) > 0).all()  # restarted A rows can train again (DeCAF's rule)


def test_bf16_and_missing_base_weights() -> None:
    w0 = torch.randn(8, 6, generator=torch.Generator().manual_seed(10))
    stack = peers_stack(4, w0.double(), r=2, seed=11)
    half = LayerStack(stack.lora_a.bfloat16(), stack.lora_b.bfloat16(), stack.magnitude.bfloat16(), 2.0)
    out = mix_stacks(DoraExactMixer(), {"q": half}, ring(4).float(), base_weights={"q": w0.bfloat16()}).layers["q"]
    assert out.lora_b.dtype == torch.bfloat16 and torch.isfinite(out.magnitude.float()).all()
    with pytest.raises(ValueError, match="dora_exact needs every adapted layer's frozen base weight"):
        mix_stacks(DoraExactMixer(), {"q": half}, ring(4).float())
    with pytest.raises(ValueError, match="base weight has shape"):
        dora_exact_factors(stack.lora_b[None], stack.lora_a[None], stack.magnitude[None], torch.full((1, 4), 0.25, dtype=F64),
                           w0.double().T, 2.0)


def test_fedavg_exact_is_the_same_rule_over_the_whole_federation() -> None:
    w0 = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(12))
    stack = peers_stack(4, w0, r=2, seed=13)
    server = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64).expand(4, 4)
    fed = mix_stacks(FedAvgExactMixer(), {"q": stack}, server, base_weights={"q": w0}).layers["q"]
    gossip = mix_stacks(DoraExactMixer(), {"q": stack}, server, base_weights={"q": w0}).layers["q"]
    torch.testing.assert_close(fed.lora_b, gossip.lora_b)
    assert FedAvgExactMixer.federated and not getattr(DoraExactMixer, "federated", False)
