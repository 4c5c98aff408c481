"""Mixers: each aggregation rule against an independent dense reference."""

from __future__ import annotations

import pytest
import torch

from d2ora.mixers import (
    MIXERS,
    D2oraMixer,
    DecafMixer,
    DimatMixer,
    FedAvgMixer,
    LayerStack,
    LocalMixer,
    Neighbourhoods,
    make_mixer,
    mix_stacks,
)
from d2ora.topology import MixingMatrixError, fedavg_weights
from d2ora.mixers.decaf import decaf_factors
from d2ora.mixers.dimat import align_factors

F64 = torch.float64


def run_mix(mixer, layers, weights, dense=None, layer_inputs=None, base_weights=None):
    """Every peer of (P, ...) stacks mixed over a (P, P) matrix: one per-neighbourhood call per degree."""
    return mix_stacks(mixer, layers, weights, dense=dense, layer_inputs=layer_inputs, base_weights=base_weights)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every matrix here is tiny; on a shared 2-core machine BLAS's thread hand-off costs ~20 ms per
    # matmul (measured), 1000x the work itself. Restored afterwards for the other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def random_stack(peers: int, out: int, r: int, n_in: int, *, dora: bool = True, dtype=F64, seed: int = 0,
                 scaling: float = 2.0) -> LayerStack:
    g = torch.Generator().manual_seed(seed)
    return LayerStack(
        lora_a=torch.randn(peers, r, n_in, generator=g, dtype=dtype),
        lora_b=torch.randn(peers, out, r, generator=g, dtype=dtype),
        magnitude=torch.rand(peers, out, generator=g, dtype=dtype) + 0.5 if dora else None,
        scaling=scaling,
    )


def near_consensus_stack(peers: int, out: int, r: int, n_in: int, *, noise: float, dtype=F64, seed: int = 0) -> LayerStack:
    """Peers = one shared adapter + independent noise: the regime gossip actually runs in, and one
    where the rank-r truncation is well conditioned (clear gap after σ_r)."""
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, n_in, generator=g, dtype=dtype)
    b0 = torch.randn(out, r, generator=g, dtype=dtype)
    return LayerStack(
        lora_a=a0 + noise * torch.randn(peers, r, n_in, generator=g, dtype=dtype),
        lora_b=b0 + noise * torch.randn(peers, out, r, generator=g, dtype=dtype),
        magnitude=torch.rand(peers, out, generator=g, dtype=dtype) + 0.5,
        scaling=2.0,
    )


def ring_weights(peers: int, dtype=F64) -> torch.Tensor:
    """1/3 on self and on both ring neighbours (doubly stochastic, connected)."""
    w = torch.zeros(peers, peers, dtype=dtype)
    for i in range(peers):
        for j in (i - 1, i, i + 1):
            w[i, j % peers] = 1.0 / 3.0
    return w


def complete_weights(peers: int, dtype=F64) -> torch.Tensor:
    return torch.full((peers, peers), 1.0 / peers, dtype=dtype)


def products(stack: LayerStack) -> torch.Tensor:
    return stack.scaling * stack.lora_b @ stack.lora_a  # (P, out, in), dense: tests only


def dense_truncated_mix(stack: LayerStack, weights: torch.Tensor, peer: int, rank: int) -> torch.Tensor:
    """Reference: form M_i = Σ_j W[i,j] s B_j A_j densely, full SVD, keep the top ``rank``."""
    m = torch.einsum("j,joi->oi", weights[peer].to(stack.lora_a.dtype), products(stack))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def consensus_distance(x: torch.Tensor) -> float:
    """(1/n) Σ_i ‖x_i − x̄‖²."""
    flat = x.reshape(x.shape[0], -1)
    return float((flat - flat.mean(0)).square().sum() / flat.shape[0])


# --------------------------------------------------------------------------------------- DeCAF


