"""Corrections of the local steps for heterogeneous data, per hosted peer.

Under label skew each peer's T local steps pull its adapter towards its own optimum ("client
drift"); mixing then averages models that disagree. Three remedies, usable together where defined:

- ``prox_mu`` (FedProx; Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
  each local objective gets ``μ/2 ||x − x_r||²``, x_r the peer's adapter when the round began (after
  the previous mix), so its gradient gains ``μ (x − x_r)``. Needs nothing from other peers and works
  with every mixer (the anchor is the adapter in the coordinates the peer trains in).
- ``drift: qgm``, quasi-global momentum (QG-DSGDm; Lin, Karimireddy, Stich, Jaggi, ICML 2021): the
  momentum is not built from the peer's own gradients but from how its adapter moved over a whole
  round *including the mix*, ``d = (x_r − x_{r+1}) / Σ_t η_t``, so it points along the network's
  descent direction rather than the local one; ``m̂ ← β m̂ + (1 − β) d``. Each local step then moves
  the adapter by a further ``−η_t β m̂`` (QG-DSGDm's heavy-ball term ``x −= η (g + β m̂)``, with the
  local optimizer's step in place of η g). No extra communication.
- ``drift: kgt``, gradient tracking with local steps (K-GT; Liu, Lin, Koloskova, Stich, "Decentralized
  Gradient Tracking with Local Steps", arXiv 2301.01313): every local step adds ``−η_t c`` where the
  correction c estimates the difference between the network's mean update and the peer's own:
  after the local steps the peer's update ``Δ = x_r − z_T`` is sent to the neighbours as a second
  message (one more adapter-sized payload per neighbour and gossip step: the bytes double), and
  ``c ← c + (Σ_j w_ij Δ_j − Δ_i) / Σ_t η_t``. The model message itself is mixed as always (K-GT's
  server step size 1: ``x_{r+1} = Σ_j w_ij z_T,j``). The Δ are mixed linearly with the same held weights.

Units. Both corrections live in *update* space (what the optimizer moved the adapter, per unit of
learning rate), not in gradient space: d2ora's local optimizer is AdamW, whose step η·m/√v is not
η·g, and adding a gradient-scaled term to an Adam step would be off by the preconditioner. With
plain SGD both reduce to the papers' algorithms.

Low-rank factors. A flat correction vector is meaningful only in coordinates that survive the mix.
D²ORA, FedAvg and DIMAT keep every coordinate (DIMAT aligns the neighbours to the receiver's basis);
DeCAF, DoRA-exact and the FedAvg product rules re-express A and B in the singular basis of the mix,
so a momentum entry for row k of the old A has no counterpart in the new one (the same reason the
engine resets A's and B's Adam moments there). What does keep its meaning is the change a direction
(δB, δA) makes to the product, δB·A + B·δA. So under those mixers QGM keeps its momentum for A and
B *as a product-space direction*: after the mix it forms β·(old momentum's product change) +
(1 − β)·(the round's product move B_rA_r − B'A', per unit of learning rate), all as thin factors,
and maps it back onto the new factors (B', A') by the projection onto the tangent space of the
rank-r matrices at B'A' (:func:`tangent_factors`; "vector transport by projection" in Riemannian
optimisation). K-GT would need its neighbours' product moves for that, which its Δ messages do not
carry in a common basis, so under re-basing mixers K-GT (like FedProx's anchor, which stays exact)
corrects the magnitudes and the dense head only (:func:`kept_coordinates`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from d2ora.engine.hooks import RoundHook
from d2ora.engine.layout import AdapterLayout
from d2ora.engine.peers import PeerModel

#: ``drift`` choices: no correction, quasi-global momentum, gradient tracking with local steps.
DRIFT_METHODS = ("none", "qgm", "kgt")


def kept_coordinates(layout: AdapterLayout, factors_replaced: bool) -> torch.Tensor:
    """``(numel,)`` bool: the flat adapter's entries whose coordinates survive a mix (all, or all but
    A and B when the mixer re-bases the factors)."""
    keep = torch.ones(layout.numel, dtype=torch.bool)
    if factors_replaced:
        for entry in layout.entries:
            if entry.kind in ("lora_A", "lora_B"):
                keep[entry.offset : entry.offset + entry.numel] = False
    return keep


#: Factor directions weaker than this fraction of the strongest are not inverted in
#: :func:`tangent_factors` (their tangent component cannot be represented stably).
RELATIVE_CUTOFF = 1e-4


def tangent_factors(left: torch.Tensor, right: torch.Tensor, lora_b: torch.Tensor,
                    lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor directions ``(δB, δA)`` at ``(B, A)`` whose product change ``δB·A + B·δA`` is the
    projection of ``X = left @ right`` onto the tangent space of the rank-r matrices at ``B·A``:
    ``P_B X + (I − P_B) X P_A``, with P_B, P_A the projections onto B's columns and A's rows.

    Batched over the leading dim: ``left (h, out, q)``, ``right (h, q, in)``, ``B (h, out, r)``,
    ``A (h, r, in)``; X (out x in) is never formed. ``δA = (BᵀB)⁺BᵀX`` and
    ``δB = (I − P_B) X Aᵀ(AAᵀ)⁺``, so δB is orthogonal to B's columns (one choice among the
    equivalent factorizations of the same tangent vector).
    """
    gram_b = torch.linalg.pinv(lora_b.mT @ lora_b, rtol=RELATIVE_CUTOFF, hermitian=True)  # (h, r, r)
    gram_a = torch.linalg.pinv(lora_a @ lora_a.mT, rtol=RELATIVE_CUTOFF, hermitian=True)
    delta_a = gram_b @ ((lora_b.mT @ left) @ right)
    x_at = left @ (right @ lora_a.mT)  # (h, out, r)
    full_b = x_at @ gram_a
    delta_b = full_b - lora_b @ (gram_b @ (lora_b.mT @ full_b))
    return delta_b, delta_a


