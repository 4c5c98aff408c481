"""DeCAF: average the low-rank *products*, then factor the average back to rank r.

Saadati, Jiang, Waite, Ganguly, Balu, Hegde, Sarkar, "DeCAF: Decentralized Consensus-And-
Factorization for Low-Rank Adaptation of Foundation Models", arXiv 2505.21382. Averaging B and A
separately (DLoRA, ``D2oraMixer``) suffers "consensus interference": (Σ_j w_j B_j)(Σ_j w_j A_j)
contains the cross terms w_j w_l B_j A_l and is not the average update Σ_j w_j B_j A_j. DeCAF mixes
the products and re-factors the mix with a truncated SVD (TSVD):

    M_i = Σ_{j: W[i,j] ≠ 0} W[i, j] · s · B_j A_j,      s · B_i' A_i' = TSVD_r(M_i).

By Eckart–Young, TSVD_r(M_i) is the closest rank-r matrix to M_i in Frobenius norm, so it is at least
as close to the neighbourhood's average product as the product of averaged factors (itself rank ≤ r).

The out x in matrix M_i is never formed. With k neighbours (self included), M_i = L R where
L = [w_1 s B_1, ..., w_k s B_k] is (out, k·r) and R = [A_1; ...; A_k] is (k·r, in). Thin QR
factorisations L = Q_L R_L and Rᵀ = Q_R R_R give M_i = Q_L (R_L R_Rᵀ) Q_Rᵀ; the SVD of the small
(k·r x k·r) core C = R_L R_Rᵀ = U_c Σ V_cᵀ then yields M_i = (Q_L U_c) Σ (Q_R V_c)ᵀ, an exact SVD of
M_i because Q_L U_c and Q_R V_c have orthonormal columns. Cost O((out + in)(k r)² + (k r)³) instead of
O(out · in · min(out, in)). When k·r exceeds out or in (tiny layers), the reduced QR returns
min(out, k·r) (resp. min(in, k·r)) columns and everything above holds unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from d2ora.mixers._common import checked_weights, compute_dtype, mix_dense, mix_magnitude
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods


def factored_svd(
    left: torch.Tensor, right: torch.Tensor, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``left @ right`` without forming it: returns ``U (.., out, q)``, ``S (.., q)``,
    ``V (.., in, q)`` with ``left @ right = U diag(S) Vᵀ`` and ``q = min(out, in, n)``, or only the
    top ``q = min(rank, out, in, n)`` triplets when ``rank`` is given (the truncation happens on the
    small core, before the out- and in-sized products, which then cost ``rank`` columns, not n).

    ``left`` is ``(.., out, n)`` and ``right`` ``(.., n, in)``; any leading batch dims. Singular values
    come in descending order (LAPACK's); each pair (u_k, v_k) is sign-normalised so that the entry of
    largest magnitude in u_k is positive (the first such entry on exact ties), so results do not flip
    sign between otherwise identical calls (flipping u_k and v_k together leaves the product as is).
    """
    q_l, r_l = torch.linalg.qr(left)  # (.., out, q1), (.., q1, n)
    q_r, r_r = torch.linalg.qr(right.mT)  # (.., in, q2), (.., q2, n)
    core = r_l @ r_r.mT  # (.., q1, q2): q1, q2 <= n, so this SVD is small
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    if rank is not None:
        u_c, s, vh_c = u_c[..., :rank], s[..., :rank], vh_c[..., :rank, :]
    u = q_l @ u_c
    v = q_r @ vh_c.mT
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # (.., 1, q)
    sign = torch.gather(u, -2, pivot).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, v * sign