@pytest.mark.parametrize(
    ("out", "r", "n_in"),
    [(48, 4, 40), (7, 4, 9), (8, 3, 64)],  # ordinary; (deg+1)·r = 12 > out, in; out < (deg+1)·r < in
)
def test_decaf_matches_dense_svd_truncation_fp64(out, r, n_in):
    stack = random_stack(5, out, r, n_in, seed=out)
    weights = ring_weights(5)
    mixed = run_mix(DecafMixer(), layers={"l": stack}, weights=weights).layers["l"]
    assert mixed.lora_b.shape == stack.lora_b.shape and mixed.lora_a.shape == stack.lora_a.shape
    got = products(mixed)
    for i in range(5):
        expected = dense_truncated_mix(stack, weights, i, r)
        assert rel(got[i], expected) < 1e-10, (i, rel(got[i], expected))


def test_decaf_rank_above_layer_size_pads_with_zero_components():
    # r = 6 > min(out, in) = 4: only 4 singular directions exist; the product is the full mix.
    stack = random_stack(3, 4, 6, 5, seed=1)
    weights = complete_weights(3)
    mixed = run_mix(DecafMixer(), layers={"l": stack}, weights=weights).layers["l"]
    expected = torch.einsum("j,joi->oi", weights[0], products(stack))
    assert rel(products(mixed)[0], expected) < 1e-12
    assert torch.isfinite(mixed.lora_a).all() and torch.isfinite(mixed.lora_b).all()


def test_decaf_fp32_matches_fp64_dense_reference():
    # Stated tolerance for fp32: 1e-5 relative against the fp64 dense route (measured ~9e-7), on a
    # near-consensus stack (well-separated σ_r / σ_{r+1}, as in real gossip). With a flat spectrum
    # (σ_{r+1} ≈ σ_r) the truncation itself is ill-conditioned and fp32 error grows for any route;
    # see benchmarks/aggregate.py.
    stack64 = near_consensus_stack(5, 96, 8, 80, noise=0.1, seed=3)
    stack32 = LayerStack(stack64.lora_a.float(), stack64.lora_b.float(), stack64.magnitude.float(), stack64.scaling)
    weights = ring_weights(5)
    mixed = run_mix(DecafMixer(), layers={"l": stack32}, weights=weights.float()).layers["l"]
    assert mixed.lora_a.dtype == torch.float32
    got = products(mixed).double()
    for i in range(5):
        assert rel(got[i], dense_truncated_mix(stack64, weights, i, 8)) < 1e-5


def test_decaf_reproduces_a_low_rank_mix_exactly():
    # All peers share A: the mixed product s(Σ w_j B_j)A has rank <= r, so truncation loses nothing.
    stack = random_stack(4, 30, 5, 25, seed=4)
    stack.lora_a[:] = stack.lora_a[0]
    weights = ring_weights(4)
    mixed = run_mix(DecafMixer(), layers={"l": stack}, weights=weights).layers["l"]
    exact = torch.einsum("ij,jxy->ixy", weights, products(stack))
    assert rel(products(mixed), exact) < 1e-10


def test_decaf_zero_singular_values_keep_a_alive():
    # Rank-deficient mix (rank 2 < r = 5) and the all-zero start (B = 0): B, A stay finite, the
    # product is exact, and no A row is zero (a zero B column with a zero A row could never train).
    g = torch.Generator().manual_seed(5)
    k, out, r, n_in = 3, 20, 5, 16
    a = torch.randn(k, r, n_in, generator=g, dtype=F64)
    b = torch.zeros(k, out, r, dtype=F64)
    b[..., :2] = torch.randn(k, out, 2, generator=g, dtype=F64)
    a[:] = a[0]  # shared A so the mix has rank 2 exactly
    w = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    new_b, new_a = decaf_factors(b, a, w, 2.0)
    exact = 2.0 * torch.einsum("j,jxr,jry->xy", w, b, a)
    assert rel(2.0 * new_b @ new_a, exact) < 1e-10
    assert new_a.norm(dim=-1).min() > 0.1 * a.norm(dim=-1).mean()
    assert new_b[:, 2:].abs().max() < 1e-10 * new_b.abs().max()

    zero_b, fresh_a = decaf_factors(torch.zeros_like(b), a, w, 2.0)
    assert torch.equal(zero_b, torch.zeros_like(zero_b))
    assert torch.isfinite(fresh_a).all()
    gram = fresh_a @ fresh_a.T  # orthogonal rows at the neighbourhood's RMS row norm
    rms_sq = float(a.square().sum(-1).mean())
    torch.testing.assert_close(gram, rms_sq * torch.eye(r, dtype=F64), rtol=0, atol=1e-10 * rms_sq)


