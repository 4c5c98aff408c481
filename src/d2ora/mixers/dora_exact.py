"""DoRA-exact consensus: mix the peers' *merged* weights, then factor back to a DoRA adapter.

Peer j's merged weight is ``W'_j = diag(g_j) (W0 + s·B_j A_j)`` with ``g_j = m_j / ||W0 + s·B_j A_j||_c``
(one scale per output row). D²ORA averages m, B and A separately and DeCAF averages the products
B_j A_j; neither gives the average of the W'_j, because g_j differs between peers and multiplies
each peer's whole row. The weighted mean of the merged weights is exactly

    W̄ = Σ_j w_j W'_j = diag(ḡ) (W0 + s·D),   ḡ = Σ_j w_j g_j,   D = Σ_j diag(w_j g_j / ḡ) B_j A_j,

(expand: diag(ḡ) W0 = Σ_j w_j diag(g_j) W0 and diag(ḡ) s D = Σ_j w_j diag(g_j) s B_j A_j), a
row-rescaled sum of rank-r products: a rank-r DoRA adapter can hold it when D has rank ≤ r.

What it minimises. Keep the new per-row scale at ḡ and look for rank-r factors B', A': the new
merged weight is ``diag(ḡ)(W0 + s·B'A')``, so its error against W̄ is ``s·(diag(ḡ) B'A' − diag(ḡ) D)``.
Since diag(ḡ)B' ranges over every out x r matrix when no ḡ_o is 0, Eckart–Young says the Frobenius
error ``||W_new − W̄||_F`` is smallest for ``diag(ḡ) B'A' = TSVD_r(diag(ḡ) D)``: the rank-r truncated SVD
of the row-weighted mix, with the rows scaled back by 1/ḡ afterwards. So among all adapters whose
merged rows keep the mean scale ḡ, this is the one whose merged weight is closest to the mean
merged weight; rows with a large scale count more, as they do in W'. (Choosing the scale too is a
non-convex problem; fixing it at ḡ makes the rest exact.) Then ``m' = ḡ ⊙ ||W0 + s·B'A'||_c`` makes the
new adapter's own scale ``m' / ||W0 + s·B'A'||_c`` equal ḡ, so its merged weight is exactly
``diag(ḡ)(W0 + s·B'A')``. With no truncation needed (rank D ≤ r, e.g. peers sharing A) that is W̄.

The out x in matrix is never formed: diag(ḡ)·D = Σ_j diag(w_j g_j)·B_j A_j is factored as
``[diag(w_1 g_1) s B_1, ..., diag(w_k g_k) s B_k] · [A_1; ...; A_k]`` and truncated with DeCAF's
QR–QR–small-SVD (:func:`~d2ora.mixers.decaf.decaf_factors`, which also handles zero singular
values and the scaling s). The row norms ||W0 + s·B A||_c come from the factored formula
(:func:`~d2ora.dora.math.factored_row_norms`), O(out·r) memory.

Rows whose scale is (near) zero. A row with ||W0 + s·B_j A_j||_c = 0 gets g_j = m_j by d2ora's
zero-norm rule (:func:`~d2ora.dora.math.magnitude_scale`). Where the mean scale ḡ_o itself is 0 (or
within ``NEAR_ZERO`` of the layer's largest |ḡ|), the mean merged row is 0 whatever D's row is, the
weights w_j g_j / ḡ_o are undefined (or huge and noisy), and the weighted SVD would ignore the row.
Such rows use the plain product weights instead (g_j := 1, so D's row is Σ_j w_j (B_j A_j)_o / Σ_j w_j,
DeCAF's) and m'_o = ḡ_o·||·|| ≈ 0 keeps their merged row at the mean's ≈ 0.

LoRA (no magnitude) has g_j = 1, so ḡ = Σ_j w_j: with weights summing to 1 (every mixing row does)
this is DeCAF exactly. The classification head and other dense tensors are mixed linearly.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from d2ora.dora.math import factored_row_norms, magnitude_scale, row_sq_norms
from d2ora.mixers._common import checked_weights, compute_dtype, mix_dense
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods
from d2ora.mixers.decaf import decaf_factors

#: A row whose mean scale |ḡ_o| is at most this times the layer's largest |ḡ| counts as zero (its
#: merged row is 0 to fp32 precision, and 1/ḡ_o would amplify rounding noise).
NEAR_ZERO = 1e-6


def dora_exact_factors(
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    magnitude: torch.Tensor | None,
    weights: torch.Tensor,
    base_weight: torch.Tensor,
    scaling: float,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """New ``(B', A', m')`` whose merged weight is ``diag(ḡ)(W0 + s·B'A')`` with
    ``diag(ḡ) s·B'A' = TSVD_rank(Σ_j w_j diag(g_j) s·B_j A_j)`` (see the module docstring).

    Shapes: ``lora_b`` ``(.., k, out, r)``, ``lora_a`` ``(.., k, r, in)``, ``magnitude`` ``(.., k, out)`` or
    None (LoRA), ``weights`` ``(.., k)``, ``base_weight`` W0 ``(out, in)``. Returns ``B' (.., out, rank)``,
    ``A' (.., rank, in)``, ``m' (.., out)`` (None for LoRA) in the compute dtype (at least fp32).
    """
    dtype = compute_dtype(lora_b.dtype)
    b = lora_b.to(dtype)
    a = lora_a.to(dtype)
    w = weights.to(device=b.device, dtype=dtype)
    w0 = base_weight.to(device=b.device, dtype=dtype)
    if w0.shape != (b.shape[-2], a.shape[-1]):
        raise ValueError(f"base weight has shape {tuple(w0.shape)}, the adapter is ({b.shape[-2]}, {a.shape[-1]})")
    w0_sq = row_sq_norms(w0)
    if magnitude is None:
        g = torch.ones(b.shape[:-1], dtype=dtype, device=b.device)  # (.., k, out)
    else:
        g = magnitude_scale(magnitude.to(dtype), factored_row_norms(w0, w0_sq, a, b, scaling))
    total = w.sum(-1, keepdim=True)  # (.., 1)
    g_bar = (w.unsqueeze(-1) * g).sum(-2)  # (.., out)
    largest = g_bar.abs().amax(-1, keepdim=True)
    near_zero = g_bar.abs() <= NEAR_ZERO * largest  # every row when all scales are 0
    row_scale = torch.where(near_zero.unsqueeze(-2), torch.ones_like(g), g)
    row_weight = torch.where(near_zero, total.expand_as(g_bar), g_bar)
    row_weight = torch.where(row_weight == 0, torch.ones_like(row_weight), row_weight)  # all weights 0
    weighted_b, new_a = decaf_factors(b, a, w, scaling, rank, row_scale=row_scale)  # diag(ḡ)·B', A'
    new_b = weighted_b / row_weight.unsqueeze(-1)
    new_m = None
    if magnitude is not None:
        new_m = g_bar * factored_row_norms(w0, w0_sq, new_a, new_b, scaling)
    return new_b, new_a, new_m


class DoraExactMixer:
    """Each receiver's new adapter is the rank-r DoRA adapter whose merged weight is closest to the
    weighted mean of its neighbourhood's merged weights, at the mean per-row scale (exact when the
    mean needs no truncation). Needs the frozen base weights (``Neighbourhoods.base_weights``), which
    every peer holds.

    Like DeCAF it re-expresses B and A in the singular basis of the mix (``factors_replaced``: the
    engine resets their optimizer moments); unlike DeCAF it also rewrites m (to ḡ·||W0 + s·B'A'||_c).
    Byzantine-robust wrappers measure distances between products, as for DeCAF.
    """

    name: ClassVar[str] = "dora_exact"
    factors_replaced: ClassVar[bool] = True
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "products"

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        weights = checked_weights(hood)
        base = hood.base_weights or {}
        missing = [name for name in hood.layers if name not in base]
        if missing:
            raise ValueError(f"dora_exact needs every adapted layer's frozen base weight; none for {missing[:3]}")
        layers: dict[str, LayerStack] = {}
        for name, stack in hood.layers.items():
            b, a, m = dora_exact_factors(stack.lora_b, stack.lora_a, stack.magnitude, weights, base[name], stack.scaling)
            layers[name] = LayerStack(
                lora_a=a.to(stack.lora_a.dtype),
                lora_b=b.to(stack.lora_b.dtype),
                magnitude=None if m is None else m.to(stack.magnitude.dtype),
                scaling=stack.scaling,
            )
        return MixOutput(layers=layers, dense=mix_dense(weights, hood.dense))
