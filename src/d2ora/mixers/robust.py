"""Byzantine-robust aggregation: each receiver screens its own closed neighbourhood before mixing.

Plain gossip is linear in what the neighbours send, so one Byzantine neighbour can drag every
receiver arbitrarily far. ``RobustMixer`` wraps a base mixer with one of six rules; receiver i
applies it to its k neighbours (itself included: its own adapter is honest from its own point of
view) and tolerates ``byzantine`` = f of them:

* ``trimmed_mean``: at every coordinate drop the f largest and f smallest of the k values and
  average the rest, unweighted. Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv 1803.01498. Needs k > 2f.
* ``median``: the coordinate-wise median (same paper); for even k the mean of the two middle
  values. Also needs k > 2f (below that the attackers are the majority at some coordinate).
* ``krum`` / ``multi_krum``: score_j = Σ of squared distances from x_j to its k − f − 2 nearest
  other members; krum keeps the best-scored member (possibly not the receiver itself), multi-krum
  the best ``select`` (1..k, default k − f as in the paper) and mixes them with the receiver's
  weights renormalised over the kept ones; ties go to the lower column. Blanchard, El Mhamdi,
  Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017. Needs k > f + 2 (a ring's k = 3 allows only f = 0).
* ``centered_clipping``: v ← v + Σ_j w_j · clip(x_j − v, τ), ``iterations`` times (default 3)
  from v = x_i, with clip(z, τ) = z · min(1, τ/‖z‖). Karimireddy, He, Jaggi, "Learning from History
  for Byzantine Robust Optimization", ICML 2021, arXiv 2012.10333.
* ``self_centered_clipping``: x_i' = x_i + Σ_j w_ij · clip(x_j − x_i, τ_i), one step centred on
  one's own adapter (= one iteration of the above). He, Karimireddy, Jaggi, "Byzantine-Robust
  Decentralized Learning via ClippedGossip", arXiv 2202.01545.

Clipping radius τ: a positive float (absolute, ``inf`` allowed), or None = adaptive: τ_i is the
(f+1)-th largest distance from the current centre among the receiver's *other* neighbours, so the f
farthest are pulled in to the radius of the next one and no single sender can move the result by
more than what an honest-looking neighbour already does. With f = 0 nothing is clipped; with
f ≥ k − 1 every other neighbour may be Byzantine, τ = 0 and the receiver keeps its own adapter.
(He et al. tune τ from the honest spread; the adaptive choice needs no tuning and is scale-free.)
The receiver's own adapter is never clipped (it is trusted), so each step's fixed point is the
plain mix whenever nothing else is clipped.

Re-weighting. Krum, multi-krum and both clippings return Σ_j c_j x_j with new weights c (g, k) that
are non-negative and sum to 1 (clipping: x_j's weight becomes w_j t_j, t_j = min(1, τ/‖x_j − v‖),
and the rest stays on the centre; centred clipping iterates that with v = Σ_j c_j x_j). They are
implemented as "compute c, then run the base mixer with ``weights = c``", so they work with every
mixer that takes a weighted combination: D²ORA and FedAvg (factors averaged with c) and DeCAF (the
TSVD of Σ_j c_j s·B_j A_j). ``RobustMixer.neighbour_weights`` returns c so the engine can log who
was clipped or excluded. Weight rows are first rescaled to sum to 1 (every mixing matrix
``d2ora.topology`` builds already does, up to rounding).

Geometry (the base mixer's ``robust_space``): distances are measured where the base mixer mixes.
* ``"factors"`` (D²ORA, FedAvg): ‖x_j − x_l‖² = Σ_layers ‖ΔA‖² + ‖ΔB‖² + ‖Δm‖² + Σ ‖Δdense‖²,
  the flat adapter vector.
* ``"products"`` (DeCAF): Σ_layers ‖s·B_j A_j − s·B_l A_l‖_F² + ‖Δm‖² + Σ ‖Δdense‖², computed
  factored from (k·2r x k·2r) Gram matrices per layer and receiver (see ``centred_gram``); no
  out x in matrix is formed.
* None (DIMAT, local): refused. DIMAT permutes each neighbour's rank components by activation
  matching before averaging, so distances between unaligned factors are meaningless; local does
  not mix. Trimmed mean and median are coordinate-wise, not a re-weighting, and are defined only in
  factor space (applied to A, B, m and dense separately); on DeCAF they would need every
  neighbour's dense out x in product, so they are refused there.

Without an attacker (all k neighbours honest), compared with the base mixer's plain mix:

    rule                     f = 0                                  f ≥ 1
    self_centered_clipping   adaptive τ: equal; τ = inf: equal      pulls the f farthest in: differs
    centered_clipping        adaptive τ: equal; τ = inf: equal      differs (as above)
    trimmed_mean             unweighted mean (equal only for        trims honest extremes: differs
                             uniform weights, e.g. ring 1/3)
    median                   coordinate-wise median: differs        differs
    krum                     one member's adapter: differs          differs
    multi_krum               keeps all k (select = k): equal        drops the f worst-scored: differs

"Equal" means equal up to rounding, in the base mixer's geometry (for DeCAF: the same TSVD);
tests/test_robust.py asserts every row of this table.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import reduce
from typing import Any, ClassVar

import torch

from d2ora.mixers._common import checked_weights, compute_dtype
from d2ora.mixers.base import LayerStack, Mixer, MixOutput, Neighbourhoods

ROBUST_RULES = ("trimmed_mean", "median", "krum", "multi_krum", "centered_clipping", "self_centered_clipping")
COORDINATE_RULES = ("trimmed_mean", "median")
REWEIGHTING_RULES = ("krum", "multi_krum", "centered_clipping", "self_centered_clipping")
CLIPPING_RULES = ("centered_clipping", "self_centered_clipping")
SPACES = ("factors", "products")

#: Why a mixer with ``robust_space = None`` has no robust variant (by mixer name).
_NO_ROBUST_REASON = {
    "dimat": "it permutes each neighbour's rank components by activation matching before averaging, "
    "so distances between unaligned factors are meaningless",
    "local": "it does not mix: each peer keeps its own adapter, which no neighbour can influence",
}


# ------------------------------------------------------------------------------------ geometry


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


# ---------------------------------------------------------------------------- re-weighting rules


def krum_scores(pairwise: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Blanchard et al.'s score: Σ of each member's k − f − 2 smallest squared distances to the
    *other* members, (g, k); lower is more central."""
    k = pairwise.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=pairwise.device)
    nearest = pairwise.masked_fill(eye, math.inf).sort(dim=-1).values[..., : k - byzantine - 2]
    return nearest.sum(-1)


