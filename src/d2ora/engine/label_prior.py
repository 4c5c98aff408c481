"""Label-prior logit adjustment of the local loss: a remedy for label skew that needs no messages.

Under strong label skew a peer's local steps teach the shared classification head its own label
prior ("predict sport"), and that bias is what averaging then fights. The logit-adjusted loss
(Menon et al., "Long-tail learning via logit adjustment", ICLR 2021; in federated learning the idea
behind FedLC's calibration and FedRS's restricted softmax) trains each peer on

    softmax(z + τ·log π_peer),   π_peer = the peer's own label frequencies,

so the logits z themselves are pushed towards the class-balanced classifier p(x | y), which is the
same on every peer, instead of p(y | x) under the peer's prior. Evaluation uses the plain logits.
A class the peer never sees gets π = FLOOR rather than 0: its logit is then hardly trained by that
peer (it is neither pushed up nor, as plain cross-entropy does, pushed down), and stays finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The prior given to a class absent from a peer's shard (log FLOOR ≈ −9.2).
FLOOR = 1e-4


def log_prior_offsets(labels_per_peer: Sequence[np.ndarray], num_labels: int, tau: float) -> torch.Tensor:
    """``(peers, num_labels)`` offsets τ·log π_k, π_k each peer's label frequencies (floored at FLOOR)."""
    if tau < 0:
        raise ValueError(f"logit_adjust (τ) must be non-negative, got {tau}")
    rows = []
    for peer, labels in enumerate(labels_per_peer):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError(f"peer {peer} has no training labels to estimate its prior from")
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(f"peer {peer} has labels outside [0, {num_labels})")
        counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
        rows.append(np.log(np.maximum(counts / counts.sum(), FLOOR)))
    return tau * torch.tensor(np.stack(rows), dtype=torch.float32)
