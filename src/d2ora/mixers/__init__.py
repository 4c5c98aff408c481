"""Aggregation rules for decentralized DoRA/LoRA: one small class per rule, one file per class.

``MIXERS`` maps each rule's ``name`` to its class; ``make_mixer(name, **kwargs)`` builds one.
``make_robust(mixer, rule, **options)`` wraps one in a Byzantine-robust rule (``ROBUST_RULES``, one
class per rule in ``d2ora.mixers.robust``); ``unwrapped(mixer)`` is the plain rule under a wrapper.
"""

from __future__ import annotations

from typing import Any

from d2ora.mixers.base import (
    LayerInputs,
    LayerStack,
    Mixer,
    MixerWrapper,
    MixOutput,
    Neighbourhoods,
    mix_dense_linearly,
    unwrapped,
)
from d2ora.mixers.d2ora import D2oraMixer
from d2ora.mixers.decaf import DecafMixer
from d2ora.mixers.dimat import DimatMixer
from d2ora.mixers.dora_exact import DoraExactMixer
from d2ora.mixers.fedavg import FedAvgExactMixer, FedAvgMixer, FedAvgProductsMixer
from d2ora.mixers.graph import closed_neighbourhood, degree_groups, mix_stacks
from d2ora.mixers.local import LocalMixer
from d2ora.mixers.robust import ROBUST_RULES, RobustMixer, make_robust

MIXERS: dict[str, type] = {
    cls.name: cls
    for cls in (D2oraMixer, DecafMixer, DoraExactMixer, DimatMixer, FedAvgMixer, FedAvgProductsMixer, FedAvgExactMixer, LocalMixer)
}


def is_federated(name: str) -> bool:
    """Whether mixer ``name`` is a FedAvg rule: every peer mixes all adapters with the server's weights."""
    return bool(getattr(MIXERS.get(name), "federated", False))


def make_mixer(name: str, **kwargs: Any) -> Mixer:
    """The mixer registered as ``name``, constructed with ``kwargs``; a ValueError listing the
    valid names for an unknown one."""
    try:
        cls = MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}") from None
    return cls(**kwargs)


__all__ = [
    "MIXERS",
    "ROBUST_RULES",
    "D2oraMixer",
    "DecafMixer",
    "DimatMixer",
    "DoraExactMixer",
    "FedAvgExactMixer",
    "FedAvgMixer",
    "FedAvgProductsMixer",
    "LayerInputs",
    "LayerStack",
    "LocalMixer",
    "MixOutput",
    "Mixer",
    "MixerWrapper",
    "Neighbourhoods",
    "RobustMixer",
    "closed_neighbourhood",
    "degree_groups",
    "is_federated",
    "make_mixer",
    "make_robust",
    "mix_dense_linearly",
    "mix_stacks",
    "unwrapped",
]