def decaf_factors(
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    rank: int | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(B, A)`` with ``s · B A = TSVD_rank(Σ_j w_j · s · B_j A_j)``, computed factored.

    Shapes: ``lora_b`` ``(.., k, out, r)``, ``lora_a`` ``(.., k, r, in)``, ``weights`` ``(.., k)``; the
    leading dims batch independent peers. Returns ``B (.., out, rank)`` and ``A (.., rank, in)``
    (``rank`` defaults to r), in the compute dtype (at least fp32). ``row_scale`` ``(.., k, out)``,
    when given, also scales row o of neighbour j's product: the matrix factored is then
    ``Σ_j w_j · s · diag(row_scale_j) B_j A_j`` (DoRA-exact consensus weights rows by g_j).

    How s is handled: the pair (B, A) represents M/s (the layer applies s·BA), so the singular
    values of M are divided by s before being split: B = U √(Σ/s), A = √(Σ/s) Vᵀ, hence
    s·B A = U Σ Vᵀ exactly. Splitting √ evenly ("balanced" factors, as DeCAF does) gives column k of
    B and row k of A the same norm √(σ_k/s); among all factorisations of M/s it has the least
    ‖B‖² + ‖A‖², and it does not depend on how the peers happened to distribute scale between their
    own B and A.

    Zero singular values: when the mixed product has rank < ``rank`` (all peers share A, or all B
    are still 0 at the start), the balanced split would give σ_k = 0 → B column 0 *and* A row 0.
    That pair is a saddle of the loss: grad B_k ∝ A_k = 0 and grad A_k ∝ B_k = 0, so the component
    could never train again. Instead, for numerically zero σ_k (σ_k ≤ σ_1 · max(out, in) · eps, the
    ``matrix_rank`` convention, or all of them when M = 0) the A row is the right singular vector v_k
    scaled to the neighbourhood's RMS A-row norm, and the B column is σ_k / (s · that norm) · u_k
    (≈ 0). The product is still exactly U Σ Vᵀ, and the component restarts like a LoRA component at
    initialisation (B = 0, A non-zero at the scale training already used), so grad B_k ≠ 0. The v_k
    are orthonormal to the kept directions (so the restarted rows are not redundant) and lie in the
    span of Q_R, which contains the neighbours' A rows; when M = 0 (all B still 0) the core is 0,
    LAPACK's SVD of it returns the identity, and A becomes the first r orthonormalised neighbour A
    rows at their scale (another backend may return another orthonormal basis of the same span).
    The split of a numerically-zero component is a convention with no effect on the product.

    If ``rank`` exceeds min(out, in) (an over-parameterised adapter) there are only min(out, in)
    singular directions; the remaining components get zero B columns and zero A rows. They add
    nothing expressible (any rank ≤ min(out, in) product is already representable).
    """
    if scaling <= 0:
        raise ValueError(f"DeCAF needs a positive LoRA scaling s, got {scaling}")
    *batch, k, out, r = lora_b.shape
    n_in = lora_a.shape[-1]
    rank = r if rank is None else rank
    dtype = compute_dtype(lora_b.dtype)
    b = lora_b.to(dtype)
    a = lora_a.to(dtype)
    w = weights.to(device=b.device, dtype=dtype)

    left = (w[..., None, None] * scaling) * b  # (.., k, out, r)
    if row_scale is not None:
        left = left * row_scale.to(device=b.device, dtype=dtype).unsqueeze(-1)
    left = left.movedim(-3, -2).reshape(*batch, out, k * r)  # [w_1 s B_1, ..., w_k s B_k]
    right = a.reshape(*batch, k * r, n_in)  # [A_1; ...; A_k]
    u, s, v = factored_svd(left, right, rank)
    return balanced_factors(u, s, v, scaling, a_row_rms(a, w), rank)


def a_row_rms(lora_a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The neighbourhood's RMS A-row norm ``(.., 1)``, weighted like the mix: the scale the peers' A
    rows already have, used for the rows that restart (see ``decaf_factors``). 1 when every A is 0."""
    r = lora_a.shape[-2]
    a_sq = lora_a.square().sum(dim=(-2, -1))  # (.., k)
    fill = ((weights.abs() * a_sq).sum(-1) / (weights.abs().sum(-1) * r)).sqrt()
    return torch.where(fill > 0, fill, torch.ones_like(fill)).unsqueeze(-1)


def balanced_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, scaling: float, fill: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``s·B A = U diag(S) Vᵀ``, split evenly (``decaf_factors`` explains the split, the
    restart of numerically-zero components at the A-row scale ``fill`` ``(.., 1)``, and the zero
    padding up to ``rank`` when fewer than ``rank`` triplets exist). ``u`` ``(.., out, q)``, ``s``
    ``(.., q)``, ``v`` ``(.., in, q)`` as :func:`factored_svd` returns them."""
    out, n_in, keep = u.shape[-2], v.shape[-2], s.shape[-1]  # keep = min(rank, out, in, k·r)
    tol = s[..., :1] * (max(out, n_in) * torch.finfo(s.dtype).eps)
    numerically_zero = s <= tol
    a_norm = torch.where(numerically_zero, fill.expand_as(s), (s / scaling).sqrt())
    b_norm = s / (scaling * a_norm)  # b_norm · a_norm = σ_k / s in every case
    new_b = u * b_norm.unsqueeze(-2)
    new_a = a_norm.unsqueeze(-1) * v.mT
    if keep < rank:
        batch = u.shape[:-2]
        new_b = torch.cat([new_b, new_b.new_zeros(*batch, out, rank - keep)], dim=-1)
        new_a = torch.cat([new_a, new_a.new_zeros(*batch, rank - keep, n_in)], dim=-2)
    return new_b, new_a


class DecafMixer:
    """DeCAF (arXiv 2505.21382): each peer's B, A become the rank-r truncated SVD of its closed
    neighbourhood's W-weighted average of the products s·B_j A_j; the DoRA magnitude m (one entry per
    output row, a fixed basis) and dense tensors are mixed linearly.

    The engine batches receivers by neighbourhood size, so a regular topology (ring, torus,
    complete graph) costs one batched QR/QR/SVD per layer. See ``decaf_factors`` for the handling of the scaling s,
    of zero singular values and of r > min(out, in).

    Optimizer state: ``factors_replaced = True``. The new B and A are expressed in the singular
    basis of the mixed product, not in the peer's old coordinates (row k of the new A is not row k of
    the old one), so Adam's first and second moments for A and B no longer refer to the same
    parameters and the engine resets them. The magnitude's moments are kept: m is mixed linearly,
    entry k is still output row k, exactly as for ``D2oraMixer``.
    Works for LoRA (``magnitude is None``) unchanged.
    """

    name: ClassVar[str] = "decaf"
    factors_replaced: ClassVar[bool] = True
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "products"  # it mixes s·B·A, so distances are between products

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        weights = checked_weights(hood)
        layers: dict[str, LayerStack] = {}
        for name, stack in hood.layers.items():
            # One batched factorisation over the g receivers (all have k neighbours).
            b, a = decaf_factors(stack.lora_b, stack.lora_a, weights, stack.scaling)
            layers[name] = LayerStack(
                lora_a=a.to(stack.lora_a.dtype),
                lora_b=b.to(stack.lora_b.dtype),
                magnitude=mix_magnitude(weights, stack.magnitude),
                scaling=stack.scaling,
            )
        return MixOutput(layers=layers, dense=mix_dense(weights, hood.dense))