def _krum_weights(gram: torch.Tensor, w: torch.Tensor, byzantine: int, keep: int) -> torch.Tensor:
    scores = krum_scores(pairwise_sq_distances(gram), byzantine)
    best = scores.argsort(dim=-1, stable=True)[:, :keep]  # ties: the lower column, deterministically
    mask = torch.zeros_like(w).scatter(1, best, 1.0)
    kept = w * mask
    total = kept.sum(-1, keepdim=True)
    # Kept members that all carry weight 0 (not possible from a mixing matrix's closed
    # neighbourhood, but not a reason to divide by 0): average them uniformly.
    return torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)), mask / keep)


def _adaptive_radius(dist: torch.Tensor, own: torch.Tensor, byzantine: int) -> torch.Tensor:
    """(g, 1): the (f+1)-th largest of ``dist`` over each receiver's *other* members; 0 if f ≥ k − 1."""
    if byzantine >= dist.shape[-1] - 1:
        return dist.new_zeros(dist.shape[0], 1)
    others = dist.scatter(1, own.unsqueeze(1), -math.inf)  # the receiver itself never counts
    return others.topk(byzantine + 1, dim=-1).values[:, -1:]


def _clip_step(gram: torch.Tensor, w: torch.Tensor, own: torch.Tensor, centre: torch.Tensor,
               tau: float | None, byzantine: int) -> torch.Tensor:
    """One v ← v + Σ_j w_j clip(x_j − v, τ) as coefficients: c' = (1 − Σ_j w_j t_j) c + w ∘ t."""
    dist = sq_distances(gram, centre).sqrt()
    radius = _adaptive_radius(dist, own, byzantine) if tau is None else torch.full_like(dist[:, :1], tau)
    ones = torch.ones_like(dist)
    # Clipped members have dist > τ ≥ 0; the inner where only keeps τ/0 out of the unused branch.
    scale = torch.where(dist > radius, radius / torch.where(dist > 0, dist, ones), ones)
    scale = scale.scatter(1, own.unsqueeze(1), 1.0)  # own adapter: trusted, never clipped
    moved = w * scale
    # clamp: Σ w t can exceed 1 by an ulp, and a negative weight would fail the base mixer's check.
    return centre * (1 - moved.sum(-1, keepdim=True)).clamp_min(0) + moved


