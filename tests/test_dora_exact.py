"""DoRA-exact consensus against dense fp64 merged weights, and against DeCAF."""

from __future__ import annotations

import pytest
import torch

from d2ora.dora.math import merged_weight
from d2ora.engine.consensus import merged_distance
from d2ora.mixers import DecafMixer, DoraExactMixer, FedAvgExactMixer, LayerStack, Neighbourhoods, make_mixer, mix_stacks
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


def test_with_truncation_the_fixed_scale_rule_is_the_best_rank_r_fit_at_the_mean_scale() -> None:
    """General adapters, ``scale_iterations=0``: the error against the mean merged weight equals the
    Eckart–Young tail of diag(ḡ)·s·D (dense SVD), and no other rank-r adapter at scale ḡ does better
    (DeCAF's product). The default (scale optimised too) is closer still."""
    w0 = torch.randn(9, 7, dtype=F64, generator=torch.Generator().manual_seed(3))
    stack = peers_stack(4, w0, r=2, seed=4)
    weights = torch.full((1, 4), 0.25, dtype=F64)
    hood = Neighbourhoods(layers={"q": LayerStack(stack.lora_a[None], stack.lora_b[None], stack.magnitude[None], 2.0)},
                          weights=weights, own=torch.zeros(1, dtype=torch.long), base_weights={"q": w0})
    new = DoraExactMixer(scale_iterations=0).mix(hood).layers["q"]
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
    best = DoraExactMixer().mix(hood).layers["q"]
    assert float((merged_weight(w0, best.lora_a[0], best.lora_b[0], 2.0, best.magnitude[0]) - mean).norm()) < tail * 0.999


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


def random_case(seed: int) -> tuple[torch.Tensor, LayerStack, torch.Tensor]:
    """A random layer, peers with distinct A and a random mixing matrix (uneven weights, some links
    missing, so receivers come in groups of different neighbourhood sizes)."""
    g = torch.Generator().manual_seed(1000 + seed)
    out, n_in = (int(v) for v in torch.randint(3, 17, (2,), generator=g))
    peers, r = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    w0 = torch.randn(out, n_in, generator=g, dtype=F64)
    stack = peers_stack(peers, w0, r, seed=seed, spread=0.1 + 0.7 * float(torch.rand(1, generator=g)))
    stack.scaling = 0.5 + 3 * float(torch.rand(1, generator=g))
    links = (torch.rand(peers, peers, generator=g, dtype=F64) < 0.7) | torch.eye(peers, dtype=torch.bool)
    weights = torch.rand(peers, peers, generator=g, dtype=F64) * links
    return w0, stack, weights / weights.sum(1, keepdim=True)