def test_decaf_is_deterministic_and_sign_normalised():
    stack = random_stack(5, 30, 4, 20, seed=6)
    weights = ring_weights(5)
    one = run_mix(DecafMixer(), layers={"l": stack}, weights=weights).layers["l"]
    two = run_mix(DecafMixer(), layers={"l": stack}, weights=weights).layers["l"]
    assert torch.equal(one.lora_a, two.lora_a) and torch.equal(one.lora_b, two.lora_b)
    pivots = one.lora_b.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(one.lora_b, -2, pivots) > 0).all()


def test_decaf_beats_factor_averaging_on_the_average_product():
    # Consensus interference: one step of each, measured against Σ_j W[i,j] s B_j A_j (dense).
    stack = near_consensus_stack(6, 40, 4, 32, noise=0.5, seed=7)
    weights = ring_weights(6)
    target = torch.einsum("ij,jxy->ixy", weights, products(stack))
    inputs = dict(layers={"l": stack}, weights=weights)
    decaf = products(run_mix(DecafMixer(), **inputs).layers["l"])
    d2ora = products(run_mix(D2oraMixer(), **inputs).layers["l"])
    for i in range(6):
        # Eckart–Young: TSVD_r is the closest rank-r matrix, and d2ora's product has rank <= r.
        err_decaf, err_d2ora = rel(decaf[i], target[i]), rel(d2ora[i], target[i])
        assert err_decaf < err_d2ora, (i, err_decaf, err_d2ora)
    # With the same rank budget, DeCAF removes the cross terms w_j w_l B_j A_l, leaving only the
    # truncation tail.
    assert rel(decaf, target) < 0.95 * rel(d2ora, target)


# --------------------------------------------------------------------------------------- D²ORA


def test_d2ora_complete_graph_gives_global_mean():
    stack = random_stack(5, 12, 3, 10, seed=8)
    head = torch.randn(5, 4, 7, dtype=F64)
    out = run_mix(D2oraMixer(), layers={"l": stack}, dense={"head": head}, weights=complete_weights(5))
    mixed = out.layers["l"]
    for got, src in [(mixed.lora_a, stack.lora_a), (mixed.lora_b, stack.lora_b),
                     (mixed.magnitude, stack.magnitude), (out.dense["head"], head)]:
        torch.testing.assert_close(got, src.mean(0, keepdim=True).expand_as(src), rtol=0, atol=1e-12)


def test_repeated_mixing_on_a_ring_reaches_consensus():
    stack = random_stack(6, 16, 3, 12, seed=9)
    weights = ring_weights(6)
    start_m, start_b = consensus_distance(stack.magnitude), consensus_distance(stack.lora_b)
    start_prod = consensus_distance(products(stack))
    d2, dc = stack, stack
    for _ in range(40):
        d2 = run_mix(D2oraMixer(), layers={"l": d2}, weights=weights).layers["l"]
        dc = run_mix(DecafMixer(), layers={"l": dc}, weights=weights).layers["l"]
    # Ring of 6 with 1/3 weights: λ₂ = 2/3, so squared distances shrink by (2/3)^80 ≈ 1e-14.
    assert consensus_distance(d2.magnitude) < 1e-10 * start_m
    assert consensus_distance(d2.lora_b) < 1e-10 * start_b
    assert consensus_distance(products(dc)) < 1e-6 * start_prod
    assert consensus_distance(dc.magnitude) < 1e-10 * start_m


# --------------------------------------------------------------------------------------- DIMAT


def permuted_peer(a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor):
    """A_j = D P A_i, B_j = B_i Pᵀ D: row k of A_j is signs[k]·A_i[perm[k]]."""
    return signs[:, None] * a[perm], b[:, perm] * signs


