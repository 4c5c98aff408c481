"""Byzantine-robust mixing: every rule against a straightforward loop over dense per-neighbour
vectors (factors, or the products s·B·A formed densely here in the tests only)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
import torch

from d2ora.mixers import (
    ROBUST_RULES,
    D2oraMixer,
    DecafMixer,
    DimatMixer,
    FedAvgMixer,
    LayerStack,
    LocalMixer,
    MixOutput,
    Neighbourhoods,
    RobustMixer,
    make_mixer,
    make_robust,
    mix_stacks,
    unwrapped,
)
from d2ora.mixers.robust import (
    COORDINATE_RULES,
    REWEIGHTING_RULES,
    centred_gram,
    check_neighbourhood,
    pairwise_sq_distances,
    robust_weights,
    sq_distances,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: BLAS thread hand-off would cost more than the work (see test_mixers.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ fixtures


def make_hood(g: int = 3, k: int = 6, *, seed: int = 0, noise: float = 0.3, uniform: bool = False,
              dtype=F64) -> Neighbourhoods:
    """g receivers, k members each: a DoRA layer, a LoRA layer and a dense head, near a shared
    adapter plus noise; random positive weights (or uniform) and the own adapter at a random column."""
    gen = torch.Generator().manual_seed(seed)

    def near(*shape):
        centre = torch.randn(*shape, generator=gen, dtype=F64)
        return (centre + noise * torch.randn(g, k, *shape, generator=gen, dtype=F64)).to(dtype)

    layers = {
        "q": LayerStack(near(3, 7), near(9, 3), near(9) + 3.0, 2.0),
        "v": LayerStack(near(3, 5), near(4, 3), None, 0.5),
    }
    weights = torch.full((g, k), 1.0 / k, dtype=F64) if uniform else torch.rand(g, k, generator=gen, dtype=F64) + 0.2
    weights = weights / weights.sum(-1, keepdim=True)
    own = torch.randint(0, k, (g,), generator=gen)
    return Neighbourhoods(layers=layers, dense={"head": near(2, 4)}, weights=weights, own=own)


def flat_factors(layers: dict[str, LayerStack], dense: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    """Each member's (or output's) A, B, m and dense tensors as one flat vector: (*lead dims, n)."""
    parts = []
    for s in layers.values():
        parts += [s.lora_a, s.lora_b] + ([] if s.magnitude is None else [s.magnitude])
    parts += list(dense.values())
    shape = parts[0].shape[:lead]
    return torch.cat([p.reshape(*shape, -1).to(F64) for p in parts], dim=-1)


def flat_products(layers: dict[str, LayerStack], dense: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    """The same with each layer's dense product s·B·A instead of A and B (tests only)."""
    parts = []
    for s in layers.values():
        parts += [s.scaling * s.lora_b.to(F64) @ s.lora_a.to(F64)] + ([] if s.magnitude is None else [s.magnitude])
    parts += list(dense.values())
    shape = parts[0].shape[:lead]
    return torch.cat([p.reshape(*shape, -1).to(F64) for p in parts], dim=-1)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def with_attacker(hood: Neighbourhoods, column: torch.Tensor, factor: float = 1e6) -> Neighbourhoods:
    """The member at ``column[g]`` of every receiver g scaled by ``factor`` (a crude Byzantine)."""
    rows = torch.arange(hood.receivers)

    def hit(t):
        t = t.clone()
        t[rows, column] *= factor
        return t

    layers = {n: LayerStack(hit(s.lora_a), hit(s.lora_b), None if s.magnitude is None else hit(s.magnitude), s.scaling)
              for n, s in hood.layers.items()}
    return replace(hood, layers=layers, dense={n: hit(t) for n, t in hood.dense.items()})


# --------------------------------------------------------------------------------- references


