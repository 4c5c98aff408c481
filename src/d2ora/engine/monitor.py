"""The consensus monitor: the model the peers would agree on, and how far apart they are.

It needs every peer's adapter, so it runs in the process that hosts peer 0 and reads a ``(P,
numel)`` gather of all adapters (the stacks themselves in the simulator, a gather to rank 0 every
``eval_every`` rounds under torchrun).

The consensus model is the run's own rule applied by peer 0 to a neighbourhood of every peer with
uniform weights 1/P (DeCAF: the SVD-truncated mean of the products; DIMAT: the mean aligned to
peer 0's basis; D²ORA / FedAvg: the mean of m, B, A). A run without communication (``local``) is
scored by the plain mean of the local adapters, the original "train, then aggregate once" design.
When some peers attack (``byzantine``), the consensus is the honest peers' adapters mixed by the
run's base rule (a robust wrapper guards one receiver against its neighbours; the monitor scores
what the honest peers agree on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from d2ora.data.tasks import Batch
from d2ora.engine.consensus import measure
from d2ora.engine.evaluate import evaluate_peers
from d2ora.engine.host import PeerHost
from d2ora.engine.layout import AdapterLayout
from d2ora.mixers import D2oraMixer, LocalMixer, Mixer
from d2ora.mixers.base import LayerInputs, Neighbourhoods, unwrapped

#: The gossip-step slot of the key that draws the consensus model's DIMAT batch (gossip steps use 0..).
CONSENSUS_STEP = 1 << 20


def consensus_rule(mixer: Mixer) -> Mixer:
    """The rule that builds the consensus model for a run mixed by ``mixer``."""
    return D2oraMixer() if isinstance(mixer, LocalMixer) else mixer


def consensus_adapter(layout: AdapterLayout, all_flat: torch.Tensor, mixer: Mixer,
                      layer_inputs: LayerInputs | None = None,
                      base_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Peer 0's mix of every peer's adapter ``(P, numel)`` with weights 1/P: the flat consensus
    adapter ``(numel,)``. ``layer_inputs(0, layer)``: peer 0's own inputs (DIMAT); ``base_weights``:
    the frozen W0 per layer (DoRA-exact)."""
    peers = all_flat.shape[0]
    if peers == 1:
        return all_flat[0].clone()
    rule = consensus_rule(mixer)
    layers, dense = layout.unflatten(all_flat.unsqueeze(0))  # (1, P, ...)
    weight_dtype = torch.float64 if all_flat.dtype == torch.float64 else torch.float32
    hood = Neighbourhoods(
        layers=layers, dense=dense, weights=torch.full((1, peers), 1.0 / peers, dtype=weight_dtype),
        own=torch.zeros(1, dtype=torch.long), layer_inputs=layer_inputs if rule.needs_layer_inputs else None,
        base_weights=base_weights,
    )
    out = rule.mix(hood)
    return layout.flatten_stacks(out.layers, out.dense)[0]


@dataclass
class ConsensusResult:
    adapter: torch.Tensor  # (numel,) flat consensus adapter
    test: dict[str, float]
    distances: dict[str, float | None]


class ConsensusMonitor:
    """Scores the consensus model on the test set in the host of peer 0 (its slot lends the model)."""

    def __init__(self, host: PeerHost, mixer: Mixer, test_batches: Sequence[Batch],
                 members: Sequence[int] | None = None) -> None:
        if 0 not in host.peer_ids:
            raise ValueError("the consensus monitor runs where peer 0 is hosted")
        self.host = host
        # A Byzantine-robust rule guards a peer against its neighbours; the consensus model is the
        # honest peers' agreement, so it is built by the underlying rule.
        self.mixer = unwrapped(mixer)
        self.test_batches = list(test_batches)
        #: Whose adapters make the consensus (all peers; the honest ones when some attack).
        self.members = None if members is None else list(members)

    def evaluate(self, all_flat: torch.Tensor, round_index: int) -> ConsensusResult:
        host = self.host
        if self.members is not None and len(self.members) < all_flat.shape[0]:
            all_flat = all_flat[self.members]
        inputs = None
        if consensus_rule(self.mixer).needs_layer_inputs:
            inputs = host.layer_inputs((round_index, CONSENSUS_STEP))
        adapter = consensus_adapter(host.layout, all_flat, self.mixer,
                                    None if inputs is None else (lambda row, layer: inputs(0, layer)),
                                    host.peer_model.base_weights())
        with host.peer_model.holding(host.local(0), adapter):
            test = evaluate_peers(host.peer_model, host.task, self.test_batches, host.device, peers=[host.local(0)])[0]
        layers, _ = host.layout.unflatten(all_flat)
        d = measure(host.peer_model, layers)
        return ConsensusResult(adapter=adapter, test=test,
                               distances={"magnitude": d.magnitude, "product": d.product, "merged": d.merged})
