"""The mixer interface: one aggregation rule per class, knowing only tensors and mixing weights.

A mixer never knows how tensors travelled (in-process stacks, torch.distributed, signed files);
the engine hands it every peer's adapter as stacked tensors plus the mixing matrix and gets back
new stacks. Row i of the mixing matrix W holds the weights peer i gives to each peer (zero off
its closed neighbourhood), so a mixer may only combine peer i's value with those of peers j
where ``W[i, j] != 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch


@dataclass
class LayerStack:
    """One adapted layer's adapters for all P peers, stacked on dim 0."""

    lora_a: torch.Tensor  # (P, r, in)
    lora_b: torch.Tensor  # (P, out, r)
    magnitude: torch.Tensor | None  # (P, out) for DoRA, None for LoRA
    scaling: float  # s = alpha / r (or alpha / sqrt(r))

    @property
    def peers(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class MixInput:
    """Everything a mixer may read in one round."""

    layers: dict[str, LayerStack]
    #: Dense trainable tensors (modules_to_save, e.g. a classification head), each (P, ...).
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    #: (P, P) row-stochastic mixing matrix; W[i, j] is the weight peer i gives peer j.
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
    #: For activation-matching mixers (DIMAT): ``layer_inputs(peer, layer)`` -> (tokens, in), the
    #: inputs that ``layer`` sees on a batch of ``peer``'s own data. None when not available.
    layer_inputs: Callable[[int, str], torch.Tensor] | None = None


@dataclass
class MixOutput:
    layers: dict[str, LayerStack]
    dense: dict[str, torch.Tensor]


class Mixer(Protocol):
    """An aggregation rule. ``factors_replaced`` tells the engine whether A and B are re-expressed in
    a new basis (the optimizer's moments for A and B then no longer match and are reset)."""

    name: ClassVar[str]
    factors_replaced: ClassVar[bool]
    needs_layer_inputs: ClassVar[bool]

    def mix(self, inputs: MixInput) -> MixOutput: ...


def mix_dense_linearly(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_j W[i, j] · x[j]`` over the peer dimension (dim 0), for any trailing shape.

    Computed in at least fp32 and returned in the input's dtype: in bf16 a 1/3 weight is 0.33398,
    so rows would stop summing to 1 and repeated mixing would drift the mean. W may live on the
    CPU while the stacks sit on an accelerator.
    """
    compute = torch.promote_types(stacked.dtype, torch.float32)
    flat = stacked.reshape(stacked.shape[0], -1).to(compute)
    mixed = weights.to(device=flat.device, dtype=compute) @ flat
    return mixed.reshape(weights.shape[0], *stacked.shape[1:]).to(stacked.dtype)
