"""Clipping rules: pull every neighbour that is farther than τ from a centre in to radius τ.

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
plain mix whenever nothing else is clipped. Clipping works at any neighbourhood size.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch

from d2ora.mixers.robust.geometry import sq_distances
from d2ora.mixers.robust.reweighting import ReweightingMixer


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


class ClippingMixer(ReweightingMixer):
    """``steps`` clipping steps from the receiver's own adapter, as coefficients of its members."""

    takes_tau: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def steps(cls, iterations: int) -> int:
        """How many clipping steps the rule takes, given the ``iterations`` option."""

    @classmethod
    def coefficients(cls, gram: torch.Tensor, w: torch.Tensor, own: torch.Tensor, *, byzantine: int,
                     tau: float | None, iterations: int, select: int | None) -> torch.Tensor:
        coeffs = torch.zeros_like(w).scatter(1, own.unsqueeze(1), 1.0)  # start at the own adapter
        for _ in range(cls.steps(iterations)):
            coeffs = _clip_step(gram, w, own, coeffs, tau, byzantine)
        return coeffs


class CenteredClippingMixer(ClippingMixer):
    """Karimireddy et al. 2021's centred clipping: ``iterations`` steps, each re-centred on the last."""

    rule: ClassVar[str] = "centered_clipping"

    @classmethod
    def steps(cls, iterations: int) -> int:
        return iterations


class SelfCenteredClippingMixer(ClippingMixer):
    """He et al.'s ClippedGossip: one step centred on the receiver's own adapter."""

    rule: ClassVar[str] = "self_centered_clipping"

    @classmethod
    def steps(cls, iterations: int) -> int:
        return 1
