"""Where the robust rules measure distances: the base mixer's ``robust_space``.

Distances are measured where the base mixer mixes:

* ``"factors"`` (D²ORA, FedAvg): ‖x_j − x_l‖² = Σ_layers ‖ΔA‖² + ‖ΔB‖² + ‖Δm‖² + Σ ‖Δdense‖²,
  the flat adapter vector.
* ``"products"`` (DeCAF): Σ_layers ‖s·B_j A_j − s·B_l A_l‖_F² + ‖Δm‖² + Σ ‖Δdense‖², computed
  factored from (k·2r x k·2r) Gram matrices per layer and receiver (see ``centred_gram``); no
  out x in matrix is formed.

Everything here works on one centred Gram matrix per receiver, from which every squared distance
between members, or between a member and a combination of members, follows.
"""

from __future__ import annotations

from functools import reduce

import torch

from d2ora.mixers._common import compute_dtype
from d2ora.mixers.base import LayerStack, Neighbourhoods

SPACES = ("factors", "products")


def centred_gram(hood: Neighbourhoods, space: str) -> torch.Tensor:
    """K[g, j, l] = ⟨x_j − x_own, x_l − x_own⟩ between receiver g's neighbours in ``space``
    (``"factors"`` or ``"products"``, see the module docstring): (g, k, k), compute dtype.

    Every squared distance between combinations of the neighbours follows from K (see
    ``sq_distances``, ``pairwise_sq_distances``). Why centred on the receiver's own adapter: near
    consensus the peers agree to many digits, and ‖x_j‖² + ‖x_l‖² − 2⟨x_j, x_l⟩ would cancel
    catastrophically in fp32; differences taken *before* the inner products keep every entry at
    the scale of the spread.

    Products, factored: s·B_j A_j − s·B_i A_i = s·L_j R_j with L_j = [B_j − B_i, B_i] (out x 2r)
    and R_j = [A_j; A_j − A_i] (2r x in). With L = [L_1 .. L_k] and R = [R_1; ..; R_k],
    ⟨L_j R_j, L_l R_l⟩_F = trace(L_jᵀ L_l · R_l R_jᵀ) = Σ_ab (LᵀL)[ja, lb] · (R Rᵀ)[ja, lb], so one
    pair of (k·2r x k·2r) Gram matrices per layer gives all of K, batched over the g receivers.
    """
    if space not in SPACES:
        raise ValueError(f"unknown robust space {space!r}; valid: {', '.join(SPACES)}")
    g, k = hood.receivers, hood.size
    factors = [t for s in hood.layers.values() for t in (s.lora_a, s.lora_b)]
    flat = [s.magnitude for s in hood.layers.values() if s.magnitude is not None] + list(hood.dense.values())
    every = flat + factors
    if space == "factors":
        flat = every  # A and B are plain coordinates too
    if not every:
        return torch.zeros(g, k, k, dtype=compute_dtype(hood.weights.dtype))
    dtype = compute_dtype(reduce(torch.promote_types, (t.dtype for t in every)))
    device = every[0].device
    rows, own = torch.arange(g, device=device), hood.own.to(device)
    gram = torch.zeros(g, k, k, dtype=dtype, device=device)
    for t in flat:
        x = t.reshape(g, k, -1).to(dtype)
        d = x - x[rows, own].unsqueeze(1)
        gram += d @ d.mT
    if space == "products":
        for stack in hood.layers.values():
            gram += _product_gram(stack, rows, own, dtype)
    return gram


def _product_gram(stack: LayerStack, rows: torch.Tensor, own: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One layer's ⟨s(B_jA_j − B_iA_i), s(B_lA_l − B_iA_i)⟩_F, (g, k, k): see ``centred_gram``."""
    b, a = stack.lora_b.to(dtype), stack.lora_a.to(dtype)  # (g, k, out, r), (g, k, r, in)
    b_own, a_own = b[rows, own].unsqueeze(1), a[rows, own].unsqueeze(1)
    left = torch.cat([b - b_own, b_own.expand_as(b)], dim=-1)  # L_j: (g, k, out, 2r)
    right = torch.cat([a, a - a_own], dim=-2)  # R_j: (g, k, 2r, in)
    g, k, out, r2 = left.shape
    left = left.movedim(1, 2).reshape(g, out, k * r2)  # [L_1 .. L_k]
    right = right.reshape(g, k * r2, -1)  # [R_1; ..; R_k]
    hadamard = (left.mT @ left) * (right @ right.mT)  # (g, k·2r, k·2r)
    return stack.scaling**2 * hadamard.reshape(g, k, r2, k, r2).sum(dim=(2, 4))


def sq_distances(gram: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """‖x_j − Σ_l c_l x_l‖² for every member j, (g, k), from the centred Gram K (g, k, k) and
    coefficients c (g, k) summing to 1: (e_j − c)ᵀ K (e_j − c); exact 0 is possible (no τ/0 here)."""
    kc = (gram @ coeffs.unsqueeze(-1)).squeeze(-1)
    ckc = (coeffs * kc).sum(-1, keepdim=True)
    return (gram.diagonal(dim1=-2, dim2=-1) - 2 * kc + ckc).clamp_min(0)


def pairwise_sq_distances(gram: torch.Tensor) -> torch.Tensor:
    """‖x_j − x_l‖² for every pair, (g, k, k), zero on the diagonal."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    dist = (diag.unsqueeze(-1) + diag.unsqueeze(-2) - 2 * gram).clamp_min(0)
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return dist.masked_fill(eye, 0.0)
