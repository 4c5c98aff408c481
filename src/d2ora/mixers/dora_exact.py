"""DoRA-exact consensus: mix the peers' *merged* weights, then factor back to a DoRA adapter.

Peer j's merged weight is ``W'_j = diag(g_j) (W0 + s·B_j A_j)`` with ``g_j = m_j / ||W0 + s·B_j A_j||_c``
(one scale per output row). D²ORA averages m, B and A separately and DeCAF averages the products
B_j A_j; neither gives the average of the W'_j, because g_j differs between peers and multiplies
each peer's whole row. The weighted mean of the merged weights is exactly

    W̄ = Σ_j w_j W'_j = diag(ḡ) (W0 + s·D),   ḡ = Σ_j w_j g_j,   D = Σ_j diag(w_j g_j / ḡ) B_j A_j,

(expand: diag(ḡ) W0 = Σ_j w_j diag(g_j) W0 and diag(ḡ) s D = Σ_j w_j diag(g_j) s B_j A_j), a
row-rescaled sum of rank-r products: a rank-r DoRA adapter can hold it when D has rank ≤ r.

What it minimises. The new adapter's merged weight is ``W_new = diag(c)(W0 + s·B'A')`` with
``c = m' / ||W0 + s·B'A'||_c``; we look for rank-r B', A' and a row scale c making ``||W_new − W̄||_F``
small. Jointly this is non-convex, but each half is exact:

(a) TSVD step, c fixed. The error is ``s·diag(c)B'A' − (diag(ḡ − c) W0 + s·diag(ḡ) D)``, and
    diag(c)B' ranges over every out x r matrix when no c_o is 0, so Eckart–Young gives
    ``s·diag(c)B'A' = TSVD_r(diag(ḡ − c) W0 + s·diag(ḡ) D)``. At c = ḡ the W0 term vanishes and this is
    the fixed-scale rule ``diag(ḡ)B'A' = TSVD_r(diag(ḡ) D)`` (rows with a large scale count more, as
    they do in W'); it needs no truncation when rank D ≤ r (e.g. peers sharing A), and then W_new = W̄.
(b) Scale step, B', A' fixed. Each row's error ``c_o V_o − W̄_o`` (V = W0 + s·B'A') is a 1-D least
    squares problem: ``c_o = ⟨W̄_o, V_o⟩ / ||V_o||²``.

Alternating (a) and (b) from c = ḡ never increases the distance; it stops after ``SCALE_ITERATIONS``
rounds or once a round gains less than ``SCALE_TOL`` (relative, squared distance). The answer is the
closest of every half-step, the fixed-scale answer (the first (a)), DeCAF's merge (TSVD of the plain
mix Σ_j w_j s·B_j A_j with m mixed linearly) and DeCAF's product at its best scale (one (b)), so it is
never farther from W̄ than either baseline. Then ``m' = c ⊙ ||W0 + s·B'A'||_c`` makes the adapter's
own scale exactly c. On the random cases of tests/test_dora_exact.py (distinct A per peer, 822
receivers that need truncation) the result is on average 19% closer to W̄ than the fixed-scale rule
(median 10%, least 0.08%) and 47% closer than DeCAF; the fixed-scale rule beat DeCAF on 97% of them.

Working in factored form. Step (a) at c ≠ ḡ truncates ``diag(ḡ − c) W0 + low rank``, a full-rank
out x in matrix: its exact TSVD is a dense SVD of W0's size, which a factored form cannot give. We
do what is exact in factored form: A' is kept in the span of the peers' stacked A rows, where the
fixed-scale answer and DeCAF's already lie. With the thin QR ``[A_1; ...; A_k]ᵀ = Q_R R_R``
(Q_R: in x q, q ≤ k·r orthonormal columns), split each W0 row into ``P_o = (W0 Q_R)_o`` in the span and
a part ``W0⊥_o`` orthogonal to it, of squared norm ``ω_o² = ||W0_o||² − ||P_o||²`` (Pythagoras; 0 when
q = in). Every row of W̄ and of V is then a vector in span(Q_R) ⊕ span(W0⊥_o):

    W̄_o = ḡ_o·W0⊥_o + (ḡ_o P_o + N_o) Q_Rᵀ,     N = s·Σ_j diag(w_j g_j) B_j (A_j Q_R)  (out x q),
    V_o = W0⊥_o + (P_o + z_o) Q_Rᵀ,              z = coordinates of s·B'A' (out x q, rank ≤ r),

with A_j Q_R the blocks of R_Rᵀ. Hence, exactly,

    ||diag(c)V − W̄||²_F = Σ_o (c_o − ḡ_o)² ω_o² + ||diag(c)(P + z) − diag(ḡ)P − N||²_F,
    ⟨W̄_o, V_o⟩ = ḡ_o ω_o² + (ḡ_o P_o + N_o)·(P_o + z_o),   ||V_o||² = ω_o² + ||P_o + z_o||²,

(the expansion ``||V_o||² = ||W0_o||² + 2 (W0 A'ᵀ)_o·s B'_o + s² B'_o (A'A'ᵀ) B'_oᵀ`` of
:func:`~d2ora.dora.math.factored_row_norms` written in Q_R coordinates: W0's row norms, the one
product W0 Q_R, and Gram matrices that are the identity in the orthonormal basis, so the r x r Gram
A'A'ᵀ becomes a dot product of z rows; likewise for ⟨W̄_o, V_o⟩, whose W0 A_jᵀ products are P R_R).
So (b) costs O(out·q), and (a) restricted to A' ⊂ span(Q_R) is Eckart–Young on the out x q matrix
``diag(ḡ − c) P + N`` (z = TSVD_r(·) / c), an O(out·q²) SVD; the W0⊥ part does not depend on z. Both
steps are exact minimisers over this set, so the alternation is monotone. What the restriction
gives up: at c ≠ ḡ an A' outside the span could also absorb part of diag(ḡ − c)·W0⊥, which only a
dense SVD of W0's size would find. Memory stays O(out·q + in·q); no out x in matrix besides W0 is
formed. The winner's factors come from the SVD of diag(c)·z lifted by Q_R (B' = that / c, balanced as
in DeCAF, with its restart rule for zero singular values: :func:`~d2ora.mixers.decaf.balanced_factors`),
and m' from their row norms (:func:`~d2ora.dora.math.factored_row_norms`).

Rows whose scale is (near) zero. A row with ||W0 + s·B_j A_j||_c = 0 gets g_j = m_j by d2ora's
zero-norm rule (:func:`~d2ora.dora.math.magnitude_scale`). Where the mean scale ḡ_o itself is 0 (or
within ``NEAR_ZERO`` of the layer's largest |ḡ|), the mean merged row is 0 whatever D's row is, the
weights w_j g_j / ḡ_o are undefined (or huge and noisy), and the weighted SVD would ignore the row.
Such rows use the plain product weights instead (g_j := 1, so D's row is Σ_j w_j (B_j A_j)_o / Σ_j w_j,
DeCAF's) in every TSVD step, keep c_o = ḡ_o (the scale step does not move them), and
m'_o = ḡ_o·||·|| ≈ 0 keeps their merged row at the mean's ≈ 0. (Their TSVD row is not the true
objective's, so with such rows the alternation may not be monotone; keeping the best guards it.)
The scale step also leaves a row's scale as it is where V_o = 0 (any scale fits) or where its
optimum is within ``NEAR_ZERO`` of 0 (B' = ·/c would blow up), so the TSVD step never divides by ~0.

LoRA (no magnitude) has g_j = 1, so ḡ = Σ_j w_j, and no scale to optimise: the alternation is skipped
and, with weights summing to 1 (every mixing row does), this is DeCAF exactly. The classification
head and other dense tensors are mixed linearly.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from d2ora.dora.math import factored_row_norms, magnitude_scale, row_sq_norms
from d2ora.mixers._common import checked_weights, compute_dtype, mix_dense
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods
from d2ora.mixers.decaf import a_row_rms, balanced_factors, decaf_factors, factored_svd

#: A row whose mean scale |ḡ_o| is at most this times the layer's largest |ḡ| counts as zero (its
#: merged row is 0 to fp32 precision, and 1/ḡ_o would amplify rounding noise).
NEAR_ZERO = 1e-6

#: Default cap on the rounds of the scale/TSVD alternation (a round: one scale step and one TSVD step,
#: an (out x k·r) SVD, cheap next to the one W0·Q_R product). Convergence is linear: on random
#: trained-looking cases 8 rounds give ~85% of the gain 128 rounds give, 16 about 90%.
#: ``DoraExactMixer(scale_iterations=...)`` overrides it; 0 is the fixed-scale rule (c = ḡ).
SCALE_ITERATIONS = 16
#: Stop early once a round shrinks every receiver's squared distance to W̄ by less than this fraction.
SCALE_TOL = 1e-4


def dora_exact_factors(
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    magnitude: torch.Tensor | None,
    weights: torch.Tensor,
    base_weight: torch.Tensor,
    scaling: float,
    rank: int | None = None,
    *,
    iterations: int = SCALE_ITERATIONS,
    tol: float = SCALE_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """New ``(B', A', m')``: the rank-``rank`` DoRA adapter whose merged weight ``diag(c)(W0 + s·B'A')``
    is the closest to ``W̄ = Σ_j w_j W'_j`` met while alternating the TSVD step and the row-scale step
    from ``c = ḡ``, with DeCAF's merge also in the running: never farther from W̄ than the fixed-scale
    rule or DeCAF (see the module docstring).
    ``iterations=0`` (and LoRA, which has no scale) is the fixed-scale rule: ``c = ḡ``,
    ``diag(ḡ) s·B'A' = TSVD_rank(Σ_j w_j diag(g_j) s·B_j A_j)``.

    Shapes: ``lora_b`` ``(.., k, out, r)``, ``lora_a`` ``(.., k, r, in)``, ``magnitude`` ``(.., k, out)`` or
    None (LoRA), ``weights`` ``(.., k)``, ``base_weight`` W0 ``(out, in)``. Returns ``B' (.., out, rank)``,
    ``A' (.., rank, in)``, ``m' (.., out)`` (None for LoRA) in the compute dtype (at least fp32).
    ``iterations`` caps the alternation rounds; it stops earlier once a round improves the squared
    distance of every receiver by less than the fraction ``tol``.
    """
    dtype = compute_dtype(lora_b.dtype)
    b = lora_b.to(dtype)
    a = lora_a.to(dtype)
    w = weights.to(device=b.device, dtype=dtype)
    w0 = base_weight.to(device=b.device, dtype=dtype)
    if w0.shape != (b.shape[-2], a.shape[-1]):
        raise ValueError(f"base weight has shape {tuple(w0.shape)}, the adapter is ({b.shape[-2]}, {a.shape[-1]})")
    check_scale_options(iterations, tol)
    rank = b.shape[-1] if rank is None else rank
    w0_sq = row_sq_norms(w0)
    if magnitude is None:
        g = torch.ones(b.shape[:-1], dtype=dtype, device=b.device)  # (.., k, out)
    else:
        g = magnitude_scale(magnitude.to(dtype), factored_row_norms(w0, w0_sq, a, b, scaling))
    total = w.sum(-1, keepdim=True)  # (.., 1)
    g_bar = (w.unsqueeze(-1) * g).sum(-2)  # (.., out)
    largest = g_bar.abs().amax(-1, keepdim=True)
    near_zero = g_bar.abs() <= NEAR_ZERO * largest  # every row when all scales are 0
    row_weight = torch.where(near_zero, total.expand_as(g_bar), g_bar)
    row_weight = torch.where(row_weight == 0, torch.ones_like(row_weight), row_weight)  # all weights 0
    if magnitude is None or iterations == 0:
        row_scale = torch.where(near_zero.unsqueeze(-2), torch.ones_like(g), g)
        weighted_b, new_a = decaf_factors(b, a, w, scaling, rank, row_scale=row_scale)  # diag(ḡ)·B', A'
        new_b = weighted_b / row_weight.unsqueeze(-1)
        new_m = None if magnitude is None else g_bar * factored_row_norms(w0, w0_sq, new_a, new_b, scaling)
        return new_b, new_a, new_m
    problem = _ScaleProblem(b, a, w, g, g_bar, near_zero, row_weight, w0, w0_sq, scaling, rank)
    mean_m = (w.unsqueeze(-1) * magnitude.to(dtype)).sum(-2)  # DeCAF's linearly mixed m
    c, z = problem.best(mean_m, iterations, tol)
    # The winning candidate's factors, split like the fixed-scale rule: diag(ρ)·B' balanced against A',
    # ρ = c (Σ_j w_j on near-zero rows, their rule; 1 where c itself is ~0: any ρ ≠ 0 gives the same product).
    rho = torch.where(near_zero, row_weight, torch.where(c.abs() > NEAR_ZERO * largest, c, torch.ones_like(c)))
    u, sigma, v = factored_svd(rho.unsqueeze(-1) * z, problem.basis.mT, rank)
    weighted_b, new_a = balanced_factors(u, sigma, v, scaling, a_row_rms(a, w), rank)
    new_b = weighted_b / rho.unsqueeze(-1)
    return new_b, new_a, c * factored_row_norms(w0, w0_sq, new_a, new_b, scaling)


def check_scale_options(iterations: int, tol: float) -> None:
    """One clear error for a bad alternation option (a float count or a NaN tolerance would
    otherwise fail deep inside the loop, or never stop it early)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"dora_exact scale_iterations must be an integer >= 0, got {iterations!r}")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"dora_exact scale_tol must be a finite number >= 0, got {tol!r}")


