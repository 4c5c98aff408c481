"""An outer optimizer on the gossip average (DiLoCo / NoLoCo), as a round hook.

DiLoCo (Douillard et al., arXiv 2311.08105) runs H inner AdamW steps, then treats the averaged
round update as a gradient: the *pseudo-gradient* ``Δ = x_start − mean(x_end)`` is applied by an
outer SGD with Nesterov momentum (lr 0.7, momentum 0.9), ``torch.optim.SGD(nesterov=True)``'s rule:

    b ← μ·b + Δ ;   d = Δ + μ·b ;   x ← x_start − η·d

NoLoCo (Kolehmainen et al., arXiv 2506.10911) replaces the all-reduce by gossip: every peer applies
the outer step to *its own* neighbourhood average. Here peer i keeps x_start_i (its adapter when
the round began, i.e. after the previous round's outer step) and its momentum b_i; after the
round's gossip steps it takes ``Δ_i = x_start_i − x_mixed_i`` and steps from x_start_i.
With η = 1 and μ = 0 this is the plain mix, x_i = x_mixed_i (the arithmetic runs in float64, where
x_start − (x_start − x_mixed) of float32 values rounds back to x_mixed: bit for bit unless an entry's
two values are some 2^29 apart in magnitude).

Why it may help: averaging the peers' AdamW updates shrinks the step whenever they disagree
(under label skew they do); η and the momentum restore a step length along what they agree on.

Coordinates. Δ is a difference of flat adapters, so it is meaningful only where the mix keeps each
coordinate's meaning: D²ORA, FedAvg (factor averaging) and DIMAT (which aligns neighbours to the
receiver's basis). DeCAF, DoRA-exact and the FedAvg product rules re-express A and B in the
singular basis of the mix, where ``x_start − x_mixed`` subtracts unrelated rows; the combination
is refused (:func:`check_outer_mixer`). Entries a peer does not share (``network.share``) are its
own, never averaged: the outer step leaves them as the local steps left them.

Only the momentum outlives a round (``state_dict``): x_start is the adapter at the round's start,
which the checkpoint already holds as the host's adapters, and it is taken again at every
:meth:`OuterOptimizer.begin_round`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from d2ora.engine.hooks import RoundHook
from d2ora.engine.peers import PeerModel

#: ``network.outer_optimizer`` choices.
OUTER_OPTIMIZERS = ("none", "nesterov")


def outer_settings_error(lr: float, momentum: float) -> str | None:
    """Why ``outer_lr`` / ``outer_momentum`` are unusable, or None (the config and the hook share it)."""
    if not (math.isfinite(lr) and lr > 0):
        return f"network.outer_lr must be a positive finite number, got {lr}"
    if not 0 <= momentum < 1:
        return f"network.outer_momentum must be in [0, 1), got {momentum}"
    return None


def check_outer_mixer(mixer: str, factors_replaced: bool) -> None:
    """Refuse a mixer that re-bases A and B: its factor-space pseudo-gradient means nothing."""
    if factors_replaced:
        raise ValueError(
            f"network.outer_optimizer steps along x_start − x_mixed in factor coordinates, which mixer {mixer} "
            "re-bases (A and B in the mix's singular basis): use mixer d2ora, fedavg or dimat"
        )


class OuterOptimizer(RoundHook):
    """Per hosted peer, Nesterov SGD on the round's pseudo-gradient ``x_start − x_mixed``.

    The step itself is ``torch.optim.SGD`` over one ``(h, numel)`` float64 tensor (rows are peers;
    SGD is elementwise, so one tensor is h independent optimizers). ``shared`` marks the flat
    entries that are mixed; the others are left as mixed (= the peer's own).
    """

    def __init__(self, peer_model: PeerModel, *, lr: float = 0.7, momentum: float = 0.9, mixer: str = "d2ora",
                 factors_replaced: bool = False, shared: torch.Tensor | None = None) -> None:
        problem = outer_settings_error(lr, momentum)
        if problem is not None:
            raise ValueError(problem)
        check_outer_mixer(mixer, factors_replaced)
        self.peer_model = peer_model
        self.lr, self.momentum = float(lr), float(momentum)
        flat = peer_model.flat()
        if shared is not None and shared.shape != (flat.shape[1],):
            raise ValueError(f"share mask of shape {tuple(shared.shape)} does not fit the flat adapter ({flat.shape[1]},)")
        self.shared = None if shared is None or bool(shared.all()) else shared.to(flat.device)
        # float64: the difference of two float32 adapters and the step back are exact there, so
        # lr 1 / momentum 0 returns the mixed adapter unchanged; and the momentum sums many rounds.
        self.point = torch.nn.Parameter(flat.to(torch.float64), requires_grad=False)
        # SGD refuses nesterov without momentum; with μ = 0 its plain rule is the same step (d = Δ).
        self.optimizer = torch.optim.SGD([self.point], lr=self.lr, momentum=self.momentum,
                                         nesterov=self.momentum > 0)
        if self.momentum > 0:
            # A zero buffer gives SGD's first step exactly (μ·0 + Δ = Δ) and is always there to checkpoint.
            self.optimizer.state[self.point]["momentum_buffer"] = torch.zeros_like(self.point)
        self.started = False

    @property
    def momentum_buffer(self) -> torch.Tensor | None:
        return self.optimizer.state[self.point].get("momentum_buffer") if self.momentum > 0 else None

    @torch.no_grad()
    def begin_round(self) -> None:
        """x_start: the adapters after the previous round's outer step (or the start)."""
        self.point.copy_(self.peer_model.flat())
        self.started = True

    @torch.no_grad()
    def after_mix(self, sent: Sequence[torch.Tensor], mixed: Sequence[torch.Tensor]) -> None:
        """x ← x_start − η·nesterov(x_start − x_mixed), on the shared entries."""
        if not self.started:
            raise RuntimeError("outer optimizer: after_mix before begin_round (no x_start for this round)")
        self.started = False
        current = self.peer_model.flat()
        pseudo_gradient = self.point - current.to(torch.float64)
        if self.shared is not None:  # a kept entry has no pseudo-gradient: its momentum stays 0
            pseudo_gradient[:, ~self.shared] = 0
        self.point.grad = pseudo_gradient
        self.optimizer.step()
        self.point.grad = None
        stepped = self.point.to(current.dtype)
        if self.shared is not None:
            stepped = torch.where(self.shared, stepped, current)
        self.peer_model.load_flat(stepped)

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffer ``(h, numel)`` float64 (nothing with momentum 0)."""
        buffer = self.momentum_buffer
        return {} if buffer is None else {"momentum": buffer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buffer = self.momentum_buffer
        if buffer is None:
            if state:
                raise ValueError("outer-optimizer momentum given, but this run's outer_momentum is 0")
            return
        if "momentum" not in state:
            raise ValueError("no outer-optimizer momentum (the checkpoint was written without network.outer_optimizer)")
        saved = state["momentum"]
        if tuple(saved.shape) != tuple(buffer.shape):
            raise ValueError(f"outer-optimizer momentum of shape {tuple(saved.shape)} does not fit this run's {tuple(buffer.shape)}")
        buffer.copy_(saved.to(buffer.device, buffer.dtype))
