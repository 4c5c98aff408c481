"""No communication: every peer keeps its own adapter (the lower bound of every comparison)."""

from __future__ import annotations

from typing import ClassVar

from d2ora.mixers.base import MixInput, MixOutput


class LocalMixer:
    """Returns the inputs unchanged: the same tensor objects, not copies (nothing is computed, so
    nothing needs a new buffer). Mixing weights are ignored, and not even checked, because a
    peer training alone has no neighbours to weigh.

    The ``centralized`` upper bound (one peer trained on the pooled data) is an engine mode, not a
    mixer.
    """

    name: ClassVar[str] = "local"
    factors_replaced: ClassVar[bool] = False
    needs_layer_inputs: ClassVar[bool] = False

    def mix(self, inputs: MixInput) -> MixOutput:
        return MixOutput(layers=dict(inputs.layers), dense=dict(inputs.dense))
