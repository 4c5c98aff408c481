"""Consensus distances from factors equal the definition evaluated on dense float64 matrices."""

from __future__ import annotations

import pytest
import torch

from d2ora import DoRAConfig, attach
from d2ora.engine.consensus import (
    ConsensusDistances,
    dense_distance,
    magnitude_distance,
    measure,
    merged_distance,
    product_distance,
)
from d2ora.engine.peers import PeerModel
from tests.conftest import load_causal

OUT, IN, R, SCALING = 7, 11, 3, 1.7
F64 = torch.float64


# --- an independent dense reference: the definitions, spelled out with plain torch -------------

def ref_distance(values: torch.Tensor) -> float:
    """(1/n) Σ_i ||x_i − x̄||² over dim 0, by forming every x_i."""
    mean = values.mean(dim=0, keepdim=True)
    return float(sum(torch.sum((x - mean[0]) ** 2) for x in values) / values.shape[0])


def ref_products(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return torch.stack([s * (b[i].to(F64) @ a[i].to(F64)) for i in range(a.shape[0])])


def ref_merged(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None, s: float) -> torch.Tensor:
    weights = []
    for i in range(a.shape[0]):
        w = w0.to(F64) + s * (b[i].to(F64) @ a[i].to(F64))
        if m is not None:
            norm = torch.linalg.vector_norm(w, dim=1)
            norm = torch.where(norm == 0, torch.ones_like(norm), norm)  # the zero-row rule
            w = m[i].to(F64)[:, None] * w / norm[:, None]
        weights.append(w)
    return torch.stack(weights)


def random_layer(peers: int, seed: int, dtype: torch.dtype = F64, spread: float = 1.0):
    """W0, its squared row norms, and per-peer A, B, m = shared base + ``spread`` · noise."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    w0 = draw(OUT, IN)
    a = draw(1, R, IN) + spread * draw(peers, R, IN)
    b = draw(1, OUT, R) + spread * draw(peers, OUT, R)
    m = 1.0 + draw(1, OUT).abs() + spread * draw(peers, OUT).abs()
    w0, a, b, m = (t.to(dtype) for t in (w0, a, b, m))
    return w0, (w0 * w0).sum(-1), a, b, m  # squared row norms in the layer's dtype, as it caches them


def assert_rel(actual: float, expected: float, rel: float) -> None:
    assert expected > 0, "reference is zero: the comparison would be vacuous"
    assert abs(actual - expected) <= rel * expected, (actual, expected)


# --- single layers --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rel", [(F64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("peers", [3, 5])
@pytest.mark.parametrize("dora", [True, False])
def test_layer_distances_match_dense(peers: int, dtype: torch.dtype, rel: float, dora: bool) -> None:
    w0, w0_sq, a, b, m = random_layer(peers, seed=peers, dtype=dtype)
    m = m if dora else None
    assert_rel(product_distance(a, b, SCALING), ref_distance(ref_products(a, b, SCALING)), rel)
    assert_rel(merged_distance(w0, w0_sq, a, b, m, SCALING), ref_distance(ref_merged(w0, a, b, m, SCALING)), rel)
    if dora:
        assert_rel(magnitude_distance(m), ref_distance(m.to(F64)), rel)
    else:
        assert magnitude_distance(m) is None


def test_single_peer_is_at_consensus() -> None:
    w0, w0_sq, a, b, m = random_layer(1, seed=1)
    assert product_distance(a, b, SCALING) == 0.0
    assert merged_distance(w0, w0_sq, a, b, m, SCALING) == 0.0
    assert merged_distance(w0, w0_sq, a, b, None, SCALING) == 0.0


def test_zero_norm_rows_divide_by_one() -> None:
    w0, _, a, b, m = random_layer(3, seed=7)
    w0[2] = 0.0
    b[:, 2] = 0.0  # row 2 of W0 + sBA is zero for every peer: its norm is 0
    w0[4] = 0.0
    b[1:, 4] = 0.0  # row 4 is zero for peers 1 and 2 only; peer 0's differs
    w0_sq = (w0 * w0).sum(-1)
    expected = ref_distance(ref_merged(w0, a, b, m, SCALING))
    actual = merged_distance(w0, w0_sq, a, b, m, SCALING)
    assert_rel(actual, expected, 1e-9)


def test_identical_peers_are_at_consensus() -> None:
    w0, w0_sq, a, b, m = random_layer(1, seed=3)
    a, b, m = (t.expand(5, *t.shape[1:]).clone() for t in (a, b, m))
    scale = float((ref_merged(w0, a, b, m, SCALING)[0] ** 2).sum())  # ||W'||², the size of the values
    assert 0.0 <= product_distance(a, b, SCALING) < 1e-12 * scale
    assert 0.0 <= merged_distance(w0, w0_sq, a, b, m, SCALING) < 1e-12 * scale
    assert dense_distance(m) < 1e-12 * float((m[0] ** 2).sum())


@pytest.mark.parametrize("dora", [True, False])
def test_nearly_agreeing_peers_keep_their_accuracy(dora: bool) -> None:
    """Peers 1e-6 apart: the distance is ~1e-11 of the values' size.

    An uncentred Gram (Σ⟨W'_i, W'_i⟩ − (1/n)Σ⟨W'_i, W'_j⟩) is off by ~3e-5 relative here already;
    centring keeps ~1e-11, so 1e-6 (stricter than the 1e-3 that is enough in use) tells them apart.
    """
    w0, w0_sq, a, b, m = random_layer(5, seed=11, spread=1e-6)
    m = m if dora else None
    merged_ref = ref_merged(w0, a, b, m, SCALING)
    expected = ref_distance(merged_ref)
    assert expected < 1e-10 * float((merged_ref[0] ** 2).sum())  # really the hard regime
    assert_rel(merged_distance(w0, w0_sq, a, b, m, SCALING), expected, 1e-6)
    assert_rel(product_distance(a, b, SCALING), ref_distance(ref_products(a, b, SCALING)), 1e-6)


def test_dense_distance_any_shape() -> None:
    x = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(5))
    assert_rel(dense_distance(x), ref_distance(x.to(F64)), 1e-12)
    assert_rel(dense_distance(x.float()), ref_distance(x.float().to(F64)), 1e-12)


# --- a real PeerModel -----------------------------------------------------------------------

def perturbed_peers(path: str, targets: list[str], use_dora: bool, peers: int = 3) -> PeerModel:
    model = load_causal(path)
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=targets, use_dora=use_dora))
    peer_model = PeerModel(model, peers)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # every peer drifts its own way from the common start
        for layer in peer_model.layers.values():
            layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            if use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
    return peer_model


def base_out_in(layer: torch.nn.Module) -> torch.Tensor:
    """W0 as (out, in), spelled out: GPT-2's Conv1D stores it as (in, out)."""
    w = layer.base_layer.weight.detach()
    return w if isinstance(layer.base_layer, torch.nn.Linear) else w.T


@pytest.mark.parametrize("model_dir, targets, use_dora", [
    ("tiny_llama_dir", ["q_proj", "v_proj", "down_proj"], True),
    ("tiny_llama_dir", ["q_proj", "v_proj", "down_proj"], False),
    ("tiny_gpt2_dir", ["c_attn", "c_fc"], True),  # Conv1D: transposed base weights
])
def test_measure_sums_dense_distances_over_layers(request, model_dir: str, targets: list[str], use_dora: bool) -> None:
    peer_model = perturbed_peers(request.getfixturevalue(model_dir), targets, use_dora)
    product = merged = magnitude = 0.0
    for layer in peer_model.layers.values():
        a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
        m = layer.lora_magnitude_vector.detach() if use_dora else None
        product += ref_distance(ref_products(a, b, s))
        merged += ref_distance(ref_merged(base_out_in(layer), a, b, m, s))
        if use_dora:
            magnitude += ref_distance(m.to(F64))
    got = measure(peer_model)
    assert isinstance(got, ConsensusDistances)
    assert_rel(got.product, product, 1e-5)
    assert_rel(got.merged, merged, 1e-5)
    if use_dora:
        assert_rel(got.magnitude, magnitude, 1e-5)
        assert abs(got.merged - got.product) > 1e-3 * got.product  # DoRA's rescaling changes the answer
    else:
        assert got.magnitude is None
        assert_rel(got.merged, got.product, 1e-9)  # LoRA: W0 cancels