class LocalCorrection(RoundHook):
    """The drift-correction state of a host's peers: a round hook (:mod:`d2ora.engine.hooks`) and
    the trainer's step hooks.

    Order within a round: :meth:`begin_round`; per local step the trainer calls
    :meth:`adjust_gradients` (after backward, before clipping) and :meth:`adjust_parameters` (after
    the optimizer step); after the local steps :meth:`extra_payloads` gives K-GT's Δ to send
    (:meth:`local_update`); after the mix :meth:`after_mix` updates the momentum or tracking
    vector (:meth:`finish_round`). Only that vector (``state``) outlives a round, so it alone goes
    into checkpoints (:meth:`state_dict`).
    """

    def __init__(self, peer_model: PeerModel, method: str = "none", *, beta: float = 0.9, prox_mu: float = 0.0,
                 factors_replaced: bool = False) -> None:
        if method not in DRIFT_METHODS:
            raise ValueError(f"unknown drift correction {method!r}; choose one of {', '.join(DRIFT_METHODS)}")
        if not 0 <= beta < 1:
            raise ValueError(f"drift_beta must be in [0, 1), got {beta}")
        if prox_mu < 0:
            raise ValueError(f"prox_mu must be non-negative, got {prox_mu}")
        self.peer_model = peer_model
        self.layout = peer_model.layout()
        self.method = method
        self.beta = beta
        self.prox_mu = prox_mu
        flat = peer_model.flat()
        self.keep = kept_coordinates(self.layout, factors_replaced).to(device=flat.device, dtype=flat.dtype)
        #: QGM under a re-basing mixer carries A's and B's momentum through the mix in product space.
        self.transport_factors = factors_replaced and method == "qgm"
        #: (h, numel): QGM's momentum m̂ or K-GT's tracking c; None without a correction.
        self.state: torch.Tensor | None = None if method == "none" else torch.zeros_like(flat)
        self.anchor: torch.Tensor | None = None
        self.lr_sum = 0.0

    @property
    def active(self) -> bool:
        return self.method != "none" or self.prox_mu > 0

    @property
    def sends_update(self) -> bool:
        """K-GT sends each local update Δ as a second message."""
        return self.method == "kgt"

    def begin_round(self) -> None:
        self.anchor = self.peer_model.flat() if self.active else None
        self.lr_sum = 0.0

    def _params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"{module}.{pname}", param) for module, _, pname, param in self.peer_model.named_stacked()]

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        """FedProx: every gradient gains μ (x − x_r)."""
        if self.prox_mu == 0 or self.anchor is None:
            return
        anchors = self.layout.views(self.anchor)
        for key, param in self._params():
            if param.grad is not None:
                param.grad.add_(param.detach() - anchors[key].to(param.grad.dtype), alpha=self.prox_mu)

    @torch.no_grad()
    def adjust_parameters(self, lr: float) -> None:
        """After an optimizer step at learning rate ``lr``: QGM's ``−lr·β·m̂`` or K-GT's ``−lr·c``."""
        self.lr_sum += lr
        if self.state is None:
            return
        scale = lr * self.beta if self.method == "qgm" else lr
        directions = self.layout.views(self.state)
        for key, param in self._params():
            param.sub_(directions[key].to(param.dtype), alpha=scale)

    def extra_payloads(self) -> list[torch.Tensor]:
        """K-GT sends its local update Δ as a second message per gossip step; the others send nothing."""
        return [self.local_update()] if self.sends_update else []

    def after_mix(self, sent: Sequence[torch.Tensor], mixed: Sequence[torch.Tensor]) -> None:
        self.finish_round(sent[0] if sent else None, mixed[0] if mixed else None)

    def local_update(self) -> torch.Tensor:
        """K-GT's Δ = x_r − z_T ``(h, numel)``: how far the local steps moved each hosted peer."""
        if self.anchor is None:
            raise RuntimeError("local_update before begin_round")
        return self.anchor - self.peer_model.flat()

    @torch.no_grad()
    def finish_round(self, own_update: torch.Tensor | None = None, mixed_update: torch.Tensor | None = None) -> None:
        """After the mix: QGM folds in the round's whole move; K-GT adds (mixed Δ − own Δ) / Σ η."""
        if self.state is None or self.lr_sum == 0:
            return
        if self.method == "qgm":
            current = self.peer_model.flat()
            if self.transport_factors:
                factor_momentum = self._transported_factor_momentum(current)
            moved = (self.anchor - current) / self.lr_sum
            self.state.mul_(self.beta).add_(moved * self.keep, alpha=1 - self.beta)
            if self.transport_factors:
                views = self.layout.views(self.state)
                for key, value in factor_momentum.items():
                    views[key].copy_(value)
        elif own_update is not None and mixed_update is not None:
            self.state.add_((mixed_update - own_update) * self.keep, alpha=1 / self.lr_sum)

    def _transported_factor_momentum(self, current: torch.Tensor) -> dict[str, torch.Tensor]:
        """QGM's new A and B momentum at the mixed factors: β·(old momentum's product change at the
        round-start factors) + (1 − β)·(B_rA_r − B'A') / Σ η, projected onto the tangent space at B'A'."""
        start, now, momentum = self.layout.views(self.anchor), self.layout.views(current), self.layout.views(self.state)
        out: dict[str, torch.Tensor] = {}
        for module in self.layout.scalings:
            a_key, b_key = f"{module}.lora_A", f"{module}.lora_B"
            # In fp32 at least: pinv has no half-precision kernels, and the Gram inverses need the range.
            b_r, a_r, b_new, a_new, m_b, m_a = (
                t.to(torch.promote_types(t.dtype, torch.float32))
                for t in (start[b_key], start[a_key], now[b_key], now[a_key], momentum[b_key], momentum[a_key])
            )
            step = (1 - self.beta) / self.lr_sum
            # Σ of thin products: β(m_B A_r + B_r m_A) + step·(B_r A_r − B' A').
            left = torch.cat([self.beta * m_b, self.beta * b_r, step * b_r, -step * b_new], dim=-1)
            right = torch.cat([a_r, m_a, a_r, a_new], dim=-2)
            delta_b, delta_a = tangent_factors(left, right, b_new, a_new)
            out[b_key], out[a_key] = delta_b.to(self.state.dtype), delta_a.to(self.state.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """QGM's momentum or K-GT's tracking vector (``state``); nothing for FedProx alone, whose
        anchor is set again at every round's start."""
        return {} if self.state is None else {"state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.state is None:
            if state:
                raise ValueError(f"drift state given, but this run's correction ({self.method}) keeps none")
            return
        if "state" not in state:
            raise ValueError(f"no drift-correction state ({self.method})")
        self.load_state(state["state"])

    def load_state(self, state: torch.Tensor) -> None:
        if self.state is None or state.shape != self.state.shape:
            raise ValueError(f"drift state of shape {tuple(state.shape)} does not fit this run's correction ({self.method})")
        self.state.copy_(state.to(self.state.device, self.state.dtype))
