"""The shared base of every Byzantine-robust rule: a mixer that wraps a base mixer.

Which base mixers a rule can wrap is declared by the mixers, never listed here: a base mixer's
``robust_space`` (``d2ora.mixers.base.Mixer``) names the geometry its neighbours are compared in
(see ``geometry``), and a mixer whose ``robust_space`` is None is refused with its own
``no_robust_reason``. Each rule declares the ``spaces`` it is defined in, the options it takes
(``takes_tau``, ``takes_select``) and how large a neighbourhood must be for f Byzantine members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from d2ora.mixers.base import Mixer, MixerWrapper, MixOutput, Neighbourhoods
from d2ora.mixers.robust.geometry import SPACES

if TYPE_CHECKING:
    from collections.abc import Iterable


class RobustMixer(MixerWrapper, ABC):
    """A base mixer (D²ORA, FedAvg or DeCAF, ...) with a Byzantine-robust rule applied by every
    receiver to its own closed neighbourhood of k members (itself included: its own adapter is
    honest from its own point of view), tolerating ``byzantine`` = f of them. One subclass per rule,
    registered by its ``rule`` name in ``d2ora.mixers.robust.ROBUST_RULES``.

    ``name``, ``factors_replaced`` and ``needs_layer_inputs`` are the base's: the engine batches,
    feeds and resets optimizer moments exactly as for the base rule (a re-weighted D²ORA mix is
    still a combination of factors in the same coordinates; DeCAF still re-bases them).
    """

    rule: ClassVar[str]
    #: The geometries (``robust_space`` values) the rule is defined in.
    spaces: ClassVar[tuple[str, ...]] = SPACES
    #: Whether the rule takes a clipping radius ``tau`` / a multi-Krum ``select``.
    takes_tau: ClassVar[bool] = False
    takes_select: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = None  # already robust: not wrapped a second time

    def __init__(self, base: Mixer, *, byzantine: int = 1, tau: float | None = None,
                 iterations: int = 3, select: int | None = None) -> None:
        rule = self.rule
        if isinstance(base, RobustMixer):  # ValueError like every refusal here: callers report config errors
            raise ValueError(f"{base!r} is already robust; wrap the plain mixer instead")  # noqa: TRY004
        space = getattr(base, "robust_space", None)
        if space is None:
            # Optional on the Mixer protocol (mixers implement it structurally): default None.
            reason = getattr(base, "no_robust_reason", None) or "it declares no robust geometry (robust_space = None)"
            raise ValueError(f"no Byzantine-robust rule works with the {base.name!r} mixer: {reason}. "
                             f"Robust rules work with {_support_summary()}")
        if space not in SPACES:
            raise ValueError(f"mixer {base.name!r} has robust_space {space!r}; valid: {', '.join(SPACES)}")
        if space not in self.spaces:
            others = [name for name, cls in _registry().items() if space in cls.spaces]
            raise ValueError(f"{self.unsupported_space(base.name, space)}. With it use one of {', '.join(others)}; "
                             f"{rule} works with {_and(_mixers_in(self.spaces))}")
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ValueError(f"byzantine must be an integer >= 0, got {byzantine!r}")
        if tau is not None and (not self.takes_tau or not tau > 0):  # `not >` also rejects NaN
            takers = [name for name, cls in _registry().items() if cls.takes_tau]
            raise ValueError(f"tau must be None (adaptive) or > 0, and only for {', '.join(takers)}; "
                             f"got tau={tau!r} for {rule}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if select is not None and (not self.takes_select or isinstance(select, bool)
                                   or not isinstance(select, int) or select < 1):
            takers = [name for name, cls in _registry().items() if cls.takes_select]
            raise ValueError(f"select is an integer >= 1 for {', '.join(takers)} only; "
                             f"got select={select!r} for {rule}")
        super().__init__(base)
        self.space = space
        self.byzantine, self.tau, self.iterations, self.select = byzantine, tau, iterations, select
        self.name = base.name
        self.factors_replaced = base.factors_replaced
        self.needs_layer_inputs = base.needs_layer_inputs

    def __repr__(self) -> str:
        return f"RobustMixer({self.base.name!r}, {self.rule!r}, byzantine={self.byzantine})"

    @classmethod
    def unsupported_space(cls, mixer: str, space: str) -> str:
        """Why the rule refuses a base mixer that mixes in ``space`` (not one of ``spaces``)."""
        return f"{cls.rule} is not defined in the {space!r} space the {mixer!r} mixer mixes in"

    @classmethod
    def check_neighbourhood(cls, k: int, byzantine: int, select: int | None = None) -> None:
        """A clear ValueError when a neighbourhood of k members (self included) is too small to
        tolerate f = ``byzantine`` (``select``: multi-Krum's, checked by the rule that takes it).
        By default any k works."""

    @classmethod
    def tolerated(cls, k: int, byzantine: int) -> int:
        """The f a mix on a neighbourhood of k members uses. A neighbourhood the trust layer shrank
        (messages it rejected: those senders are out already) tolerates fewer; the full
        neighbourhoods were checked when the run was set up. By default f itself (any k works)."""
        return byzantine

    @abstractmethod
    def neighbour_weights(self, hood: Neighbourhoods) -> torch.Tensor | None:
        """The weights c (g, k) the base mixer is run with, for logging who was excluded (c_j = 0)
        or clipped (c_j < w_j); None for a rule that has no per-neighbour weights."""

    @abstractmethod
    def mix(self, hood: Neighbourhoods) -> MixOutput: ...


def neighbourhood_phrase(k: int) -> str:
    """How the size errors name a neighbourhood (a ring's k = 3 is the common too-small case)."""
    return f"a neighbourhood of k={k}{' (ring)' if k == 3 else ''}"


# The registries below import this module (``d2ora.mixers`` imports ``d2ora.mixers.robust``, which
# imports every rule module), so they are looked up when an error message lists alternatives.


def _registry() -> dict[str, type[RobustMixer]]:
    from d2ora.mixers.robust import ROBUST_RULES

    return ROBUST_RULES


def _mixers_in(spaces: Iterable[str]) -> list[str]:
    """The registered mixers whose declared ``robust_space`` is one of ``spaces``."""
    from d2ora.mixers import MIXERS

    wanted = set(spaces)
    return [name for name, cls in MIXERS.items() if getattr(cls, "robust_space", None) in wanted]


def _support_summary() -> str:
    """Which registered mixers each robust rule works with, grouped by geometry."""
    rules = _registry()
    parts = []
    for space in SPACES:
        mixers, usable = _mixers_in([space]), [name for name, cls in rules.items() if space in cls.spaces]
        if mixers and usable:
            parts.append(f"{_and(mixers)} ({'every rule' if len(usable) == len(rules) else ', '.join(usable)})")
    return " and with ".join(parts)


def _and(names: list[str]) -> str:
    if len(names) <= 1:
        return names[0] if names else "no registered mixer"
    return f"{', '.join(names[:-1])} and {names[-1]}"
