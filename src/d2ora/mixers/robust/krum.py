"""Krum and multi-Krum: keep the neighbours closest to the others, re-weighted.

* ``krum`` / ``multi_krum``: score_j = Σ of squared distances from x_j to its k − f − 2 nearest
  other members; krum keeps the best-scored member (possibly not the receiver itself), multi-krum
  the best ``select`` (1..k, default k − f as in the paper) and mixes them with the receiver's
  weights renormalised over the kept ones; ties go to the lower column. Blanchard, El Mhamdi,
  Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017. Needs k > f + 2 (a ring's k = 3 allows only f = 0).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch

from d2ora.mixers.robust.base import neighbourhood_phrase
from d2ora.mixers.robust.geometry import pairwise_sq_distances
from d2ora.mixers.robust.reweighting import ReweightingMixer


def krum_scores(pairwise: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Blanchard et al.'s score: Σ of each member's k − f − 2 smallest squared distances to the
    *other* members, (g, k); lower is more central."""
    k = pairwise.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=pairwise.device)
    nearest = pairwise.masked_fill(eye, math.inf).sort(dim=-1).values[..., : k - byzantine - 2]
    return nearest.sum(-1)


class KrumScoringMixer(ReweightingMixer):
    """Keeps the ``keep`` best Krum-scored members with their weights renormalised over them."""

    @classmethod
    def check_neighbourhood(cls, k: int, byzantine: int, select: int | None = None) -> None:
        if k <= byzantine + 2:
            most = f"at most f={k - 3}" if k >= 3 else "no Byzantine neighbour and cannot run krum at all"
            raise ValueError(f"{cls.rule} needs k > f + 2 members (self included): {neighbourhood_phrase(k)} "
                             f"tolerates {most}, got byzantine={byzantine}")

    @classmethod
    def tolerated(cls, k: int, byzantine: int) -> int:
        return min(byzantine, max(0, k - 3))

    @classmethod
    @abstractmethod
    def keep(cls, k: int, byzantine: int, select: int | None) -> int:
        """How many best-scored members are kept."""

    @classmethod
    def coefficients(cls, gram: torch.Tensor, w: torch.Tensor, own: torch.Tensor, *, byzantine: int,
                     tau: float | None, iterations: int, select: int | None) -> torch.Tensor:
        keep = cls.keep(w.shape[-1], byzantine, select)
        scores = krum_scores(pairwise_sq_distances(gram), byzantine)
        best = scores.argsort(dim=-1, stable=True)[:, :keep]  # ties: the lower column, deterministically
        mask = torch.zeros_like(w).scatter(1, best, 1.0)
        kept = w * mask
        total = kept.sum(-1, keepdim=True)
        # Kept members that all carry weight 0 (not possible from a mixing matrix's closed
        # neighbourhood, but not a reason to divide by 0): average them uniformly.
        return torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)), mask / keep)


class KrumMixer(KrumScoringMixer):
    """Blanchard et al. 2017's Krum: the single best-scored member's adapter."""

    rule: ClassVar[str] = "krum"

    @classmethod
    def keep(cls, k: int, byzantine: int, select: int | None) -> int:
        return 1


class MultiKrumMixer(KrumScoringMixer):
    """Blanchard et al. 2017's multi-Krum: the ``select`` best-scored members (default k − f)."""

    rule: ClassVar[str] = "multi_krum"
    takes_select: ClassVar[bool] = True

    @classmethod
    def check_neighbourhood(cls, k: int, byzantine: int, select: int | None = None) -> None:
        super().check_neighbourhood(k, byzantine, select)
        if select is not None and not 1 <= select <= k:
            raise ValueError(f"{cls.rule} select must be in 1..k={k}, got {select}")

    @classmethod
    def keep(cls, k: int, byzantine: int, select: int | None) -> int:
        return k - byzantine if select is None else select