def robust_weights(hood: Neighbourhoods, rule: str, space: str, *, byzantine: int = 1, tau: float | None = None,
                   iterations: int = 3, select: int | None = None) -> torch.Tensor:
    """The new weights c (g, k) of a re-weighting rule (krum, multi_krum, centered_clipping,
    self_centered_clipping): non-negative, each row summing to 1, on the stacks' device in the
    compute dtype. The rule's result is the base mixer run on ``hood`` with ``weights = c``.
    A zero c_j means member j was excluded (krum) or clipped to nothing; 0 < c_j < w_j, clipped."""
    if rule not in REWEIGHTING_RULES:
        raise ValueError(f"{rule!r} is not a re-weighting rule; those are {', '.join(REWEIGHTING_RULES)}")
    weights = checked_weights(hood)
    g, k = weights.shape
    check_neighbourhood(rule, k, byzantine, select)
    gram = centred_gram(hood, space)
    w = weights.to(device=gram.device, dtype=gram.dtype)
    total = w.sum(-1, keepdim=True)
    if not (total > 0).all():
        raise ValueError("every receiver needs a positive total weight on its neighbourhood")
    w = w / total
    if rule in ("krum", "multi_krum"):
        keep = 1 if rule == "krum" else (k - byzantine if select is None else select)
        return _krum_weights(gram, w, byzantine, keep)
    own = hood.own.to(gram.device)
    coeffs = torch.zeros_like(w).scatter(1, own.unsqueeze(1), 1.0)  # start at the own adapter
    for _ in range(1 if rule == "self_centered_clipping" else iterations):
        coeffs = _clip_step(gram, w, own, coeffs, tau, byzantine)
    return coeffs


# ---------------------------------------------------------------------------- coordinate-wise rules


