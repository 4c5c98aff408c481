"""Helpers shared by the mixers: input checks and linear mixing in a safe precision.

Private to ``d2ora.mixers``; every rule-specific piece of math lives in the rule's own module.
"""

from __future__ import annotations

import torch

from d2ora.mixers.base import LayerStack, MixOutput, Neighbourhoods, mix_dense_linearly

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: a 1/3 weight is 0.333984375 in bf16, so rows would stop summing to 1 and
    repeated mixing would drift the mean. fp64 stays fp64 (tests compare against references)."""
    return torch.float32 if dtype in _HALF else dtype


def checked_weights(hood: Neighbourhoods) -> torch.Tensor:
    """The (g, k) weights, checked against every stack and ``own``: a wrong shape or a NaN weight
    would otherwise broadcast or propagate silently into every receiver's adapter."""
    weights = hood.weights
    if weights.dim() != 2:
        raise ValueError(f"neighbourhood weights must be (receivers, neighbours), got shape {tuple(weights.shape)}")
    expected = tuple(weights.shape)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, stack in hood.layers.items():
        shapes[f"{name}.lora_a"] = tuple(stack.lora_a.shape[:2])
        shapes[f"{name}.lora_b"] = tuple(stack.lora_b.shape[:2])
        if stack.magnitude is not None:
            shapes[f"{name}.magnitude"] = tuple(stack.magnitude.shape[:2])
    shapes.update({name: tuple(t.shape[:2]) for name, t in hood.dense.items()})
    wrong = {name: shape for name, shape in shapes.items() if shape != expected}
    if wrong:
        raise ValueError(f"weights have shape {expected} (receivers, neighbours) but tensors lead with {wrong}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("neighbourhood weights must be finite and non-negative")
    own = hood.own
    if own.shape != (expected[0],) or (own < 0).any() or (own >= expected[1]).any():
        raise ValueError(f"own must give one column in 0..{expected[1] - 1} per receiver, got {own.tolist()}")
    return weights


def mix_magnitude(weights: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor | None:
    """DoRA magnitudes are plain vectors in a fixed basis (one entry per output row), so every rule
    mixes them linearly; LoRA (``None``) has none."""
    return None if magnitude is None else mix_dense_linearly(weights, magnitude)


def mix_dense(weights: torch.Tensor, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense trainable tensors (e.g. a classification head) have no factor structure: linear mix."""
    return {name: mix_dense_linearly(weights, t) for name, t in dense.items()}


def mix_linearly(hood: Neighbourhoods) -> MixOutput:
    """A, B and m each averaged with the receiver's weights: the D²ORA / DLoRA / FedAvg rule."""
    weights = checked_weights(hood)
    layers = {
        name: LayerStack(
            lora_a=mix_dense_linearly(weights, stack.lora_a),
            lora_b=mix_dense_linearly(weights, stack.lora_b),
            magnitude=mix_magnitude(weights, stack.magnitude),
            scaling=stack.scaling,
        )
        for name, stack in hood.layers.items()
    }
    return MixOutput(layers=layers, dense=mix_dense(weights, hood.dense))
