"""Consensus distances: how far P peers' adapters are from agreeing, per quantity.

The consensus distance of values x_1..x_n is ``(1/n) Σ_i ||x_i − x̄||²`` (squared Frobenius,
``x̄`` the plain mean). For the products ``s·B_i A_i`` and the merged weights ``W'_i`` it is
computed from the factors, never from the dense ``out x in`` matrices (a 4096x4096 layer with 64
peers would need 8 GiB per layer in float64).

Why the values are centred before the Gram identity: ``Σ_i ||X_i − X̄||² = Σ_i ||X_i||² −
(1/n) ||Σ_i X_i||²`` subtracts two numbers of size ``n·||X||²``, so when the peers nearly agree
(the regime that matters, late in training) float64 rounding of about ``1e-16·||X||²`` swamps a
distance of ``δ²·||X||²``. The distance does not change when one matrix C is subtracted from
every ``X_i``, so we subtract one built from the factors' means, which turns each ``X_i − C`` into
a sum of low-rank terms of size δ whose Gram sums no longer cancel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from d2ora.dora.math import factored_row_norms, magnitude_scale
from d2ora.mixers.base import LayerStack

if TYPE_CHECKING:
    from d2ora.engine.peers import PeerModel

_F64 = torch.float64


def dense_distance(stacked: torch.Tensor) -> float:
    """Consensus distance of a (P, ...) stack of dense values (a classification head, a magnitude)."""
    x = stacked.detach().to(_F64).reshape(stacked.shape[0], -1)
    dev = x - x.mean(dim=0)  # centring first keeps small distances exact (no Gram cancellation)
    return float((dev * dev).sum() / x.shape[0])


def magnitude_distance(magnitude: torch.Tensor | None) -> float | None:
    """Consensus distance of the (P, out) magnitudes; None for LoRA (no magnitude)."""
    return None if magnitude is None else dense_distance(magnitude)


def _deviation(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over peers, deviations from it)`` of a (P, ...) stack."""
    mean = stacked.mean(dim=0)
    return mean, stacked - mean


