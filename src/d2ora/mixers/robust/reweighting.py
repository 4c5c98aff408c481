"""Re-weighting rules: screen a neighbourhood by giving its members new weights, then let the base
mixer mix.

Krum, multi-krum and both clippings return Σ_j c_j x_j with new weights c (g, k) that are
non-negative and sum to 1 (clipping: x_j's weight becomes w_j t_j, t_j = min(1, τ/‖x_j − v‖), and
the rest stays on the centre; centred clipping iterates that with v = Σ_j c_j x_j). They are
implemented as "compute c, then run the base mixer with ``weights = c``", so they work with every
mixer that takes a weighted combination: D²ORA and FedAvg (factors averaged with c) and DeCAF (the
TSVD of Σ_j c_j s·B_j A_j). ``neighbour_weights`` returns c so the engine can log who was clipped or
excluded. Weight rows are first rescaled to sum to 1 (every mixing matrix ``d2ora.topology`` builds
already does, up to rounding).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import torch

from d2ora.mixers._common import checked_weights
from d2ora.mixers.base import MixOutput, Neighbourhoods
from d2ora.mixers.robust.base import RobustMixer
from d2ora.mixers.robust.geometry import centred_gram


class ReweightingMixer(RobustMixer):
    """A robust rule that only changes the weights: its result is the base mixer run on the same
    neighbourhood with ``weights = c`` (see the module docstring). Subclasses give ``coefficients``."""

    def neighbour_weights(self, hood: Neighbourhoods) -> torch.Tensor:
        """The weights c (g, k) the base mixer is run with (see ``reweight``), for logging who was
        excluded (c_j = 0) or clipped (c_j < w_j)."""
        return self._weights(hood, self.byzantine)

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        weights = self._weights(hood, self.tolerated(hood.size, self.byzantine))
        return self.base.mix(replace(hood, weights=weights))

    def _weights(self, hood: Neighbourhoods, byzantine: int) -> torch.Tensor:
        return self.reweight(hood, self.space, byzantine=byzantine, tau=self.tau, iterations=self.iterations,
                             select=self.select)

    @classmethod
    def reweight(cls, hood: Neighbourhoods, space: str, *, byzantine: int = 1, tau: float | None = None,
                 iterations: int = 3, select: int | None = None) -> torch.Tensor:
        """The new weights c (g, k) of this rule in geometry ``space``: non-negative, each row
        summing to 1, on the stacks' device in the compute dtype. A zero c_j means member j was
        excluded (krum) or clipped to nothing; 0 < c_j < w_j, clipped."""
        weights = checked_weights(hood)
        k = weights.shape[1]
        cls.check_neighbourhood(k, byzantine, select)
        gram = centred_gram(hood, space)
        w = weights.to(device=gram.device, dtype=gram.dtype)
        total = w.sum(-1, keepdim=True)
        if not (total > 0).all():
            raise ValueError("every receiver needs a positive total weight on its neighbourhood")
        w = w / total
        return cls.coefficients(gram, w, hood.own.to(gram.device), byzantine=byzantine, tau=tau,
                                iterations=iterations, select=select)

    @classmethod
    @abstractmethod
    def coefficients(cls, gram: torch.Tensor, w: torch.Tensor, own: torch.Tensor, *, byzantine: int,
                     tau: float | None, iterations: int, select: int | None) -> torch.Tensor:
        """c (g, k) from the centred Gram matrix (g, k, k), the normalised weights w (g, k) and each
        receiver's own column (g,); options a rule does not take are ignored."""