class _ScaleProblem:
    """The alternation in the coordinates of the module docstring: every row lives in span(Q_R) ⊕ the
    row's own W0⊥ direction, so a candidate is (c, z) with c ``(.., out)`` and z ``(.., out, q)`` the
    coordinates of s·B'A' in the orthonormal basis Q_R ``(.., in, q)`` of the peers' stacked A rows."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor, w: torch.Tensor, g: torch.Tensor, g_bar: torch.Tensor,
                 near_zero: torch.Tensor, row_weight: torch.Tensor, w0: torch.Tensor, w0_sq: torch.Tensor,
                 scaling: float, rank: int) -> None:
        *batch, k, out, r = b.shape
        n_in = a.shape[-1]
        self.basis, r_r = torch.linalg.qr(a.reshape(*batch, k * r, n_in).mT)  # Q_R (.., in, q), R_R (.., q, kr)
        a_coords = r_r.mT  # [A_1; ...; A_k] = R_Rᵀ Q_Rᵀ: the stacked A rows in the basis, (.., kr, q)
        self.p = torch.matmul(w0, self.basis)  # W0 Q_R (.., out, q): the one product with W0
        if self.basis.shape[-1] == n_in:  # the basis spans the whole input space: no W0⊥ part
            self.perp_sq = torch.zeros_like(self.p[..., 0])
        else:  # ||W0⊥_o||² = ||W0_o||² − ||(W0 Q_R)_o||² (Pythagoras), clamped against rounding
            self.perp_sq = (w0_sq.to(self.p.dtype) - self.p.square().sum(-1)).clamp_min(0.0)

        def product_coords(row_scale: torch.Tensor) -> torch.Tensor:  # s·Σ_j w_j diag(row_scale_j) B_j A_j · Q_R
            left = (w[..., None, None] * scaling) * b * row_scale.unsqueeze(-1)
            return left.movedim(-3, -2).reshape(*batch, out, k * r) @ a_coords

        self.n = product_coords(g)  # ḡ ⊙ s·D: W̄'s low-rank part
        self.n_plain = product_coords(torch.ones_like(g))  # DeCAF's mixed product s·Σ_j w_j B_j A_j
        self.target = g_bar.unsqueeze(-1) * self.p + self.n  # W̄'s rows in the basis (their W0⊥ part is ḡ·W0⊥)
        self.g_bar, self.near_zero, self.row_weight, self.rank = g_bar, near_zero, row_weight, rank
        self.small = NEAR_ZERO * g_bar.abs().amax(-1, keepdim=True)

    def distance_sq(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """||diag(c)(W0 + s·B'A') − W̄||²_F per receiver ``(..)``, exact (the two parts are orthogonal)."""
        inside = (c.unsqueeze(-1) * (self.p + z) - self.target).square().sum((-2, -1))
        return inside + ((c - self.g_bar).square() * self.perp_sq).sum(-1)

    def tsvd_step(self, c: torch.Tensor) -> torch.Tensor:
        """(a) The best rank-r z at scale c: diag(c)·z = TSVD_r(diag(ḡ − c)·W0 Q_R + N) (Eckart–Young on
        the in-span part; the W0⊥ part does not depend on z). Near-zero rows use today's rule."""
        tau = torch.where(self.near_zero.unsqueeze(-1), self.n_plain, (self.g_bar - c).unsqueeze(-1) * self.p + self.n)
        rho = torch.where(self.near_zero, self.row_weight, c)
        return _truncate(tau, self.rank) / rho.unsqueeze(-1)

    def scale_step(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(b) Each row's least-squares scale c_o = ⟨W̄_o, V_o⟩ / ||V_o||², V = W0 + s·B'A'. Near-zero rows
        keep ḡ; a row with V_o = 0 (any scale fits) or an optimum ~0 (1/c would blow up B') keeps its
        scale, or ḡ where that is ~0 too, so c never reaches the division in ``tsvd_step`` as ~0."""
        v = self.p + z
        num = self.g_bar * self.perp_sq + (self.target * v).sum(-1)
        den = self.perp_sq + v.square().sum(-1)
        fresh = num / torch.where(den > 0, den, torch.ones_like(den))
        keep = torch.where(c.abs() > self.small, c, self.g_bar)
        fresh = torch.where((den > 0) & (fresh.abs() > self.small), fresh, keep)
        return torch.where(self.near_zero, self.g_bar, fresh)

    def best(self, mean_m: torch.Tensor, iterations: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The closest candidate (c, z) met: the fixed-scale answer, every half-step of the alternation
        that starts from it, DeCAF's merge, and DeCAF's product at its own best row scale."""
        c = self.g_bar
        z = self.tsvd_step(c)  # the fixed-scale rule (iterations=0), in the basis
        best_f, best_c, best_z = self.distance_sq(c, z), c, z
        z_decaf = _truncate(self.n_plain, self.rank)  # DeCAF's s·B A in the basis
        norms = (self.perp_sq + (self.p + z_decaf).square().sum(-1)).sqrt()
        c_decaf = magnitude_scale(mean_m, norms)  # DeCAF's merged scale m̄ / ||W0 + s·BA||_c
        for c_other in (c_decaf, self.scale_step(c_decaf, z_decaf)):
            f_other = self.distance_sq(c_other, z_decaf)
            best_f, best_c, best_z = _keep_better(best_f, best_c, best_z, f_other, c_other, z_decaf)
        # Both half-steps are exact minimisers, so the distance never grows along the chain (up to
        # rounding, and apart from near-zero rows, whose TSVD row follows today's rule): keeping the
        # best seen is a guard, and it is what makes the result never worse than the two baselines.
        for _ in range(iterations):
            before = best_f
            c = self.scale_step(c, z)
            best_f, best_c, best_z = _keep_better(best_f, best_c, best_z, self.distance_sq(c, z), c, z)
            z = self.tsvd_step(c)
            best_f, best_c, best_z = _keep_better(best_f, best_c, best_z, self.distance_sq(c, z), c, z)
            gain = (before - best_f) / torch.where(before > 0, before, torch.ones_like(before))
            if bool((gain <= tol).all()):
                break
        return best_c, best_z


def _truncate(x: torch.Tensor, rank: int) -> torch.Tensor:
    """TSVD_rank of a small (.., out, q) matrix (q ≤ k·r), via LAPACK's SVD."""
    u, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    top = min(rank, sigma.shape[-1])
    return (u[..., :top] * sigma[..., None, :top]) @ vh[..., :top, :]


def _keep_better(best_f: torch.Tensor, best_c: torch.Tensor, best_z: torch.Tensor, f: torch.Tensor,
                 c: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per receiver, the candidate with the smaller distance (the incumbent on ties and NaN)."""
    better = f < best_f
    return (torch.where(better, f, best_f), torch.where(better.unsqueeze(-1), c, best_c),
            torch.where(better[..., None, None], z, best_z))


class DoraExactMixer:
    """Each receiver's new adapter is a rank-r DoRA adapter whose merged weight is close to the weighted
    mean of its neighbourhood's merged weights: the best of the fixed-scale rule (mean per-row scale ḡ,
    exact when the mean needs no truncation), DeCAF's merge and ``scale_iterations`` rounds of the
    alternation that also optimises the row scale (module docstring). Needs the frozen base weights
    (``Neighbourhoods.base_weights``), which every peer holds.

    Options: ``scale_iterations`` (default ``SCALE_ITERATIONS``; 0 = the fixed-scale rule) and
    ``scale_tol`` (default ``SCALE_TOL``), e.g. ``make_mixer("dora_exact", scale_iterations=4)``.

    Like DeCAF it re-expresses B and A in the singular basis of the mix (``factors_replaced``: the
    engine resets their optimizer moments); unlike DeCAF it also rewrites m (to c·||W0 + s·B'A'||_c).
    Byzantine-robust wrappers measure distances between products, as for DeCAF.
    """

    name: ClassVar[str] = "dora_exact"
    factors_replaced: ClassVar[bool] = True
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "products"

    def __init__(self, *, scale_iterations: int = SCALE_ITERATIONS, scale_tol: float = SCALE_TOL) -> None:
        check_scale_options(scale_iterations, scale_tol)
        self.scale_iterations = scale_iterations
        self.scale_tol = scale_tol

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        weights = checked_weights(hood)
        base = hood.base_weights or {}
        missing = [name for name in hood.layers if name not in base]
        if missing:
            raise ValueError(f"dora_exact needs every adapted layer's frozen base weight; none for {missing[:3]}")
        layers: dict[str, LayerStack] = {}
        for name, stack in hood.layers.items():
            b, a, m = dora_exact_factors(stack.lora_b, stack.lora_a, stack.magnitude, weights, base[name],
                                         stack.scaling, iterations=self.scale_iterations, tol=self.scale_tol)
            layers[name] = LayerStack(
                lora_a=a.to(stack.lora_a.dtype),
                lora_b=b.to(stack.lora_b.dtype),
                magnitude=None if m is None else m.to(stack.magnitude.dtype),
                scaling=stack.scaling,
            )
        return MixOutput(layers=layers, dense=mix_dense(weights, hood.dense))