def _centred_sq_norms(b_dev: torch.Tensor, a: torch.Tensor, b_mean: torch.Tensor, a_dev: torch.Tensor) -> torch.Tensor:
    """``||dB_i A_i + B̄ dA_i||²`` per peer, (P,), via ⟨B1A1, B2A2⟩ = Σ (B1ᵀB2) ∘ (A1A2ᵀ).

    This is ``||B_i A_i − B̄ Ā||²``: expanding ``(B̄ + dB_i)(Ā + dA_i) − B̄Ā`` gives the two terms.
    Only (P, r, r) Grams are formed.
    """
    bt = b_dev.transpose(1, 2)
    own = (bt @ b_dev * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
    cross = (bt @ b_mean * (a @ a_dev.transpose(1, 2))).sum(dim=(1, 2))
    mean_part = (b_mean.T @ b_mean * (a_dev @ a_dev.transpose(1, 2))).sum(dim=(1, 2))
    return own + 2.0 * cross + mean_part


def _sum_sq_norm(b_dev: torch.Tensor, a_dev: torch.Tensor) -> float:
    """``||Σ_i dB_i dA_i||²`` through the (P·r, P·r) Grams of the concatenated factors.

    ``Σ_i (dB_i A_i + B̄ dA_i) = Σ_i dB_i dA_i`` because the deviations sum to zero, so this is
    ``||Σ_i (B_i A_i − B̄Ā)||²``: second order in the deviations, hence free of cancellation.
    """
    p, out, r = b_dev.shape
    left = b_dev.permute(1, 0, 2).reshape(out, p * r)  # [dB_1 | … | dB_P]
    right = a_dev.reshape(p * r, -1)  # [dA_1; …; dA_P]
    gram = left.T @ left
    return float(gram.mul_(right @ right.T).sum())  # in place: one (P·r)² temporary fewer


def _finish(sq_norms_sum: torch.Tensor | float, total_sq: float, peers: int) -> float:
    """``(1/n)(Σ_i ||Y_i||² − (1/n)||Σ_i Y_i||²)``, with rounding's tiny negatives clamped to 0."""
    return max(float(sq_norms_sum) - total_sq / peers, 0.0) / peers


def product_distance(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    """Consensus distance of the products ``s·B_i A_i`` of one layer, without forming them.

    ``lora_a`` is (P, r, in), ``lora_b`` (P, out, r). Computed on ``Y_i = B_i A_i − B̄Ā`` (same
    distance, no cancellation when peers nearly agree); memory is O(P·r·(in + out) + (P·r)²).
    """
    with torch.no_grad():
        a, b = lora_a.detach().to(_F64), lora_b.detach().to(_F64)
        _, a_dev = _deviation(a)
        b_mean, b_dev = _deviation(b)
        sq = _centred_sq_norms(b_dev, a, b_mean, a_dev).sum()
        total = _sum_sq_norm(b_dev, a_dev)
        return scaling * scaling * _finish(sq, total, a.shape[0])


def _row_scales(w0: torch.Tensor, w0_row_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                magnitude: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
    """``g_i = m_i / ||W0 + s·B_i A_i||_c`` (P, out) by the layer's own factored formula; None for LoRA."""
    if magnitude is None:
        return None
    norms = factored_row_norms(w0, w0_row_sq, a, b, scaling)
    return magnitude_scale(magnitude.detach().to(_F64), norms)


def merged_distance(
    weight0: torch.Tensor,
    w0_row_sq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor | None,
    scaling: float,
) -> float:
    """Consensus distance of the merged weights ``W'_i = g_i ∘ (W0 + s·B_i A_i)`` of one layer.

    ``weight0`` is (out, in) (``base_weight_out_in``), ``w0_row_sq`` its squared row norms, A/B as in
    :func:`product_distance`, ``magnitude`` (P, out) or None (LoRA: ``g ≡ 1``). Writing
    ``B̃_i = g_i ∘ B_i`` (rows scaled), ``W'_i = g_i ∘ W0 + s·B̃_i A_i``; subtracting
    ``C = ḡ ∘ W0 + s·mean(B̃)Ā`` leaves ``Y_i = dg_i ∘ W0 + s·(dB̃_i A_i + mean(B̃) dA_i)``, all of
    size δ. Only (P, out, r) products ``W0 dA_iᵀ`` are formed; the sole dense matrix is W0 (float64).
    """
    with torch.no_grad():
        w0 = weight0.detach().to(_F64)
        w0_sq = w0_row_sq.detach().to(_F64)
        a, b = lora_a.detach().to(_F64), lora_b.detach().to(_F64)
        g = _row_scales(w0, w0_sq, a, b, magnitude, scaling)
        b_scaled = b if g is None else g.unsqueeze(-1) * b
        a_mean, a_dev = _deviation(a)
        bs_mean, bs_dev = _deviation(b_scaled)
        # s²||dB̃_i A_i + mean(B̃) dA_i||²: the low-rank part of ||Y_i||².
        sq = (scaling * scaling) * _centred_sq_norms(bs_dev, a, bs_mean, a_dev)
        if g is not None:
            sq = sq + _w0_terms(w0, w0_sq, a_mean, a_dev, bs_mean, bs_dev, g, scaling)
        # Σ_i Y_i = s·Σ_i dB̃_i dA_i: the dg and first-order terms sum to zero over peers.
        total = (scaling * scaling) * _sum_sq_norm(bs_dev, a_dev)
        return _finish(sq.sum(), total, a.shape[0])


def _w0_terms(w0: torch.Tensor, w0_sq: torch.Tensor, a_mean: torch.Tensor, a_dev: torch.Tensor,
              bs_mean: torch.Tensor, bs_dev: torch.Tensor, g: torch.Tensor, scaling: float) -> torch.Tensor:
    """The parts of ``||Y_i||²`` that involve W0, per peer (P,).

    ``||dg_i ∘ W0||² + 2s·⟨dg_i ∘ W0, dB̃_i A_i + mean(B̃) dA_i⟩``, where row o of
    ``⟨dg ∘ W0, B A⟩`` is ``dg[o]·(W0 Aᵀ)[o]·B[o]``. ``W0 dA_iᵀ`` is formed directly rather than as
    ``W0 A_iᵀ − W0 Āᵀ``, so the term for ``mean(B̃) dA_i`` is exact even when dA is tiny.
    """
    _, dg = _deviation(g)
    w0_dat = torch.matmul(a_dev, w0.T).transpose(1, 2)  # (P, out, r): W0 dA_iᵀ
    w0_at = w0_dat + (w0 @ a_mean.T)  # (P, out, r): W0 A_iᵀ
    per_row = (bs_dev * w0_at).sum(dim=-1) + (bs_mean * w0_dat).sum(dim=-1)  # (P, out)
    return (dg * dg * w0_sq).sum(dim=-1) + 2.0 * scaling * (dg * per_row).sum(dim=-1)


@dataclass(frozen=True)
class ConsensusDistances:
    """Consensus distances summed over every adapted layer (= the distance of all layers concatenated).

    ``magnitude`` is None when no layer uses DoRA; ``product`` is over ``s·B_i A_i``; ``merged``
    over ``W'_i`` (equal to ``product`` for LoRA layers, where W0 cancels).
    """

    magnitude: float | None
    product: float
    merged: float


@torch.no_grad()
def measure(peer_model: PeerModel, stacks: dict[str, LayerStack] | None = None) -> ConsensusDistances:
    """The consensus distances of ``stacks`` (every peer's adapted layers, ``(P, ...)``; by default
    the :class:`~d2ora.engine.peers.PeerModel`'s own), over the model's frozen base weights. The
    process monitor passes all P peers' adapters gathered from every process."""
    stacks = peer_model.stacks()[0] if stacks is None else stacks
    magnitude: float | None = None
    product = merged = 0.0
    for name, layer in peer_model.layers.items():
        stack = stacks[name]
        if stack.magnitude is not None:
            magnitude = (magnitude or 0.0) + dense_distance(stack.magnitude)
        product += product_distance(stack.lora_a, stack.lora_b, stack.scaling)
        merged += merged_distance(layer.weight0, layer.w0_row_sq, stack.lora_a, stack.lora_b, stack.magnitude, stack.scaling)
    return ConsensusDistances(magnitude=magnitude, product=product, merged=merged)
