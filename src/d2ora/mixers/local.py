"""No communication: every peer keeps its own adapter (the lower bound of every comparison)."""

from __future__ import annotations

from typing import ClassVar

from d2ora.mixers._common import checked_weights
from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods, own_slice


class LocalMixer:
    """Returns each receiver's own adapter; the neighbours' adapters and the weights are ignored
    (a run with this rule sends nothing, so its neighbourhoods hold only the receiver itself).

    The ``centralized`` upper bound (one peer trained on the pooled data) is a run mode, not a
    mixer.
    """

    name: ClassVar[str] = "local"
    factors_replaced: ClassVar[bool] = False
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = None  # nothing is mixed, so nothing to make robust
    no_robust_reason: ClassVar[str | None] = (
        "it does not mix: each peer keeps its own adapter, which no neighbour can influence"
    )

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        checked_weights(hood)
        layers = {
            name: LayerStack(
                lora_a=own_slice(hood, stack.lora_a),
                lora_b=own_slice(hood, stack.lora_b),
                magnitude=None if stack.magnitude is None else own_slice(hood, stack.magnitude),
                scaling=stack.scaling,
            )
            for name, stack in hood.layers.items()
        }
        return MixOutput(layers=layers, dense={name: own_slice(hood, t) for name, t in hood.dense.items()})