def ref_krum(x: torch.Tensor, w: torch.Tensor, f: int, keep: int) -> torch.Tensor:
    """Blanchard et al. by loops: x (k, n) dense members, w (k,). Returns the weights c (k,)."""
    k = x.shape[0]
    scores = []
    for j in range(k):
        dists = sorted(float((x[j] - x[i]).square().sum()) for i in range(k) if i != j)
        scores.append(sum(dists[: k - f - 2]))
    kept = sorted(range(k), key=lambda j: (scores[j], j))[:keep]
    c = torch.zeros(k, dtype=F64)
    c[kept] = w[kept] / w[kept].sum()
    return c


def ref_clip(x: torch.Tensor, w: torch.Tensor, own: int, f: int, tau: float | None, iterations: int):
    """v ← v + Σ_j w_j clip(x_j − v, τ) from v = x_own, by loops; the coefficients c (v = c·x) are
    tracked alongside. Adaptive τ: the (f+1)-th largest ‖x_j − v‖ over j ≠ own; own never clipped."""
    k = x.shape[0]
    v, c = x[own].clone(), torch.zeros(k, dtype=F64)
    c[own] = 1.0
    for _ in range(iterations):
        dist = [float((x[j] - v).norm()) for j in range(k)]
        others = sorted((dist[j] for j in range(k) if j != own), reverse=True)
        radius = tau if tau is not None else (others[f] if f < len(others) else 0.0)
        step_v, step_c = torch.zeros_like(v), torch.zeros_like(c)
        for j in range(k):
            t = 1.0 if (j == own or dist[j] <= radius) else radius / dist[j]
            step_v += w[j] * t * (x[j] - v)
            e = torch.zeros(k, dtype=F64)
            e[j] = 1.0
            step_c += w[j] * t * (e - c)
        v, c = v + step_v, c + step_c
    return v, c


def reference_weights(hood: Neighbourhoods, x: torch.Tensor, rule: str, f: int, tau=None, iterations=3, select=None):
    """(g, k) reference weights of a re-weighting rule on dense members x (g, k, n)."""
    out = []
    for i in range(hood.receivers):
        w = hood.weights[i]
        if rule in ("krum", "multi_krum"):
            out.append(ref_krum(x[i], w, f, 1 if rule == "krum" else (select or x.shape[1] - f)))
        else:
            its = 1 if rule == "self_centered_clipping" else iterations
            out.append(ref_clip(x[i], w, int(hood.own[i]), f, tau, its)[1])
    return torch.stack(out)


