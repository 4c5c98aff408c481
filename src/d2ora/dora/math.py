"""DoRA's math alone: pure tensor functions, no modules, no I/O.

Conventions (PEFT's): a frozen weight ``W0`` is ``(out, in)``; ``A`` is ``(r, in)``; ``B`` is
``(out, r)``; the magnitude ``m`` is ``(out,)``, one L2 norm per output row. Every function here
also accepts a leading stack dimension on ``A``, ``B`` and ``m`` (``(P, r, in)``, ``(P, out, r)``,
``(P, out)``) so that P adapter sets over one shared ``W0`` can be evaluated in one call.
"""

from __future__ import annotations

import contextlib
import math

import torch


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``s = alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA, arXiv 2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row of ``weight`` ``(out, in)``, accumulated in at least fp32."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    return (w * w).sum(dim=-1)


def factored_row_norms(
    w0: torch.Tensor,
    w0_row_sq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Row norms ``||W0 + s·B A||_c`` without forming the ``out x in`` matrix ``B A``.

    Expanding the square of row i:
        ||W0_i + s B_i A||² = ||W0_i||² + 2s · B_i · (W0 Aᵀ)_i + s² · B_i (A Aᵀ) B_iᵀ
    ``||W0_i||²`` is cached by the caller (W0 is frozen), ``W0 Aᵀ`` is ``(out, r)`` and ``A Aᵀ`` is
    ``(r, r)``, so memory stays O(out·r) instead of O(out·in). Rounding can push a true zero a
    hair below 0, so the square is clamped at 0 before the root. Computed in at least fp32.
    """
    compute = torch.float32 if w0.dtype in (torch.float16, torch.bfloat16) else w0.dtype
    with _no_autocast(w0):
        w0_at = torch.matmul(lora_a.to(compute), w0.to(compute).transpose(-1, -2)).transpose(-1, -2)  # (.., out, r)
        return row_norms_from_w0_at(w0_at, w0_row_sq, lora_a, lora_b, scaling)


def row_norms_from_w0_at(
    w0_at: torch.Tensor,
    w0_row_sq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`factored_row_norms` given ``W0 Aᵀ`` ``(.., out, r)`` already (in the compute dtype), for a
    base that computes it its own way (a quantized W0, dequantized a block of rows at a time)."""
    compute = w0_at.dtype
    with _no_autocast(w0_at):
        a = lora_a.to(compute)
        b = lora_b.to(compute)
        a_at = torch.matmul(a, a.transpose(-1, -2))  # (.., r, r)
        cross = (b * w0_at).sum(dim=-1)
        quad = (torch.matmul(b, a_at) * b).sum(dim=-1)
        sq = w0_row_sq.to(compute) + (2.0 * scaling) * cross + (scaling * scaling) * quad
        return sq.clamp_min(0.0).sqrt()


def _no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``t``'s device type if it is on: under a bf16 autocast ``matmul`` would run
    ``W0·Aᵀ`` and ``A·Aᵀ`` in bf16, and the squared-norm expansion cancels badly at bf16's 8 bits
    (the row norms must be fp32). A null context otherwise, so fp32 runs are untouched."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def dense_row_norms(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference: ``||W0 + s·B A||_c`` by forming the dense matrix (tests and analysis only)."""
    return torch.linalg.vector_norm(w0 + scaling * (lora_b @ lora_a), dim=-1)


def magnitude_scale(magnitude: torch.Tensor, row_norms: torch.Tensor) -> torch.Tensor:
    """``g = m / ||W0 + s·BA||_c`` with the zero-row rule.

    Zero-norm rule: a row whose norm is exactly 0 (a zero row of W0 with a zero row of B A) has no
    direction, and PEFT divides by zero there (inf/NaN). d2ora divides such rows by 1 instead, so
    ``g = m`` there. A row that starts at zero then starts with ``m = 0`` and produces 0, exactly as
    W0 does, and no NaN can enter training or merging.
    """
    safe = torch.where(row_norms == 0, torch.ones_like(row_norms), row_norms)
    return magnitude / safe.to(magnitude.dtype)


def merged_weight(
    w0: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None,
) -> torch.Tensor:
    """Dense ``W' = g·(W0 + s·BA)`` (DoRA) or ``W0 + s·BA`` (LoRA, ``magnitude=None``), shape (out, in)."""
    compute = torch.float32 if w0.dtype in (torch.float16, torch.bfloat16) else w0.dtype
    with _no_autocast(w0):  # the merge is computed in fp32 even if called under autocast
        w = w0.to(compute) + scaling * (lora_b.to(compute) @ lora_a.to(compute))
        if magnitude is not None:
            norms = torch.linalg.vector_norm(w, dim=-1)
            w = magnitude_scale(magnitude.to(compute), norms).unsqueeze(-1) * w
        return w.to(w0.dtype)


class _ScaleShiftInPlace(torch.autograd.Function):
    """``y = g ⊙ z + bias`` written over ``z``, saving only ``y`` for backward.

    Why by hand: autograd's ``g * z`` keeps ``z`` (tokens x out) alive for the gradient of ``g``,
    one extra activation per adapted layer that LoRA does not have. Here ``z`` is overwritten by
    ``y``, and the backward recovers ``z = (y - bias) / g``. ``y`` is the layer's output, which the
    next op often keeps anyway (GELU, attention), so DoRA's activation memory stays close to LoRA's.
    Rows with ``g == 0`` (``m`` exactly 0) cannot be recovered and get a zero gradient for ``g``;
    such a row's output is constant, so nothing can train it anyway.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        y = z.mul_(g) if bias is None else torch.addcmul(bias, z, g, out=z)
        ctx.mark_dirty(z)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(y, g, bias if bias is not None else g.new_empty(0))
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        y, g, bias = ctx.saved_tensors
        grad_z = grad_y * g if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[1]:
            acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
            # Σ grad_y·z over the dims g was broadcast along = (Σ grad_y·y − bias·Σ grad_y) / g,
            # without materialising z. sum_to_size keeps a stacked g's peer dimension apart.
            total = (grad_y * y).to(acc).sum_to_size(g.shape)
            if ctx.has_bias:
                total = total - bias.to(acc) * grad_y.to(acc).sum_to_size(g.shape)
            safe_g = torch.where(g == 0, torch.ones_like(g), g).to(acc)
            grad_g = torch.where(g == 0, torch.zeros_like(total), total / safe_g).to(g.dtype)
        return grad_z, grad_g, None


def scale_shift_(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place ``z ← g ⊙ z + bias`` with gradients for ``z`` and ``g`` (``bias`` is frozen)."""
    return _ScaleShiftInPlace.apply(z, g, bias)
