"""Helpers shared by the mixers: input checks and linear mixing in a safe precision.

Private to ``d2ora.mixers``; every rule-specific piece of math lives in the rule's own module.
"""

from __future__ import annotations

import torch

from d2ora.mixers.base import LayerStack, MixInput, mix_dense_linearly

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: a 1/3 weight is 0.333984375 in bf16, so rows would stop summing to 1 and
    repeated mixing would drift the mean. fp64 stays fp64 (tests compare against references)."""
    return torch.float32 if dtype in _HALF else dtype


def peer_count(inputs: MixInput) -> int:
    """P from the stacks, checking that every factor, magnitude and dense tensor agrees on it."""
    counts: dict[str, int] = {}
    for name, stack in inputs.layers.items():
        counts[f"{name}.lora_a"] = stack.lora_a.shape[0]
        counts[f"{name}.lora_b"] = stack.lora_b.shape[0]
        if stack.magnitude is not None:
            counts[f"{name}.magnitude"] = stack.magnitude.shape[0]
    counts.update({name: t.shape[0] for name, t in inputs.dense.items()})
    distinct = set(counts.values())
    if len(distinct) > 1:
        raise ValueError(f"tensors disagree on the peer count: {counts}")
    if not distinct:  # nothing to mix: the matrix alone says how many peers there are
        return inputs.weights.shape[0] if inputs.weights.dim() == 2 else 0
    return distinct.pop()


def checked_weights(inputs: MixInput) -> torch.Tensor:
    """The (P, P) mixing matrix, checked against the stacks: the wrong shape or a NaN in W would
    otherwise broadcast or propagate silently into every peer's adapter."""
    peers = peer_count(inputs)
    weights = inputs.weights
    if weights.shape != (peers, peers):
        raise ValueError(f"mixing matrix has shape {tuple(weights.shape)}, expected ({peers}, {peers})")
    if not torch.isfinite(weights).all():
        raise ValueError("mixing matrix holds non-finite entries")
    return weights


def mix_magnitude(weights: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor | None:
    """DoRA magnitudes are plain vectors in a fixed basis (one entry per output row), so every rule
    mixes them linearly; LoRA (``None``) has none."""
    return None if magnitude is None else mix_dense_linearly(weights, magnitude)


def mix_dense(weights: torch.Tensor, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense trainable tensors (e.g. a classification head) have no factor structure: linear mix."""
    return {name: mix_dense_linearly(weights, t) for name, t in dense.items()}


def mix_stack_linearly(weights: torch.Tensor, stack: LayerStack) -> LayerStack:
    """A, B and m each averaged with W: the D²ORA / DLoRA / FedAvg rule for one layer."""
    return LayerStack(
        lora_a=mix_dense_linearly(weights, stack.lora_a),
        lora_b=mix_dense_linearly(weights, stack.lora_b),
        magnitude=mix_magnitude(weights, stack.magnitude),
        scaling=stack.scaling,
    )


def neighbourhood(weights: torch.Tensor, peer: int) -> torch.Tensor:
    """Indices j with ``W[peer, j] != 0`` (the closed neighbourhood), ascending; an empty one is an
    error because a peer must at least keep its own adapter."""
    idx = torch.nonzero(weights[peer] != 0, as_tuple=False).flatten()
    if idx.numel() == 0:
        raise ValueError(f"row {peer} of the mixing matrix is all zero: peer {peer} would get nothing")
    return idx