def dense_tsvd(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# ---------------------------------------------------------------------------------- geometry


def test_factored_product_distances_equal_dense_products_fp64():
    hood = make_hood(g=2, k=5, seed=1)
    dense_x = flat_products(hood.layers, hood.dense, lead=2)  # (g, k, n), products formed densely
    gram = centred_gram(hood, "products")
    expected = torch.cdist(dense_x, dense_x).square()
    assert (pairwise_sq_distances(gram) - expected).abs().max() < 1e-10 * expected.max()
    # Distances to any combination v = Σ c_j x_j (what clipping needs), incl. from the own adapter.
    c = torch.rand(2, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    c = c / c.sum(-1, keepdim=True)
    v = torch.einsum("gk,gkn->gn", c, dense_x)
    want = (dense_x - v.unsqueeze(1)).square().sum(-1)
    assert (sq_distances(gram, c) - want).abs().max() < 1e-10 * want.max()
    own = dense_x[torch.arange(2), hood.own].unsqueeze(1)
    torch.testing.assert_close(gram, (dense_x - own) @ (dense_x - own).mT, rtol=0, atol=1e-10 * float(gram.abs().max()))


def test_factor_distances_are_flat_adapter_distances():
    hood = make_hood(g=2, k=4, seed=2)
    x = flat_factors(hood.layers, hood.dense, lead=2)
    got = pairwise_sq_distances(centred_gram(hood, "factors"))
    torch.testing.assert_close(got, torch.cdist(x, x).square(), rtol=1e-12, atol=1e-12)


def test_centring_keeps_fp32_distances_accurate_near_consensus():
    # Peers agreeing to ~5 digits: ‖x_j‖² + ‖x_l‖² − 2⟨x_j, x_l⟩ in fp32 is off by a factor ~500
    # here (measured); the centred Gram by ~1e-3.
    hood64 = make_hood(g=1, k=4, seed=3, noise=1e-5)
    hood32 = make_hood(g=1, k=4, seed=3, noise=1e-5, dtype=torch.float32)
    for space, flat in (("factors", flat_factors), ("products", flat_products)):
        x = flat(hood64.layers, hood64.dense, lead=2)
        want = torch.cdist(x, x).square()
        got = pairwise_sq_distances(centred_gram(hood32, space)).double()
        assert rel(got, want) < 1e-2, (space, rel(got, want))


# ---------------------------------------------------------------------- each rule vs reference


@pytest.mark.parametrize(("rule", "f", "select"), [("krum", 0, None), ("krum", 2, None), ("multi_krum", 1, None),
                                                   ("multi_krum", 2, 2), ("multi_krum", 0, None)])
def test_krum_matches_loop_reference(rule, f, select):
    hood = make_hood(g=3, k=6, seed=4)
    x = flat_factors(hood.layers, hood.dense, lead=2)
    c = reference_weights(hood, x, rule, f, select=select)
    options = {"select": select} if select else {}
    mixer = ROBUST_RULES[rule](D2oraMixer(), byzantine=f, **options)
    torch.testing.assert_close(mixer.neighbour_weights(hood), c, rtol=0, atol=1e-12)
    out = mixer.mix(hood)
    got = flat_factors(out.layers, out.dense, lead=1)
    torch.testing.assert_close(got, torch.einsum("gk,gkn->gn", c, x), rtol=0, atol=1e-12)
    kept = (c > 0).sum(-1)
    assert (kept == (1 if rule == "krum" else (select or 6 - f))).all()


@pytest.mark.parametrize("rule", ["centered_clipping", "self_centered_clipping"])
@pytest.mark.parametrize(("f", "tau"), [(1, None), (2, None), (0, 0.5), (1, 2.0), (5, None)])
def test_clipping_matches_loop_reference(rule, f, tau):
    hood = make_hood(g=3, k=6, seed=5)
    x = flat_factors(hood.layers, hood.dense, lead=2)
    mixer = ROBUST_RULES[rule](FedAvgMixer(), byzantine=f, tau=tau, iterations=4)
    out = mixer.mix(hood)
    got = flat_factors(out.layers, out.dense, lead=1)
    its = 1 if rule == "self_centered_clipping" else 4
    for i in range(3):
        v, c = ref_clip(x[i], hood.weights[i], int(hood.own[i]), f, tau, its)
        torch.testing.assert_close(got[i], v, rtol=0, atol=1e-12)
        torch.testing.assert_close(mixer.neighbour_weights(hood)[i], c, rtol=0, atol=1e-12)
    if f == 5:  # f ≥ k − 1: everyone else may be Byzantine, τ = 0, the receiver keeps its own
        torch.testing.assert_close(got, x[torch.arange(3), hood.own], rtol=0, atol=1e-12)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_trimmed_mean_matches_sort_reference(f):
    hood = make_hood(g=3, k=5, seed=6)
    x = flat_factors(hood.layers, hood.dense, lead=2)
    ref = torch.sort(x, dim=1).values[:, f : 5 - f].mean(1)  # coordinate-wise on dense flat vectors
    out = make_robust(D2oraMixer(), "trimmed_mean", byzantine=f).mix(hood)
    torch.testing.assert_close(flat_factors(out.layers, out.dense, lead=1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [5, 6])
def test_median_matches_numpy(k):
    hood = make_hood(g=2, k=k, seed=7)
    x = flat_factors(hood.layers, hood.dense, lead=2)
    ref = torch.from_numpy(np.median(x.numpy(), axis=1))  # even k: mean of the two middle values
    out = make_robust(FedAvgMixer(), "median").mix(hood)
    assert out.layers["v"].magnitude is None
    torch.testing.assert_close(flat_factors(out.layers, out.dense, lead=1), ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- DeCAF: product space


@pytest.mark.parametrize(("rule", "f", "tau"), [("self_centered_clipping", 1, None), ("self_centered_clipping", 0, 1.0),
                                                ("centered_clipping", 2, None), ("krum", 1, None), ("multi_krum", 1, None)])
def test_decaf_reweighting_matches_dense_product_reference(rule, f, tau):
    hood = make_hood(g=2, k=5, seed=8)
    x = flat_products(hood.layers, hood.dense, lead=2)
    c_ref = reference_weights(hood, x, rule, f, tau=tau)
    mixer = ROBUST_RULES[rule](DecafMixer(), byzantine=f, tau=tau)
    c = mixer.neighbour_weights(hood)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-10)
    out = mixer.mix(hood)
    # The rule is DeCAF run on the re-weighted neighbourhood ...
    again = DecafMixer().mix(replace(hood, weights=c))
    for name in hood.layers:
        torch.testing.assert_close(out.layers[name].lora_a, again.layers[name].lora_a, rtol=0, atol=0)
        torch.testing.assert_close(out.layers[name].lora_b, again.layers[name].lora_b, rtol=0, atol=0)
    # ... whose products are the TSVD of the densely formed Σ_j c_j s B_j A_j; m and dense linear.
    for name, s in hood.layers.items():
        mixed = out.layers[name]
        got = mixed.scaling * mixed.lora_b @ mixed.lora_a
        for i in range(2):
            target = torch.einsum("k,koi->oi", c_ref[i], s.scaling * s.lora_b[i] @ s.lora_a[i])
            assert rel(got[i], dense_tsvd(target, 3)) < 1e-10
        if s.magnitude is not None:
            torch.testing.assert_close(mixed.magnitude, torch.einsum("gk,gko->go", c_ref, s.magnitude))
    torch.testing.assert_close(out.dense["head"], torch.einsum("gk,gkab->gab", c_ref, hood.dense["head"]))


# -------------------------------------------------------------------- no attacker (module table)


def _same(one, two, tol=1e-12) -> bool:
    a, b = flat_factors(one.layers, one.dense, lead=1), flat_factors(two.layers, two.dense, lead=1)
    return rel(a, b) < tol


@pytest.mark.parametrize("base", [D2oraMixer(), DecafMixer()], ids=["d2ora", "decaf"])
def test_no_attacker_rules_that_equal_plain_mixing(base):
    hood = make_hood(g=3, k=5, seed=9)
    plain = base.mix(hood)
    for rule, options in [("self_centered_clipping", {"byzantine": 0}), ("centered_clipping", {"byzantine": 0}),
                          ("self_centered_clipping", {"tau": float("inf")}), ("centered_clipping", {"tau": float("inf")}),
                          ("multi_krum", {"byzantine": 0})]:
        assert _same(make_robust(base, rule, **options).mix(hood), plain, 1e-10), (rule, options)
    # With f ≥ 1 the adaptive radius pulls the farthest honest neighbour in: not the plain mix.
    assert not _same(make_robust(base, "self_centered_clipping", byzantine=1).mix(hood), plain, 1e-6)
    assert not _same(make_robust(base, "multi_krum", byzantine=1).mix(hood), plain, 1e-6)


def test_no_attacker_coordinate_rules_and_krum_differ_from_plain_mixing():
    weighted, uniform = make_hood(g=2, k=5, seed=10), make_hood(g=2, k=5, seed=10, uniform=True)
    # Trimmed mean with f = 0 is the unweighted mean: plain mixing only when the weights are uniform.
    assert _same(make_robust(D2oraMixer(), "trimmed_mean", byzantine=0).mix(uniform), D2oraMixer().mix(uniform))
    assert not _same(make_robust(D2oraMixer(), "trimmed_mean", byzantine=0).mix(weighted), D2oraMixer().mix(weighted), 1e-6)
    # The median is not the mean, even with uniform weights.
    assert not _same(make_robust(D2oraMixer(), "median", byzantine=0).mix(uniform), D2oraMixer().mix(uniform), 1e-6)
    # Krum keeps exactly one member's adapter.
    x = flat_factors(weighted.layers, weighted.dense, lead=2)
    out = make_robust(D2oraMixer(), "krum", byzantine=1).mix(weighted)
    got = flat_factors(out.layers, out.dense, lead=1)
    for i in range(2):
        assert min(rel(got[i], x[i, j]) for j in range(5)) == 0.0
    assert not _same(out, D2oraMixer().mix(weighted), 1e-6)


# ------------------------------------------------------------------------------- robustness


def _distance_to_honest_mix(base, hood, attacked, column, out, flat) -> tuple[float, float]:
    """(‖out − honest mix‖, honest spread) per receiver, worst over receivers, in ``flat``'s space.
    The honest mix is the base's plain mix with the attacker's weight set to 0 (renormalised)."""
    rows = torch.arange(hood.receivers)
    w = hood.weights.clone()
    w[rows, column] = 0.0
    honest = base.mix(replace(hood, weights=w / w.sum(-1, keepdim=True)))
    x, h, got = flat(hood.layers, hood.dense, 2), flat(honest.layers, honest.dense, 1), flat(out.layers, out.dense, 1)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[rows, column] = False
    spread = max(float((x[i][keep[i]] - h[i]).norm(dim=-1).max()) for i in rows)
    return float((got - h).norm(dim=-1).max()), spread


@pytest.mark.parametrize(("base", "flat", "rules"), [
    (D2oraMixer(), flat_factors, ROBUST_RULES),
    (DecafMixer(), flat_products, REWEIGHTING_RULES),
], ids=["d2ora", "decaf"])
def test_one_huge_outlier_cannot_move_a_robust_mix(base, flat, rules):
    hood = make_hood(g=3, k=7, seed=11, noise=0.1)
    column = (hood.own + 1 + torch.arange(3)) % 7  # never the receiver itself
    attacked = with_attacker(hood, column)
    moved, spread = _distance_to_honest_mix(base, hood, attacked, column, base.mix(attacked), flat)
    assert moved > 1e4 * spread  # plain mixing follows the attacker
    for rule in rules:
        mixer = make_robust(base, rule, byzantine=1)
        moved, spread = _distance_to_honest_mix(base, hood, attacked, column, mixer.mix(attacked), flat)
        assert moved < 2 * spread, (rule, moved, spread)
        c = mixer.neighbour_weights(attacked)
        if c is not None:  # the attacker is excluded (krum) or clipped far below its weight
            assert (c[torch.arange(3), column] < 1e-5 * hood.weights[torch.arange(3), column]).all(), rule


# --------------------------------------------------------------------------- graph, dtype, edges


def test_self_centred_clipping_on_a_ring_through_mix_stacks():
    gen = torch.Generator().manual_seed(12)
    peers = 5
    stack = LayerStack(torch.randn(peers, 2, 6, generator=gen, dtype=F64), torch.randn(peers, 4, 2, generator=gen, dtype=F64),
                       torch.rand(peers, 4, generator=gen, dtype=F64) + 0.5, 2.0)
    weights = torch.zeros(peers, peers, dtype=F64)
    for i in range(peers):
        weights[i, [(i - 1) % peers, i, (i + 1) % peers]] = 1.0 / 3.0
    mixer = make_robust(DecafMixer(), "self_centered_clipping", byzantine=1)
    assert (mixer.name, mixer.factors_replaced, mixer.needs_layer_inputs) == ("decaf", True, False)
    out = mix_stacks(mixer, {"l": stack}, weights).layers["l"]
    # Peer 2 by hand: its neighbourhood [1, 2, 3], own in the middle.
    index = torch.tensor([[1, 2, 3]])
    hood = Neighbourhoods(layers={"l": LayerStack(stack.lora_a[index], stack.lora_b[index], stack.magnitude[index], 2.0)},
                          weights=weights[2, [1, 2, 3]].unsqueeze(0), own=torch.tensor([1]))
    alone = mixer.mix(hood).layers["l"]
    torch.testing.assert_close(out.lora_a[2], alone.lora_a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.magnitude[2], alone.magnitude[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("base", "rule"), [(DecafMixer(), "self_centered_clipping"), (D2oraMixer(), "trimmed_mean"),
                                            (D2oraMixer(), "multi_krum"), (FedAvgMixer(), "centered_clipping")])
def test_bf16_stacks_keep_their_dtype(base, rule):
    hood = make_hood(g=2, k=5, seed=13, dtype=torch.bfloat16)
    mixer = make_robust(base, rule)
    out = mixer.mix(hood)
    assert out.layers["q"].lora_a.dtype == torch.bfloat16 and out.dense["head"].dtype == torch.bfloat16
    assert torch.isfinite(out.layers["q"].lora_b.float()).all()
    c = mixer.neighbour_weights(hood)
    assert c is None or (c.dtype == torch.float32 and torch.allclose(c.sum(-1), torch.ones(2)))


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_identical_neighbours_give_the_common_adapter(rule):
    # Every distance is 0: no τ/0, and every rule returns the adapter they all share.
    hood = make_hood(g=2, k=5, seed=14, noise=0.0)
    base = DecafMixer() if rule in REWEIGHTING_RULES else D2oraMixer()
    for tau in ([None, 1.0] if "clipping" in rule else [None]):
        out = make_robust(base, rule, tau=tau).mix(hood) if tau else make_robust(base, rule).mix(hood)
        flat = flat_products if base.name == "decaf" else flat_factors
        got, x = flat(out.layers, out.dense, 1), flat(hood.layers, hood.dense, 2)
        assert rel(got, x[:, 0]) < 1e-12, rule


# ------------------------------------------------------------------------------------ errors


def test_unknown_rule_and_none():
    base = D2oraMixer()
    assert make_robust(base, "none") is base and make_robust(base, None) is base
    with pytest.raises(ValueError, match="unknown robust rule 'bulyan'.*trimmed_mean, median, krum, multi_krum"):
        make_robust(base, "bulyan")
    assert set(ROBUST_RULES) == {"trimmed_mean", "median", "krum", "multi_krum", "centered_clipping",
                                 "self_centered_clipping"}


def test_too_small_neighbourhoods_are_clear_errors():
    """Set-up checks the full neighbourhoods (check_neighbourhood, neighbour_weights); a mix on a
    neighbourhood the trust layer shrank tolerates as many as it can instead of stopping the run."""
    ring = make_hood(g=2, k=3, seed=15)
    with pytest.raises(ValueError, match=r"krum needs k > f \+ 2.*k=3 \(ring\) tolerates at most f=0, got byzantine=1"):
        check_neighbourhood("krum", 3, 1)
    with pytest.raises(ValueError, match=r"multi_krum needs k > f \+ 2"):
        make_robust(DecafMixer(), "multi_krum").neighbour_weights(ring)
    with pytest.raises(ValueError, match=r"trimmed_mean needs k > 2f.*k=3 \(ring\) tolerates at most f=1, got byzantine=2"):
        check_neighbourhood("trimmed_mean", 3, 2)
    with pytest.raises(ValueError, match=r"median needs k > 2f.*k=4 tolerates at most f=1"):
        check_neighbourhood("median", 4, 2)
    with pytest.raises(ValueError, match=r"select must be in 1..k=3"):
        make_robust(D2oraMixer(), "multi_krum", byzantine=0, select=4).mix(ring)
    shrunk = make_robust(D2oraMixer(), "krum", byzantine=1).mix(ring)
    tolerated = make_robust(D2oraMixer(), "krum", byzantine=0).mix(ring)
    for name, stack in shrunk.layers.items():
        assert torch.equal(stack.lora_a, tolerated.layers[name].lora_a)
    median = make_robust(D2oraMixer(), "median", byzantine=2).mix(make_hood(g=1, k=4))
    assert median.layers  # degrades to f=1 on k=4
    make_robust(D2oraMixer(), "trimmed_mean", byzantine=1).mix(ring)  # k=3 tolerates f=1
    make_robust(D2oraMixer(), "self_centered_clipping", byzantine=1).mix(ring)  # clipping: any k


def test_unsupported_combinations_say_why():
    for rule in ("trimmed_mean", "median"):
        with pytest.raises(ValueError, match=rf"{rule} is coordinate-wise.*'decaf'.*products.*krum.*works with d2ora and fedavg"):
            make_robust(DecafMixer(), rule)
    for rule in ROBUST_RULES:
        with pytest.raises(ValueError, match="'dimat' mixer.*activation matching"):
            make_robust(DimatMixer(), rule)
        with pytest.raises(ValueError, match="'local' mixer.*does not mix"):
            make_robust(LocalMixer(), rule)
    with pytest.raises(ValueError, match="already robust"):
        make_robust(make_robust(D2oraMixer(), "median"), "krum")
    with pytest.raises(ValueError, match="tau"):
        make_robust(D2oraMixer(), "self_centered_clipping", tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        make_robust(D2oraMixer(), "krum", tau=1.0)
    with pytest.raises(ValueError, match="select"):
        make_robust(D2oraMixer(), "krum", select=2)
    with pytest.raises(ValueError, match="byzantine"):
        make_robust(D2oraMixer(), "median", byzantine=-1)
    with pytest.raises(ValueError, match="iterations"):
        make_robust(D2oraMixer(), "centered_clipping", iterations=0)
    with pytest.raises(ValueError, match="not a re-weighting rule"):
        robust_weights(make_hood(), "median", "factors")
    assert [make_mixer(n).robust_space for n in ("d2ora", "fedavg", "decaf", "dimat", "local")] == \
        ["factors", "factors", "products", None, None]


# --------------------------------------------------------------------------- registry, contract


def test_registry_holds_one_class_per_rule():
    assert list(ROBUST_RULES) == ["trimmed_mean", "median", "krum", "multi_krum", "centered_clipping",
                                  "self_centered_clipping"]  # the order ("none", *ROBUST_RULES) lists
    classes = list(ROBUST_RULES.values())
    assert len(set(classes)) == len(classes)  # one class per rule, none registered twice
    for name, cls in ROBUST_RULES.items():
        assert issubclass(cls, RobustMixer) and cls.rule == name
        assert type(make_robust(D2oraMixer(), name)) is cls
    # Each rule declares its spaces: the coordinate-wise ones factor space only, the others both.
    assert [n for n, cls in ROBUST_RULES.items() if cls.spaces == ("factors",)] == list(COORDINATE_RULES)
    assert all(cls.spaces == ("factors", "products") for n, cls in ROBUST_RULES.items() if n in REWEIGHTING_RULES)


class _Unmixable:
    """A mixer of this test only: no robust geometry, and its own reason why (no name table knows it)."""

    name: ClassVar[str] = "unmixable_for_test"
    factors_replaced: ClassVar[bool] = False
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = None
    no_robust_reason: ClassVar[str | None] = "its adapters live on a xylophone the rules cannot measure"

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        raise AssertionError("never mixed")


class _Silent(_Unmixable):
    no_robust_reason: ClassVar[str | None] = None


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_refusal_quotes_the_mixers_own_reason(rule):
    with pytest.raises(ValueError, match=r"'unmixable_for_test' mixer: its adapters live on a xylophone the rules "
                                         r"cannot measure\. Robust rules work with d2ora and fedavg"):
        make_robust(_Unmixable(), rule)
    with pytest.raises(ValueError, match=r"declares no robust geometry \(robust_space = None\)"):
        make_robust(_Silent(), rule)
    # The shipped mixers declare theirs the same way.
    assert "activation matching" in DimatMixer.no_robust_reason and "does not mix" in LocalMixer.no_robust_reason


def test_unwrapped_gives_the_plain_rule():
    base = DecafMixer()
    assert unwrapped(base) is base
    assert unwrapped(make_robust(base, "krum", byzantine=0)) is base