def dense_baselines(w0: torch.Tensor, stack: LayerStack, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per receiver, dense: W̄, the fixed-scale rule's distance to it (the Eckart–Young tail of
    Σ_j w_j diag(g_j) s·B_j A_j) and the DeCAF-style merge's distance (dense TSVD of the mixed product,
    m mixed linearly)."""
    s, r = stack.scaling, stack.lora_a.shape[-2]
    products = s * stack.lora_b @ stack.lora_a  # (P, out, in)
    g = stack.magnitude / (w0 + products).norm(dim=-1)  # (P, out)
    mean = torch.einsum("ij,jab->iab", weights, g[..., None] * (w0 + products))
    fixed = torch.linalg.svdvals(torch.einsum("ij,jab->iab", weights, g[..., None] * products))[:, r:].norm(dim=-1)
    u, sigma, vh = torch.linalg.svd(torch.einsum("ij,jab->iab", weights, products), full_matrices=False)
    v_decaf = w0 + (u[..., :r] * sigma[:, None, :r]) @ vh[:, :r]  # r may exceed min(out, in): all kept
    decaf = (weights @ stack.magnitude / v_decaf.norm(dim=-1))[..., None] * v_decaf
    return mean, fixed, (decaf - mean).flatten(1).norm(dim=-1)


@pytest.mark.parametrize("seed", range(40))
def test_optimising_the_scale_is_never_worse_than_the_fixed_scale_rule_or_decaf(seed: int) -> None:
    """Against dense references only: the new merge's distance to W̄ is at most both baselines' (float
    noise aside), and strictly smaller (by > 0.1%) wherever the mean needs truncation."""
    w0, stack, weights = random_case(seed)
    mean, fixed, decaf = dense_baselines(w0, stack, weights)
    new = mix_stacks(DoraExactMixer(), {"q": stack}, weights, base_weights={"q": w0}).layers["q"]
    got = (dense_merged(w0, new) - mean).flatten(1).norm(dim=-1)
    scale = mean.flatten(1).norm(dim=-1)
    baseline = torch.minimum(fixed, decaf)
    assert (got <= baseline + 1e-9 * scale).all(), (got, fixed, decaf)
    truncated = fixed > 1e-6 * scale
    assert (got[truncated] < 0.999 * baseline[truncated]).all(), (got, fixed, decaf)


def test_the_alternation_only_moves_closer() -> None:
    """More rounds never give a farther merge (dense distances), and the improvement is real."""
    w0, stack, weights = random_case(3)
    mean, fixed, _ = dense_baselines(w0, stack, weights)
    distances = []
    for rounds in (0, 1, 2, 4, 16):
        new = mix_stacks(DoraExactMixer(scale_iterations=rounds, scale_tol=0.0), {"q": stack}, weights,
                         base_weights={"q": w0}).layers["q"]
        distances.append((dense_merged(w0, new) - mean).flatten(1).norm(dim=-1))
    torch.testing.assert_close(distances[0], fixed, rtol=1e-8, atol=1e-12)
    for before, after in zip(distances, distances[1:], strict=False):
        assert (after <= before * (1 + 1e-12)).all()
    assert (distances[-1] < 0.99 * distances[0]).all()


def test_factored_distance_and_scale_step_match_dense() -> None:
    """The coordinates of the module docstring against dense matrices: for an arbitrary candidate
    (c, z), ||diag(c)(W0 + z Q_Rᵀ) − W̄||² and the least-squares row scale ⟨W̄_o, V_o⟩ / ||V_o||²."""
    from d2ora.mixers.dora_exact import _ScaleProblem  # the private step functions under test

    w0 = torch.randn(11, 9, dtype=F64, generator=torch.Generator().manual_seed(20))
    stack = peers_stack(3, w0, r=2, seed=21)  # k·r = 6 < in = 9: rows have a W0⊥ part
    w = torch.tensor([[0.2, 0.5, 0.3]], dtype=F64)
    g = (stack.magnitude / (w0 + 2.0 * stack.lora_b @ stack.lora_a).norm(dim=-1))[None]
    g_bar = (w[..., None] * g).sum(1)
    no_zero_rows = torch.zeros_like(g_bar, dtype=torch.bool)
    problem = _ScaleProblem(stack.lora_b[None], stack.lora_a[None], w, g, g_bar, no_zero_rows, g_bar, w0, w0.square().sum(1),
                            2.0, rank=2)
    mean = torch.einsum("ij,jab->iab", w, dense_merged(w0, stack))[0]
    gen = torch.Generator().manual_seed(22)
    z = torch.randn(1, 11, 2, generator=gen, dtype=F64) @ torch.randn(1, 2, 6, generator=gen, dtype=F64)
    c = g_bar * (1 + 0.3 * torch.randn(1, 11, generator=gen, dtype=F64))
    v = w0 + z[0] @ problem.basis[0].mT
    assert float(problem.distance_sq(c, z)) == pytest.approx(float((c[0, :, None] * v - mean).square().sum()), rel=1e-10)
    expected_c = (mean * v).sum(1) / v.square().sum(1)
    torch.testing.assert_close(problem.scale_step(c, z)[0], expected_c, rtol=1e-10, atol=0)


def test_peers_sharing_a_and_lora_are_unchanged_by_the_scale_rounds() -> None:
    """Where the fixed-scale rule is already exact (shared A) or has no scale (LoRA), the rounds give
    the same merge as ``scale_iterations=0``."""
    w0 = torch.randn(12, 10, dtype=F64, generator=torch.Generator().manual_seed(23))
    for stack in (peers_stack(5, w0, r=3, seed=24, shared_a=True), peers_stack(5, w0, r=3, seed=25, dora=False)):
        fixed = mix_stacks(DoraExactMixer(scale_iterations=0), {"q": stack}, ring(5), base_weights={"q": w0}).layers["q"]
        new = mix_stacks(DoraExactMixer(), {"q": stack}, ring(5), base_weights={"q": w0}).layers["q"]
        torch.testing.assert_close(dense_merged(w0, new), dense_merged(w0, fixed), rtol=1e-9, atol=1e-12)


def test_scale_options() -> None:
    assert make_mixer("dora_exact", scale_iterations=3).scale_iterations == 3
    with pytest.raises(ValueError, match="scale_iterations must be an integer >= 0, got -1"):
        DoraExactMixer(scale_iterations=-1)
    with pytest.raises(ValueError, match="scale_tol must be a finite number >= 0, got nan"):
        FedAvgExactMixer(scale_tol=float("nan"))
