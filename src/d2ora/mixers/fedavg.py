"""The federated baselines: FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", arXiv 1602.05629) applied to DoRA adapters, three ways.

What makes a rule FedAvg is the neighbourhood the engine hands it (``federated = True``): every
peer, weighted by shard size (``topology.fedavg_weights``, the one place those weights are
computed), and one mix per round. That is exactly what a server outside the P peers, holding no
data, would compute and send back; d2ora runs it without a server, each peer receiving every
other's adapter. What the server averages:

- ``fedavg``: every factor, m, B and A (FedAvg-on-LoRA as done in practice, with the same product
  interference as ``D2oraMixer``);
- ``fedavg_products``: the products s·B_j A_j, truncated back to rank r by SVD (the server rule of
  FlexLoRA, Bai et al., arXiv 2402.11505, and HLoRA), i.e. DeCAF's rule over the whole federation;
- ``fedavg_exact``: the merged DoRA weights (``DoraExactMixer``'s rule over the whole federation).
"""

from __future__ import annotations

from typing import ClassVar

from d2ora.mixers._common import mix_linearly
from d2ora.mixers.base import MixOutput, Neighbourhoods
from d2ora.mixers.decaf import DecafMixer
from d2ora.mixers.dora_exact import DoraExactMixer


class FedAvgMixer:
    """Every receiver's neighbourhood is all peers with the server's weights; it takes their mean."""

    name: ClassVar[str] = "fedavg"
    federated: ClassVar[bool] = True  # the engine gives it every peer, weighted by shard size
    factors_replaced: ClassVar[bool] = False  # a plain average keeps A/B's coordinates, as D²ORA's
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "factors"  # the same averaged factors as D²ORA

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        return mix_linearly(hood)


class FedAvgProductsMixer(DecafMixer):
    """The server averages the products s·B_j A_j and sends back their rank-r truncated SVD."""

    name: ClassVar[str] = "fedavg_products"
    federated: ClassVar[bool] = True


class FedAvgExactMixer(DoraExactMixer):
    """The server averages the merged DoRA weights and sends back the closest rank-r DoRA adapter."""

    name: ClassVar[str] = "fedavg_exact"
    federated: ClassVar[bool] = True
