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

Low-rank factors. The tracked vectors are meaningful only in coordinates that survive the mix.
D²ORA, FedAvg and DIMAT keep every coordinate (DIMAT aligns the neighbours to the receiver's basis);
DeCAF and DoRA-exact re-express A and B in the singular basis of the mix, so a momentum or tracking
entry for row k of the old A has no counterpart in the new one (the same reason the engine resets
A's and B's Adam moments there). Under those mixers the corrections apply to the coordinates that
keep their meaning, the magnitudes m and the dense head, and leave A and B uncorrected
(:func:`kept_coordinates`).
"""

from __future__ import annotations

import torch

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


class LocalCorrection:
    """The drift-correction state of a host's peers and the hooks the local steps call.

    Order within a round: :meth:`begin_round`; per local step the trainer calls
    :meth:`adjust_gradients` (after backward, before clipping) and :meth:`adjust_parameters` (after
    the optimizer step); after the local steps :meth:`local_update` gives K-GT's Δ to send; after
    the mix :meth:`finish_round` updates the momentum or tracking vector. Only that vector
    (``state``) outlives a round, so it alone goes into checkpoints.
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
            moved = (self.anchor - self.peer_model.flat()) / self.lr_sum
            self.state.mul_(self.beta).add_(moved * self.keep, alpha=1 - self.beta)
        elif own_update is not None and mixed_update is not None:
            self.state.add_((mixed_update - own_update) * self.keep, alpha=1 / self.lr_sum)

    def load_state(self, state: torch.Tensor) -> None:
        if self.state is None or state.shape != self.state.shape:
            raise ValueError(f"drift state of shape {tuple(state.shape)} does not fit this run's correction ({self.method})")
        self.state.copy_(state.to(self.state.device, self.state.dtype))
