"""The mixer interface: one aggregation rule per class, seeing only what a real peer can know.

A receiving peer i knows its own adapter, the adapters its in-neighbours sent it, its own row of
mixing weights, the frozen base model every peer shares and (for DIMAT) its own data. A mixer gets exactly that, for a batch of receivers
whose closed neighbourhoods have the same size k (so e.g. every peer of a ring is one batched
call): every tensor carries two leading dims ``(g, k)`` (receiver, neighbour), ``weights[g, k]``
is the weight receiver g gives its k-th neighbour, and ``own[g]`` says which of the k is the
receiver itself. The mixer returns one new adapter per receiver, ``(g, ...)``. It never sees the
global mixing matrix, other peers' rows, or how the adapters travelled (in memory, over
torch.distributed, or through the trust layer's signature checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch


@dataclass
class LayerStack:
    """One adapted layer's adapters, stacked on the leading dims (``(g, k)`` in a mixer's input,
    ``(g,)`` in its output, ``(P,)`` for the P peers of a process)."""

    lora_a: torch.Tensor  # (.., r, in)
    lora_b: torch.Tensor  # (.., out, r)
    magnitude: torch.Tensor | None  # (.., out) for DoRA, None for LoRA
    scaling: float  # s = alpha / r (or alpha / sqrt(r))


#: ``layer_inputs(row, layer)`` -> (tokens, in): what ``layer`` sees on a batch of receiver
#: ``row``'s own data (its own model, its own examples).
LayerInputs = Callable[[int, str], torch.Tensor]


@dataclass
class Neighbourhoods:
    """g receivers, each with the adapters of its closed neighbourhood of k peers (itself included)."""

    layers: dict[str, LayerStack]  # every tensor (g, k, ...)
    #: Dense trainable tensors (modules_to_save, e.g. a classification head), each (g, k, ...).
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    #: (g, k) non-negative weights; row g is receiver g's own row of the mixing matrix.
    weights: torch.Tensor = field(default_factory=lambda: torch.ones(1, 1))
    #: (g,) column of each receiver's own adapter among its k neighbours.
    own: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    #: For activation-matching mixers (DIMAT); None when not available.
    layer_inputs: LayerInputs | None = None
    #: Each adapted layer's frozen base weight W0 ``(out, in)``, shared by every peer (no leading
    #: dims): what DoRA-exact consensus needs for the row norms ||W0 + s·B_j A_j||_c. Every peer
    #: holds the same pretrained model, so a real peer knows it; None where not supplied.
    base_weights: Mapping[str, torch.Tensor] | None = None  # W0 per layer, possibly dequantized on access

    @property
    def receivers(self) -> int:
        return self.weights.shape[0]

    @property
    def size(self) -> int:
        return self.weights.shape[1]


@dataclass
class MixOutput:
    """One new adapter per receiver: every tensor (g, ...)."""

    layers: dict[str, LayerStack]
    dense: dict[str, torch.Tensor]


class Mixer(Protocol):
    """An aggregation rule. ``factors_replaced`` tells the engine whether A and B are re-expressed in
    a new basis (the optimizer's moments for A and B then no longer match and are reset).
    ``robust_space`` is the geometry in which ``d2ora.mixers.robust`` measures distances between
    neighbours for this rule: ``"factors"`` (the flat A, B, m, dense vector; the rule averages
    factors), ``"products"`` (s·B·A per layer, plus m and dense; the rule mixes products), or None
    (no Byzantine-robust variant: the rule does not take a weighted combination of raw adapters).
    ``no_robust_reason`` says why in that last case, as one clause the refusal quotes ("it ...").

    Mixers satisfy this protocol structurally (they do not subclass it), so the optional member
    ``no_robust_reason`` is read with a default of None. A mixer that runs another one inside its
    own rule subclasses ``MixerWrapper``; ``unwrapped(mixer)`` is the plain rule underneath."""

    name: ClassVar[str]
    factors_replaced: ClassVar[bool]
    needs_layer_inputs: ClassVar[bool]
    robust_space: ClassVar[str | None]
    no_robust_reason: ClassVar[str | None] = None

    def mix(self, hood: Neighbourhoods) -> MixOutput: ...


class MixerWrapper:
    """A mixer that runs another mixer, ``base``, inside its own rule (e.g. the Byzantine-robust
    rules of ``d2ora.mixers.robust``, which re-weight or screen a neighbourhood before the base mixes
    it). Subclassing it is how a wrapper declares what it wraps: see ``unwrapped``."""

    def __init__(self, base: Mixer) -> None:
        self.base = base


def unwrapped(mixer: Mixer) -> Mixer:
    """The plain rule under ``mixer``: itself for a plain mixer, the innermost ``base`` for a
    ``MixerWrapper``. The consensus monitor scores what honest peers agree on, which is built by
    this rule (a robust wrapper guards one receiver against its neighbours, not the consensus)."""
    while isinstance(mixer, MixerWrapper):
        mixer = mixer.base
    return mixer


def mix_dense_linearly(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``out[g] = Σ_k weights[g, k] · x[g, k]`` for any trailing shape: (g, k), (g, k, ...) -> (g, ...).

    Computed in at least fp32 and returned in the input's dtype: in bf16 a 1/3 weight is 0.33398,
    so rows would stop summing to 1 and repeated mixing would drift the mean. The weights may live
    on the CPU while the stacks sit on an accelerator.
    """
    compute = torch.promote_types(stacked.dtype, torch.float32)
    g, k = stacked.shape[:2]
    flat = stacked.reshape(g, k, -1).to(compute)
    mixed = torch.bmm(weights.to(device=flat.device, dtype=compute).unsqueeze(1), flat)  # (g, 1, n)
    return mixed.reshape(g, *stacked.shape[2:]).to(stacked.dtype)


def own_slice(hood: Neighbourhoods, stacked: torch.Tensor) -> torch.Tensor:
    """Each receiver's own entry of a (g, k, ...) tensor: (g, ...)."""
    return stacked[torch.arange(stacked.shape[0], device=stacked.device), hood.own.to(stacked.device)]
