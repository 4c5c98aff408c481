"""DIMAT for adapters: align each neighbour's rank space to your own by activation matching, then
average.

Saadati et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning Models",
CVPR 2024, arXiv 2404.08079. DIMAT permutes a neighbour's
hidden units to best match one's own (activation matching, as in Git Re-Basin, Ainsworth et al.,
arXiv 2209.04836) before averaging, because units are only defined up to permutation. A LoRA/DoRA
adapter has the same symmetry inside its rank space: for any permutation P and sign matrix
D = diag(±1), (B Pᵀ D)(D P A) = B A, so row k of peer j's A need not play the role of row k of
peer i's. Averaging A_j, B_j unaligned mixes unrelated components.

For peer i and each neighbour j (W[i, j] ≠ 0, j ≠ i), on a batch X (tokens x in) of layer inputs
from peer i's own data:
  1. H_i = X A_iᵀ and H_j = X A_jᵀ, the r rank-space activations (tokens x r).
  2. C[a, b] = Pearson correlation over tokens between unit a of i and unit b of j.
  3. Hungarian matching (``scipy.optimize.linear_sum_assignment``) on −|C|: unit a of i ↔ unit
     π(a) of j; a negative C[a, π(a)] is matched with a sign flip d_a = −1.
  4. Aligned A_j row a = d_a A_j[π(a)], aligned B_j column a = d_a B_j[:, π(a)]. This is exactly
     (B_j Pᵀ D)(D P A_j) with the same P and D on both sides, so the product B_j A_j is unchanged.
  5. A_i ← Σ_j W[i, j] aligned A_j, B_i ← Σ_j W[i, j] aligned B_j; m (and dense tensors) linearly.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from d2ora.mixers._common import checked_weights, compute_dtype, mix_dense, mix_magnitude
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods


def rank_correlation(x: torch.Tensor, a_ref: torch.Tensor, a_other: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over tokens between the rank units of ``a_ref`` and of ``a_other``.

    ``x`` (tokens, in), ``a_ref`` (r, in), ``a_other`` (.., r, in) -> (.., r, r) with entry [a, b]
    the correlation of unit a of the reference and unit b of the other. A unit with zero variance on
    this batch (e.g. a zero row of A) has no defined correlation; it gets 0 against everything, so
    the matching treats it as uninformative instead of dividing by zero.
    """
    h_ref = x @ a_ref.mT  # (tokens, r)
    h_other = x @ a_other.mT  # (.., tokens, r)
    h_ref = h_ref - h_ref.mean(dim=-2, keepdim=True)
    h_other = h_other - h_other.mean(dim=-2, keepdim=True)
    cov = h_ref.mT @ h_other  # (.., r, r)
    norm_ref = h_ref.norm(dim=-2)  # (r,)
    norm_other = h_other.norm(dim=-2)  # (.., r)
    denom = norm_ref.unsqueeze(-1) * norm_other.unsqueeze(-2)
    return torch.where(denom > 0, cov / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(cov))