def _coordinatewise(t: torch.Tensor, rule: str, byzantine: int) -> torch.Tensor:
    """(g, k, ...) -> (g, ...): trimmed mean or median over the k members at every coordinate."""
    k = t.shape[1]
    values = t.to(compute_dtype(t.dtype)).sort(dim=1).values
    if rule == "trimmed_mean":
        out = values[:, byzantine : k - byzantine].mean(dim=1)
    else:  # median; for odd k both middles are the same entry and (v + v) / 2 == v exactly
        out = (values[:, (k - 1) // 2] + values[:, k // 2]) / 2
    return out.to(t.dtype)


def coordinate_mix(hood: Neighbourhoods, rule: str, byzantine: int = 1) -> MixOutput:
    """Trimmed mean or median applied to A, B, m and every dense tensor separately (factor space).
    The weights are not used (both rules are unweighted), only checked."""
    if rule not in COORDINATE_RULES:
        raise ValueError(f"{rule!r} is not a coordinate-wise rule; those are {', '.join(COORDINATE_RULES)}")
    checked_weights(hood)
    check_neighbourhood(rule, hood.size, byzantine)
    layers = {
        name: LayerStack(
            lora_a=_coordinatewise(s.lora_a, rule, byzantine),
            lora_b=_coordinatewise(s.lora_b, rule, byzantine),
            magnitude=None if s.magnitude is None else _coordinatewise(s.magnitude, rule, byzantine),
            scaling=s.scaling,
        )
        for name, s in hood.layers.items()
    }
    return MixOutput(layers=layers, dense={name: _coordinatewise(t, rule, byzantine) for name, t in hood.dense.items()})


def check_neighbourhood(rule: str, k: int, byzantine: int, select: int | None = None) -> None:
    """A clear error when a neighbourhood of k members (self included) is too small for ``rule``
    to tolerate f = ``byzantine``. Clipping works at any size (f ≥ k − 1 just keeps one's own)."""
    what = f"a neighbourhood of k={k}{' (ring)' if k == 3 else ''}"
    if rule in ("trimmed_mean", "median") and k <= 2 * byzantine:
        raise ValueError(f"{rule} needs k > 2f members (self included): {what} tolerates at most "
                         f"f={(k - 1) // 2}, got byzantine={byzantine}")
    if rule in ("krum", "multi_krum") and k <= byzantine + 2:
        most = f"at most f={k - 3}" if k >= 3 else "no Byzantine neighbour and cannot run krum at all"
        raise ValueError(f"{rule} needs k > f + 2 members (self included): {what} tolerates {most}, "
                         f"got byzantine={byzantine}")
    if rule == "multi_krum" and select is not None and not 1 <= select <= k:
        raise ValueError(f"multi_krum select must be in 1..k={k}, got {select}")


# ---------------------------------------------------------------------------------------- mixer


class RobustMixer:
    """A base mixer (D²ORA, FedAvg or DeCAF) with a Byzantine-robust rule applied by every receiver
    to its own neighbourhood; see the module docstring for the rules and their geometry.

    ``name``, ``factors_replaced`` and ``needs_layer_inputs`` are the base's: the engine batches,
    feeds and resets optimizer moments exactly as for the base rule (a re-weighted D²ORA mix is
    still a combination of factors in the same coordinates; DeCAF still re-bases them).
    """

    robust_space: ClassVar[str | None] = None  # already robust: not wrapped a second time

    def __init__(self, base: Mixer, rule: str, *, byzantine: int = 1, tau: float | None = None,
                 iterations: int = 3, select: int | None = None) -> None:
        if rule not in ROBUST_RULES:
            raise ValueError(f"unknown robust rule {rule!r}; valid rules: {', '.join(ROBUST_RULES)} (or 'none')")
        if isinstance(base, RobustMixer):
            raise ValueError(f"{base!r} is already robust; wrap the plain mixer instead")
        space = getattr(base, "robust_space", None)
        if space is None:
            reason = _NO_ROBUST_REASON.get(base.name, "it declares no robust geometry (robust_space = None)")
            raise ValueError(f"no Byzantine-robust rule works with the {base.name!r} mixer: {reason}. "
                             "Robust rules work with d2ora and fedavg (all six) and decaf "
                             f"({', '.join(REWEIGHTING_RULES)})")
        if space not in SPACES:
            raise ValueError(f"mixer {base.name!r} has robust_space {space!r}; valid: {', '.join(SPACES)}")
        if rule in COORDINATE_RULES and space == "products":
            raise ValueError(
                f"{rule} is coordinate-wise and the {base.name!r} mixer mixes the products s·B·A: it would need "
                "every neighbour's dense out x in product per layer. With it use one of "
                f"{', '.join(REWEIGHTING_RULES)} (re-weightings, computed factored); {rule} works with d2ora and fedavg"
            )
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ValueError(f"byzantine must be an integer >= 0, got {byzantine!r}")
        if tau is not None and (rule not in CLIPPING_RULES or not tau > 0):  # `not >` also rejects NaN
            raise ValueError(f"tau must be None (adaptive) or > 0, and only for {', '.join(CLIPPING_RULES)}; "
                             f"got tau={tau!r} for {rule}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if select is not None and (rule != "multi_krum" or isinstance(select, bool)
                                   or not isinstance(select, int) or select < 1):
            raise ValueError(f"select is an integer >= 1 for multi_krum only; got select={select!r} for {rule}")
        self.base, self.rule, self.space = base, rule, space
        self.byzantine, self.tau, self.iterations, self.select = byzantine, tau, iterations, select
        self.name = base.name
        self.factors_replaced = base.factors_replaced
        self.needs_layer_inputs = base.needs_layer_inputs

    def __repr__(self) -> str:
        return f"RobustMixer({self.base.name!r}, {self.rule!r}, byzantine={self.byzantine})"

    def neighbour_weights(self, hood: Neighbourhoods) -> torch.Tensor | None:
        """The weights c (g, k) the base mixer is run with (see ``robust_weights``), for logging who
        was excluded (c_j = 0) or clipped (c_j < w_j); None for the coordinate-wise rules, which have
        no per-neighbour weights."""
        if self.rule in COORDINATE_RULES:
            return None
        return robust_weights(hood, self.rule, self.space, byzantine=self.byzantine, tau=self.tau,
                              iterations=self.iterations, select=self.select)

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        byzantine = self.byzantine
        if self.rule not in CLIPPING_RULES:
            # A neighbourhood the trust layer shrank (messages it rejected: those senders are out
            # already) tolerates fewer; the full neighbourhoods were checked when the run was set up.
            byzantine = min(byzantine, most_tolerated(self.rule, hood.size))
        if self.rule in COORDINATE_RULES:
            return coordinate_mix(hood, self.rule, byzantine)
        weights = robust_weights(hood, self.rule, self.space, byzantine=byzantine, tau=self.tau,
                                 iterations=self.iterations, select=self.select)
        return self.base.mix(replace(hood, weights=weights))


def most_tolerated(rule: str, k: int) -> int:
    """The largest f a neighbourhood of k members (self included) supports under ``rule``."""
    if rule in COORDINATE_RULES:
        return max(0, (k - 1) // 2)
    if rule in ("krum", "multi_krum"):
        return max(0, k - 3)
    return k


def make_robust(base: Mixer, rule: str | None, **options: Any) -> Mixer:
    """``base`` made robust with ``rule`` (one of ``ROBUST_RULES``) and ``options`` (byzantine, tau,
    iterations, select); ``None`` or ``"none"`` returns ``base`` unchanged. A ValueError naming the
    valid rules for an unknown one."""
    if rule is None or rule == "none":
        return base
    return RobustMixer(base, rule, **options)
