"""The federated baseline: FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", arXiv 1602.05629) applied to the adapter's m, B and A.

Topology: a star whose centre is a server. The server is a coordinator, not a data holder: it owns
no data, takes no local steps and is not one of the P peers; it only averages what the peers send
and sends the average back. Averaging B and A separately is what FedAvg-on-LoRA does in practice
(and inherits the same product interference as ``D2oraMixer``: the average of factors is not the
average of products).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from d2ora.mixers._common import compute_dtype, peer_count
from d2ora.mixers.base import LayerStack, MixInput, MixOutput


class FedAvgMixer:
    """Every peer receives the global (optionally weighted) mean of m, B, A and dense tensors.

    ``peer_weights``: one non-negative number per peer, e.g. its local sample count n_k as in
    FedAvg's Σ_k (n_k / n) w_k; uniform when None. The gossip matrix W is ignored entirely (the
    server reaches every peer in one hop); only the peer count is read, from the stacks.
    """

    name: ClassVar[str] = "fedavg"
    factors_replaced: ClassVar[bool] = False  # a plain average keeps A/B's coordinates, as D²ORA's
    needs_layer_inputs: ClassVar[bool] = False

    def __init__(self, peer_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        if peer_weights is not None:
            w = torch.as_tensor(peer_weights, dtype=torch.float64).flatten()
            if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"peer_weights must be finite, non-negative and not all zero, got {w.tolist()}")
            self.peer_weights: torch.Tensor | None = w / w.sum()
        else:
            self.peer_weights = None

    def server_weights(self, peers: int) -> torch.Tensor:
        """The normalised weight of each peer in the server's average, shape (P,)."""
        if self.peer_weights is None:
            return torch.full((peers,), 1.0 / peers, dtype=torch.float64)
        if self.peer_weights.numel() != peers:
            raise ValueError(f"peer_weights has {self.peer_weights.numel()} entries for {peers} peers")
        return self.peer_weights

    def mix(self, inputs: MixInput) -> MixOutput:
        p = self.server_weights(peer_count(inputs))

        def broadcast_mean(stacked: torch.Tensor) -> torch.Tensor:
            # The server computes one average (a (1, P) @ (P, n) product, not P identical rows of a
            # (P, P) one) and every peer receives its own copy of it.
            compute = compute_dtype(stacked.dtype)
            flat = stacked.reshape(stacked.shape[0], -1).to(compute)
            mean = (p.to(device=flat.device, dtype=compute) @ flat).reshape(stacked.shape[1:]).to(stacked.dtype)
            return mean.expand_as(stacked).clone()

        layers = {
            name: LayerStack(
                lora_a=broadcast_mean(stack.lora_a),
                lora_b=broadcast_mean(stack.lora_b),
                magnitude=None if stack.magnitude is None else broadcast_mean(stack.magnitude),
                scaling=stack.scaling,
            )
            for name, stack in inputs.layers.items()
        }
        return MixOutput(layers=layers, dense={name: broadcast_mean(t) for name, t in inputs.dense.items()})
