"""The federated baseline: FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", arXiv 1602.05629) applied to the adapter's m, B and A.

The rule is the plain weighted average of every factor (as FedAvg-on-LoRA does in practice, with
the same product interference as ``D2oraMixer``). What makes it FedAvg is the neighbourhood the
engine hands it: every peer, weighted by shard size (``topology.fedavg_weights``, the one place
those weights are computed), and one mix per round. That is exactly what a server outside the P
peers, holding no data, would compute and send back; d2ora runs it without a server, each peer
receiving every other's adapter.
"""

from __future__ import annotations

from typing import ClassVar

from d2ora.mixers._common import mix_linearly
from d2ora.mixers.base import MixOutput, Neighbourhoods


class FedAvgMixer:
    """Every receiver's neighbourhood is all peers with the server's weights; it takes their mean."""

    name: ClassVar[str] = "fedavg"
    factors_replaced: ClassVar[bool] = False  # a plain average keeps A/B's coordinates, as D²ORA's
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "factors"  # the same averaged factors as D²ORA

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        return mix_linearly(hood)