def test_dimat_recovers_a_known_permutation_and_sign_flip():
    g = torch.Generator().manual_seed(10)
    r, out, n_in = 6, 14, 20
    a0 = torch.randn(r, n_in, generator=g, dtype=F64)
    b0 = torch.randn(out, r, generator=g, dtype=F64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    a1, b1 = permuted_peer(a0, b0, perm, signs)
    torch.testing.assert_close(b1 @ a1, b0 @ a0)  # the construction is a pure reparametrisation

    x = torch.randn(64, n_in, generator=g, dtype=F64)
    a_al, b_al, _, _ = align_factors(x, a0, a1, b1)
    torch.testing.assert_close(a_al, a0, rtol=0, atol=1e-12)
    torch.testing.assert_close(b_al, b0, rtol=0, atol=1e-12)

    stack = LayerStack(torch.stack([a0, a1]), torch.stack([b0, b1]), torch.rand(2, out, dtype=F64), 2.0)
    mixed = run_mix(DimatMixer(), layers={"l": stack}, weights=complete_weights(2), layer_inputs=lambda peer, layer: x).layers["l"]
    # Aligned, the two peers are the same adapter, so averaging returns each peer's own factors.
    torch.testing.assert_close(mixed.lora_a[0], a0, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.lora_b[0], b0, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.lora_a[1], a1, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.lora_b[1], b1, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.magnitude, stack.magnitude.mean(0).expand(2, out))
    # Unaligned averaging would have mixed unrelated components:
    plain = run_mix(D2oraMixer(), layers={"l": stack}, weights=complete_weights(2)).layers["l"]
    assert rel(plain.lora_a[0], a0) > 0.3


def test_dimat_alignment_never_changes_a_neighbours_product():
    stack = random_stack(2, 10, 5, 12, seed=11)
    x = torch.randn(40, 12, dtype=F64)
    a_al, b_al, perm, _ = align_factors(x, stack.lora_a[0], stack.lora_a[1], stack.lora_b[1])
    assert sorted(perm.tolist()) == list(range(5))
    torch.testing.assert_close(b_al @ a_al, stack.lora_b[1] @ stack.lora_a[1], rtol=0, atol=1e-12)


def test_dimat_uses_each_peers_own_inputs_and_only_neighbours():
    stack = random_stack(5, 8, 3, 6, seed=12)
    g = torch.Generator().manual_seed(12)
    batches = {i: torch.randn(2, 16, 6, generator=g, dtype=F64) for i in range(5)}  # (batch, seq, in)
    seen: list[tuple[int, str]] = []

    def layer_inputs(peer: int, layer: str) -> torch.Tensor:
        seen.append((peer, layer))
        return batches[peer]

    weights = ring_weights(5)
    base = run_mix(DimatMixer(), layers={"l": stack}, weights=weights, layer_inputs=layer_inputs).layers["l"]
    assert sorted(seen) == [(i, "l") for i in range(5)]  # one batch per peer and layer, its own
    # Peer 0's result depends only on peers 4, 0, 1: changing peer 2 leaves it unchanged.
    other = LayerStack(stack.lora_a.clone(), stack.lora_b.clone(), stack.magnitude, stack.scaling)
    other.lora_a[2] += 1.0
    again = run_mix(DimatMixer(), layers={"l": other}, weights=weights, layer_inputs=layer_inputs).layers["l"]
    torch.testing.assert_close(again.lora_a[0], base.lora_a[0], rtol=0, atol=0)
    assert not torch.allclose(again.lora_a[1], base.lora_a[1])


def test_dimat_without_layer_inputs_is_a_clear_error():
    stack = random_stack(3, 4, 2, 5)
    with pytest.raises(ValueError, match="layer_inputs"):
        run_mix(DimatMixer(), layers={"l": stack}, weights=ring_weights(3))


# ------------------------------------------------------------------------------- FedAvg, local


def test_fedavg_gives_every_peer_the_weighted_global_mean():
    stack = random_stack(4, 6, 2, 5, seed=13)
    head = torch.randn(4, 3, dtype=F64)
    counts = [10.0, 30.0, 5.0, 55.0]
    # FedAvg's neighbourhood is every peer with the server's shard-size weights (one place: topology).
    weights = torch.as_tensor(fedavg_weights(counts))
    out = run_mix(FedAvgMixer(), layers={"l": stack}, dense={"head": head}, weights=weights)
    p = torch.tensor(counts, dtype=F64) / 100.0
    for got, src in [(out.layers["l"].lora_a, stack.lora_a), (out.layers["l"].lora_b, stack.lora_b),
                     (out.layers["l"].magnitude, stack.magnitude), (out.dense["head"], head)]:
        mean = torch.einsum("j,j...->...", p, src)
        torch.testing.assert_close(got, mean.expand_as(src), rtol=0, atol=1e-12)
    uniform = run_mix(FedAvgMixer(), layers={"l": stack}, weights=torch.as_tensor(fedavg_weights([1.0] * 4))).layers["l"]
    torch.testing.assert_close(uniform.lora_b, stack.lora_b.mean(0).expand_as(stack.lora_b))
    uniform.lora_b[0].zero_()  # every peer holds its own copy
    assert uniform.lora_b[1].abs().sum() > 0
    with pytest.raises(MixingMatrixError, match="non-negative|>= 0"):
        fedavg_weights([1.0, -1.0, 1.0, 1.0])


def test_local_returns_each_peers_own_adapter():
    stack = random_stack(3, 5, 2, 4)
    head = torch.randn(3, 2)
    # Even handed a ring's neighbourhoods, the rule keeps the receiver's own values exactly.
    out = run_mix(LocalMixer(), layers={"l": stack}, dense={"head": head}, weights=ring_weights(3))
    assert torch.equal(out.layers["l"].lora_a, stack.lora_a) and torch.equal(out.layers["l"].lora_b, stack.lora_b)
    assert torch.equal(out.layers["l"].magnitude, stack.magnitude) and torch.equal(out.dense["head"], head)


# ------------------------------------------------------------------------ the neighbourhood contract


@pytest.mark.parametrize("name", ["d2ora", "decaf", "dimat"])
def test_a_receiver_needs_only_its_own_neighbourhood_in_any_order(name):
    """One receiver's mix from its k neighbours alone (own adapter at any position) equals its row
    of the whole-graph mix: the mixer never needs the global matrix or other peers' rows."""
    stack = random_stack(5, 8, 3, 6, seed=21)
    head = torch.randn(5, 3, 6, dtype=F64)
    x = torch.randn(40, 6, dtype=F64, generator=torch.Generator().manual_seed(21))
    weights = ring_weights(5)
    whole = run_mix(make_mixer(name), {"l": stack}, weights, dense={"head": head}, layer_inputs=lambda peer, layer: x)
    receiver, nbrs = 2, [3, 2, 1]  # own adapter in the middle
    index = torch.tensor([nbrs])
    hood = Neighbourhoods(
        layers={"l": LayerStack(stack.lora_a[index], stack.lora_b[index], stack.magnitude[index], stack.scaling)},
        dense={"head": head[index]}, weights=weights[receiver, nbrs].unsqueeze(0), own=torch.tensor([1]),
        layer_inputs=lambda row, layer: x,
    )
    alone = make_mixer(name).mix(hood)
    for got, want in [(alone.layers["l"].lora_a[0], whole.layers["l"].lora_a[receiver]),
                      (alone.layers["l"].lora_b[0], whole.layers["l"].lora_b[receiver]),
                      (alone.layers["l"].magnitude[0], whole.layers["l"].magnitude[receiver]),
                      (alone.dense["head"][0], whole.dense["head"][receiver])]:
        assert rel(got, want) < 1e-12


def test_neighbourhood_checks_name_the_problem():
    stack = random_stack(1, 4, 2, 5)
    index = torch.zeros(1, 3, dtype=torch.long)
    layers = {"l": LayerStack(stack.lora_a[index], stack.lora_b[index], stack.magnitude[index], 2.0)}
    with pytest.raises(ValueError, match=r"\(1, 2\).*l.lora_a"):
        D2oraMixer().mix(Neighbourhoods(layers=layers, weights=torch.full((1, 2), 0.5), own=torch.tensor([0])))
    with pytest.raises(ValueError, match="finite and non-negative"):
        D2oraMixer().mix(Neighbourhoods(layers=layers, weights=torch.tensor([[0.5, float("nan"), 0.5]]), own=torch.tensor([0])))
    with pytest.raises(ValueError, match="own"):
        D2oraMixer().mix(Neighbourhoods(layers=layers, weights=torch.full((1, 3), 1 / 3), own=torch.tensor([3])))


# ------------------------------------------------------------------------------- all mixers


def _inputs(dora: bool, dtype=F64) -> dict:
    stack = random_stack(4, 9, 3, 7, dora=dora, dtype=dtype, seed=14)
    return dict(
        layers={"q": stack, "v": random_stack(4, 5, 3, 7, dora=dora, dtype=dtype, seed=15)},
        dense={"head": torch.randn(4, 3, 7, dtype=dtype)},
        weights=ring_weights(4),
        layer_inputs=lambda peer, layer: torch.randn(32, 7, dtype=dtype),
        base_weights={"q": torch.randn(9, 7, dtype=dtype), "v": torch.randn(5, 7, dtype=dtype)},
    )


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_every_mixer_handles_dora_and_lora_stacks(name, dora):
    inputs = _inputs(dora)
    out = run_mix(make_mixer(name), **inputs)
    assert out.layers.keys() == inputs["layers"].keys() and out.dense.keys() == inputs["dense"].keys()
    for key, stack in inputs["layers"].items():
        got = out.layers[key]
        assert got.lora_a.shape == stack.lora_a.shape and got.lora_b.shape == stack.lora_b.shape
        assert got.lora_a.dtype == stack.lora_a.dtype and got.scaling == stack.scaling
        assert (got.magnitude is None) == (not dora)
        assert torch.isfinite(got.lora_a).all() and torch.isfinite(got.lora_b).all()


@pytest.mark.parametrize("name", ["d2ora", "decaf", "dimat"])
def test_gossip_mixers_mix_dense_and_magnitude_linearly(name):
    inputs = _inputs(True)
    out = run_mix(make_mixer(name), **inputs)
    w = inputs["weights"]
    torch.testing.assert_close(out.dense["head"], torch.einsum("ij,j...->i...", w, inputs["dense"]["head"]))
    torch.testing.assert_close(out.layers["q"].magnitude, w @ inputs["layers"]["q"].magnitude)


@pytest.mark.parametrize("name", ["d2ora", "decaf", "dimat", "dora_exact"])
def test_bf16_stacks_keep_their_dtype(name):
    out = run_mix(make_mixer(name), **_inputs(True, dtype=torch.bfloat16))
    assert out.layers["q"].lora_a.dtype == torch.bfloat16
    assert torch.isfinite(out.layers["q"].lora_b.float()).all()


def test_wrong_mixing_matrix_shape_is_an_error():
    inputs = _inputs(True)
    inputs["weights"] = ring_weights(3)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\[4\] peers"):
        run_mix(D2oraMixer(), **inputs)


def test_make_mixer_registry():
    assert set(MIXERS) == {"d2ora", "decaf", "dimat", "dora_exact", "fedavg", "fedavg_exact", "fedavg_products", "local"}
    for name, cls in MIXERS.items():
        mixer = make_mixer(name)
        assert isinstance(mixer, cls) and mixer.name == name
    with pytest.raises(ValueError, match="unknown mixer 'gossip'.*d2ora, decaf, dimat, dora_exact, fedavg, fedavg_exact, fedavg_products, local"):
        make_mixer("gossip")
    assert MIXERS["decaf"].factors_replaced and not MIXERS["d2ora"].factors_replaced
    assert MIXERS["dimat"].needs_layer_inputs and not MIXERS["decaf"].needs_layer_inputs
