"""Byzantine-robust aggregation: each receiver screens its own closed neighbourhood before mixing.

Plain gossip is linear in what the neighbours send, so one Byzantine neighbour can drag every
receiver arbitrarily far. A robust rule wraps a base mixer; receiver i applies it to its k
neighbours (itself included: its own adapter is honest from its own point of view) and tolerates
``byzantine`` = f of them. One class per rule, one module per family, each paragraph (and paper)
in its module:

* ``coordinate``: ``trimmed_mean``, ``median`` (Yin et al., ICML 2018), factor space only.
* ``krum``: ``krum``, ``multi_krum`` (Blanchard et al., NeurIPS 2017).
* ``clipping``: ``centered_clipping`` (Karimireddy et al., ICML 2021), ``self_centered_clipping``
  (He et al., ClippedGossip, arXiv 2202.01545).

``base`` holds the shared wrapper (``RobustMixer``), ``reweighting`` the base of the rules that only
re-weight the neighbours and let the base mixer mix (krum and the clippings), ``geometry`` where
distances are measured: the base mixer's declared ``robust_space`` (a mixer without one, e.g.
DIMAT or local, is refused with its own declared ``no_robust_reason``).

``ROBUST_RULES`` maps each rule's name to its class (in this order); ``make_robust(mixer, rule,
**options)`` builds one (options: byzantine, tau, iterations, select).

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

from typing import Any

import torch

from d2ora.mixers.base import Mixer, Neighbourhoods
from d2ora.mixers.robust.base import RobustMixer
from d2ora.mixers.robust.clipping import (
    CenteredClippingMixer,
    ClippingMixer,
    SelfCenteredClippingMixer,
)
from d2ora.mixers.robust.coordinate import (
    CoordinateWiseMixer,
    MedianMixer,
    TrimmedMeanMixer,
)
from d2ora.mixers.robust.geometry import (
    SPACES,
    centred_gram,
    pairwise_sq_distances,
    sq_distances,
)
from d2ora.mixers.robust.krum import KrumMixer, MultiKrumMixer, krum_scores
from d2ora.mixers.robust.reweighting import ReweightingMixer

#: Every robust rule by name, in a fixed order (``("none", *ROBUST_RULES)`` lists the choices).
ROBUST_RULES: dict[str, type[RobustMixer]] = {
    cls.rule: cls
    for cls in (TrimmedMeanMixer, MedianMixer, KrumMixer, MultiKrumMixer, CenteredClippingMixer,
                SelfCenteredClippingMixer)
}
COORDINATE_RULES = tuple(name for name, cls in ROBUST_RULES.items() if issubclass(cls, CoordinateWiseMixer))
REWEIGHTING_RULES = tuple(name for name, cls in ROBUST_RULES.items() if issubclass(cls, ReweightingMixer))
CLIPPING_RULES = tuple(name for name, cls in ROBUST_RULES.items() if issubclass(cls, ClippingMixer))


def robust_rule(rule: str) -> type[RobustMixer]:
    """The class registered as ``rule``; a ValueError naming the valid rules for an unknown one."""
    try:
        return ROBUST_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown robust rule {rule!r}; valid rules: {', '.join(ROBUST_RULES)} (or 'none')") from None


def make_robust(base: Mixer, rule: str | None, **options: Any) -> Mixer:
    """``base`` made robust with ``rule`` (one of ``ROBUST_RULES``) and ``options`` (byzantine, tau,
    iterations, select); ``None`` or ``"none"`` returns ``base`` unchanged. A ValueError naming the
    valid rules for an unknown one."""
    if rule is None or rule == "none":
        return base
    return robust_rule(rule)(base, **options)


def check_neighbourhood(rule: str, k: int, byzantine: int, select: int | None = None) -> None:
    """A clear error when a neighbourhood of k members (self included) is too small for ``rule``
    to tolerate f = ``byzantine``. Clipping works at any size (f ≥ k − 1 just keeps one's own)."""
    robust_rule(rule).check_neighbourhood(k, byzantine, select)


def robust_weights(hood: Neighbourhoods, rule: str, space: str, *, byzantine: int = 1, tau: float | None = None,
                   iterations: int = 3, select: int | None = None) -> torch.Tensor:
    """The new weights c (g, k) of a re-weighting rule (``REWEIGHTING_RULES``) in geometry ``space``
    (see ``ReweightingMixer.reweight``): what ``make_robust(m, rule, ...).neighbour_weights(hood)``
    gives for a mixer m whose ``robust_space`` is ``space``."""
    cls = ROBUST_RULES.get(rule)
    if cls is None or not issubclass(cls, ReweightingMixer):
        raise ValueError(f"{rule!r} is not a re-weighting rule; those are {', '.join(REWEIGHTING_RULES)}")
    return cls.reweight(hood, space, byzantine=byzantine, tau=tau, iterations=iterations, select=select)


__all__ = [
    "CLIPPING_RULES",
    "COORDINATE_RULES",
    "REWEIGHTING_RULES",
    "ROBUST_RULES",
    "SPACES",
    "CenteredClippingMixer",
    "ClippingMixer",
    "CoordinateWiseMixer",
    "KrumMixer",
    "MedianMixer",
    "MultiKrumMixer",
    "ReweightingMixer",
    "RobustMixer",
    "SelfCenteredClippingMixer",
    "TrimmedMeanMixer",
    "centred_gram",
    "check_neighbourhood",
    "krum_scores",
    "make_robust",
    "pairwise_sq_distances",
    "robust_rule",
    "robust_weights",
    "sq_distances",
]