def match_units(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching maximising Σ_a |C[a, π(a)]|; returns ``perm`` (π as an index tensor, so
    unit a of the reference is matched with unit perm[a] of the other) and ``signs`` (d_a = −1 where
    that correlation is negative, else +1)."""
    cost = -corr.abs().detach().to(torch.float64).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long, device=corr.device)
    matched = corr[torch.arange(corr.shape[0], device=corr.device), perm]
    signs = torch.where(matched < 0, -torch.ones_like(matched), torch.ones_like(matched))
    return perm, signs


def align_factors(
    x: torch.Tensor,
    a_ref: torch.Tensor,
    a_other: torch.Tensor,
    b_other: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-express one neighbour's (B, A) in the reference's rank coordinates.

    ``x`` (tokens, in), ``a_ref`` and ``a_other`` (r, in), ``b_other`` (out, r). Returns
    ``(a_aligned, b_aligned, perm, signs)`` with ``a_aligned = signs[:, None] * a_other[perm]`` and
    ``b_aligned = b_other[:, perm] * signs``; ``b_aligned @ a_aligned == b_other @ a_other`` exactly,
    because the permutation and each flip act on both factors (d_a² = 1).
    """
    corr = rank_correlation(x, a_ref, a_other)
    perm, signs = match_units(corr)
    signs = signs.to(a_other.dtype)
    return signs.unsqueeze(-1) * a_other[perm], b_other[:, perm] * signs, perm, signs


class DimatMixer:
    """DIMAT (arXiv 2404.08079) on adapters: each peer aligns every neighbour's rank space to its own
    by activation matching on a batch of its own layer inputs (``Neighbourhoods.layer_inputs(receiver,
    layer)``), then takes the weighted average; m and dense tensors are mixed linearly.

    Alignment is to peer i's own basis, and a peer's own factors are never permuted, so row k of the
    new A_i continues row k of the old A_i: ``factors_replaced = False`` and the optimizer's moments
    for A and B are kept, as for ``D2oraMixer``. (Each neighbour is moved into i's coordinates, not
    the other way round; different peers align to different references, which is DIMAT's design.)
    Works for LoRA (``magnitude is None``) unchanged.
    """

    name: ClassVar[str] = "dimat"
    factors_replaced: ClassVar[bool] = False
    needs_layer_inputs: ClassVar[bool] = True
    robust_space: ClassVar[str | None] = None  # aligns factors before averaging: raw distances mean nothing
    no_robust_reason: ClassVar[str | None] = (
        "it permutes each neighbour's rank components by activation matching before averaging, "
        "so distances between unaligned factors are meaningless"
    )

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        if hood.layer_inputs is None:
            raise ValueError(
                "the 'dimat' mixer matches activations and needs Neighbourhoods.layer_inputs (a callable "
                "(receiver, layer) -> (tokens, in) tensor of that layer's inputs on the receiver's own data); got None"
            )
        weights = checked_weights(hood)
        own = hood.own.tolist()
        layers: dict[str, LayerStack] = {}
        for name, stack in hood.layers.items():
            dtype = compute_dtype(stack.lora_a.dtype)
            a_all = stack.lora_a.to(dtype)  # (g, k, r, in)
            b_all = stack.lora_b.to(dtype)
            n_in = a_all.shape[-1]
            new_a = torch.empty_like(stack.lora_a[:, 0])
            new_b = torch.empty_like(stack.lora_b[:, 0])
            for i, me in enumerate(own):
                x = hood.layer_inputs(i, name)
                if x.shape[-1] != n_in:
                    raise ValueError(
                        f"layer_inputs({i}, {name!r}) has last dim {x.shape[-1]}, the layer's input dim is {n_in}"
                    )
                x = x.detach().reshape(-1, n_in).to(device=a_all.device, dtype=dtype)
                acc_a = torch.zeros_like(a_all[i, me])
                acc_b = torch.zeros_like(b_all[i, me])
                for j in range(a_all.shape[1]):
                    w = weights[i, j].to(device=a_all.device, dtype=dtype)
                    if j == me:  # own factors define the reference basis: never permuted
                        acc_a += w * a_all[i, me]
                        acc_b += w * b_all[i, me]
                        continue
                    a_j, b_j, _, _ = align_factors(x, a_all[i, me], a_all[i, j], b_all[i, j])
                    acc_a += w * a_j
                    acc_b += w * b_j
                new_a[i] = acc_a.to(new_a.dtype)
                new_b[i] = acc_b.to(new_b.dtype)
            layers[name] = LayerStack(
                lora_a=new_a,
                lora_b=new_b,
                magnitude=mix_magnitude(weights, stack.magnitude),
                scaling=stack.scaling,
            )
        return MixOutput(layers=layers, dense=mix_dense(weights, hood.dense))
