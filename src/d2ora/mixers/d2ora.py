"""D²ORA's original rule: average every factor with the mixing weights.

This is the gossip step of decentralized LoRA as in DLoRA (Saadati et al., "DeCAF: Decentralized
Consensus-And-Factorization for Low-Rank Adaptation of Foundation Models", arXiv 2505.21382, their
baseline) and Dec-LoRA (Ghiasvand, Alizadeh, Pedarsani, "Decentralized Low-Rank Fine-Tuning of Large
Language Models", arXiv 2501.15361), extended to DoRA's magnitude (Liu et al., arXiv 2402.09353):

    m_i ← Σ_j W[i, j] m_j,    B_i ← Σ_j W[i, j] B_j,    A_i ← Σ_j W[i, j] A_j.

Note that the product of the averages is not the average of the products,
(Σ_j w_j B_j)(Σ_j w_j A_j) ≠ Σ_j w_j B_j A_j ("consensus interference"); ``DecafMixer`` fixes that.
"""

from __future__ import annotations

from typing import ClassVar

from d2ora.mixers._common import mix_linearly
from d2ora.mixers.base import MixOutput, Neighbourhoods


class D2oraMixer:
    """Each receiver replaces m, B and A by the weighted average over its closed neighbourhood.

    One batched matmul per tensor over the receivers. A and B stay in the same coordinates (row k
    of A is still row k), so the optimizer's moments remain meaningful and ``factors_replaced`` is
    False. Works for LoRA (``magnitude is None``) unchanged.
    """

    name: ClassVar[str] = "d2ora"
    factors_replaced: ClassVar[bool] = False
    needs_layer_inputs: ClassVar[bool] = False
    robust_space: ClassVar[str | None] = "factors"  # distances between flat (A, B, m, dense) vectors

    def mix(self, hood: Neighbourhoods) -> MixOutput:
        return mix_linearly(hood)
