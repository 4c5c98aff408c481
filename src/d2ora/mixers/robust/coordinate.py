"""Coordinate-wise rules: every coordinate of the new adapter is a robust statistic of the k values
the receiver's neighbourhood holds there (not a re-weighting).

* ``trimmed_mean``: at every coordinate drop the f largest and f smallest of the k values and
  average the rest, unweighted. Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv 1803.01498. Needs k > 2f.
* ``median``: the coordinate-wise median (same paper); for even k the mean of the two middle
  values. Also needs k > 2f (below that the attackers are the majority at some coordinate).

They are defined only in factor space (applied to A, B, m and dense separately); on a mixer of
products (DeCAF) they would need every neighbour's dense out x in product, so they are refused
there.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from d2ora.mixers._common import checked_weights, compute_dtype
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods
from d2ora.mixers.robust.base import RobustMixer, neighbourhood_phrase


class CoordinateWiseMixer(RobustMixer):
    """Applies ``reduce`` over the k members at every coordinate of A, B, m and every dense tensor.
    The weights are not used (both rules are unweighted), only checked; the base mixer is not run."""

    spaces: ClassVar[tuple[str, ...]] = ("factors",)

    @classmethod
    def unsupported_space(cls, mixer: str, space: str) -> str:
        return (f"{cls.rule} is coordinate-wise and the {mixer!r} mixer mixes the products s·B·A: it would need "
                "every neighbour's dense out x in product per layer (the re-weighting rules are computed factored)")

    @classmethod
    def check_neighbourhood(cls, k: int, byzantine: int, select: int | None = None) -> None:
        if k <= 2 * byzantine:
            raise ValueError(f"{cls.rule} needs k > 2f members (self included): {neighbourhood_phrase(k)} tolerates "
                             f"at most f={(k - 1) // 2}, got byzantine={byzantine}")

    @classmethod
    def tolerated(cls, k: int, byzantine: int) -> int:
        return min(byzantine, max(0, (k - 1) // 2))

    def neighbour_weights(self, hood: Neighbourhoods) -> None:
        """None: a coordinate-wise rule has no per-neighbour weights."""

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        byzantine = self.tolerated(hood.size, self.byzantine)
        checked_weights(hood)
        self.check_neighbourhood(hood.size, byzantine)

        def each(t: torch.Tensor) -> torch.Tensor:  # (g, k, ...) -> (g, ...)
            values = t.to(compute_dtype(t.dtype)).sort(dim=1).values
            return self.reduce(values, byzantine).to(t.dtype)

        layers = {
            name: LayerStack(
                lora_a=each(s.lora_a),
                lora_b=each(s.lora_b),
                magnitude=None if s.magnitude is None else each(s.magnitude),
                scaling=s.scaling,
            )
            for name, s in hood.layers.items()
        }
        return MixOutput(layers=layers, dense={name: each(t) for name, t in hood.dense.items()})

    @staticmethod
    @abstractmethod
    def reduce(values: torch.Tensor, byzantine: int) -> torch.Tensor:
        """(g, k, ...) values sorted along the k members -> (g, ...)."""


class TrimmedMeanMixer(CoordinateWiseMixer):
    """Yin et al. 2018's trimmed mean: the unweighted mean of the k − 2f middle values."""

    rule: ClassVar[str] = "trimmed_mean"

    @staticmethod
    def reduce(values: torch.Tensor, byzantine: int) -> torch.Tensor:
        k = values.shape[1]
        return values[:, byzantine : k - byzantine].mean(dim=1)


class MedianMixer(CoordinateWiseMixer):
    """Yin et al. 2018's coordinate-wise median; for even k the mean of the two middle values."""

    rule: ClassVar[str] = "median"

    @staticmethod
    def reduce(values: torch.Tensor, byzantine: int) -> torch.Tensor:
        k = values.shape[1]
        # For odd k both middles are the same entry and (v + v) / 2 == v exactly.
        return (values[:, (k - 1) // 2] + values[:, k // 2]) / 2
