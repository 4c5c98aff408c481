"""The weight decomposition of the DoRA paper (arXiv 2402.09353, §3): ΔM and ΔD of one layer.

Rows are output units (PEFT's convention, ``m = ||W||_c`` one norm per output row of the
``(out, in)`` weight):

    m_0  = ||W0||_c
    V    = W0 + s·B A            (DoRA's direction; LoRA's and full fine-tuning's weight W_FT)
    m_FT = learned magnitude     (DoRA)   or   ||W_FT||_c   (LoRA, FT)
    ΔM   = mean_i |m_FT,i − m_0,i|
    ΔD   = mean_i (1 − cos(V_i, W0_i))

Pure tensor functions, computed in float64: where the tensors come from is
:mod:`d2ora.dora.analysis`'s business.
"""

from __future__ import annotations

import torch

from d2ora.dora import math as dora_math


class AnalysisError(ValueError):
    """Bad input to the analysis (missing folder, pickle file, mismatched modules/shapes, NaN ...)."""


def decomposition_deltas(
    w0: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor | None = None
) -> tuple[float, float]:
    """``(ΔM, ΔD)`` of one layer, in float64; rows are output units.

    ``w0`` and ``direction`` are ``(out, in)``. ``magnitude`` is DoRA's learned ``m`` ``(out,)``;
    ``None`` means the magnitude is the row norm of ``direction`` itself (LoRA / full fine-tuning,
    where the direction *is* the fine-tuned weight).

    Zero rows: a row has no direction when its norm is 0. If both ``W0_i`` and ``V_i`` are zero the
    direction counts as unchanged (cos = 1); if exactly one is zero it counts as lost (cos = 0).
    """
    if w0.dim() != 2 or direction.shape != w0.shape:
        raise AnalysisError(f"weights must both be (out, in) of one shape, got {list(w0.shape)} and {list(direction.shape)}")
    w0 = w0.detach().to(torch.float64)
    v = direction.detach().to(torch.float64)
    m0 = torch.linalg.vector_norm(w0, dim=-1)
    v_norm = torch.linalg.vector_norm(v, dim=-1)
    if magnitude is None:
        m_ft = v_norm
    else:
        if tuple(magnitude.shape) != (w0.shape[0],):
            raise AnalysisError(f"magnitude has shape {list(magnitude.shape)}, expected [{w0.shape[0]}]")
        m_ft = magnitude.detach().to(torch.float64)
    delta_m = (m_ft - m0).abs().mean()
    denom = m0 * v_norm
    both_zero = (m0 == 0) & (v_norm == 0)
    cos = torch.where(
        denom > 0,
        (v * w0).sum(dim=-1) / torch.where(denom > 0, denom, torch.ones_like(denom)),
        torch.where(both_zero, torch.ones_like(denom), torch.zeros_like(denom)),
    ).clamp(-1.0, 1.0)
    delta_d = (1.0 - cos).mean()
    return float(delta_m), float(delta_d)


def adapter_deltas(
    w0: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> tuple[float, float]:
    """``(ΔM, ΔD)`` of one LoRA (``magnitude=None``) or DoRA layer: ``V = W0 + s·B A`` in float64."""
    f64 = torch.float64
    direction = dora_math.merged_weight(w0.to(f64), lora_a.to(f64), lora_b.to(f64), scaling, None)
    return decomposition_deltas(w0, direction, magnitude)
