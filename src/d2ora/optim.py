"""The optimizer and schedule both recipes use: AdamW parameter groups and the linear schedule.

``d2ora train`` optimizes one model's parameters, ``d2ora simulate`` P peers' stacked copies of
them (a leading peer dimension); the grouping rule is the same, shifted by that dimension.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def adamw_groups(params: Sequence[nn.Parameter], weight_decay: float, stacked: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only (A, B, head weights; with ``stacked``
    every tensor carries a leading peer dimension, so a matrix has 3 dims). Decaying a DoRA
    magnitude, a bias or a norm scale pulls it to 0, i.e. shrinks the layer's output, instead of
    regularising the update. Empty groups are left out."""
    matrix_ndim = 3 if stacked else 2
    decay = [p for p in params if p.ndim >= matrix_ndim]
    no_decay = [p for p in params if p.ndim < matrix_ndim]
    groups = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batches(count: int, parts: int) -> list[slice]:
    """Gradient accumulation's split of ``count`` examples into ``parts`` near-equal consecutive
    slices (the same for every peer, so each micro-batch stays peer-major with equal counts)."""
    bounds = np.linspace(0, count, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def micro_batch_weights(units: torch.Tensor) -> torch.Tensor:
    """Each micro-batch's share ``(G, ...)`` of the step's loss terms ``units`` (examples, or target
    tokens): weighting every micro-batch's mean by it makes the accumulated loss, and its gradient,
    the mean over the whole batch."""
    return units / units.sum(dim=0).clamp_min(1)
