"""DoRALinear: one frozen Linear (or GPT-2 Conv1D) plus a trainable DoRA / LoRA adapter."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from d2ora.dora import math as dora_math
from d2ora.dora.frozen_base import FrozenBase

# bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so they are covered (see frozen_base).
SUPPORTED_BASE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class RowNormCache:
    """One layer's last ``||W0 + s·BA||_c``, reused while A, B and W0's cached norms are unchanged.

    The norms cost an (out x in x r) product per forward, as much as the base GEMM for a batch of
    r tokens: in greedy decoding (one token per forward), in evaluation, in a checkpointed block's
    replay and across accumulated micro-batches, A and B do not change between forwards. The key is
    each tensor's storage and version counter, so an in-place copy (loading a peer's adapter) is
    seen. A fused AdamW step does *not* bump version counters, so a cache only lives inside a span
    where no optimizer steps (:func:`reusing_row_norms`, ``PeerModel.serving``) and is dropped after.
    """

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.value: torch.Tensor | None = None

    @staticmethod
    def key_of(*tensors: torch.Tensor, extra: object = None) -> tuple[object, ...]:
        return (*((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), extra)

    def get(self, key: tuple[object, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.key != key or self.value is None:
            self.value, self.key = compute(), key
        return self.value


@contextlib.contextmanager
def reusing_row_norms(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Let the DoRA layers among ``modules`` reuse their row norms until the block ends. Nothing may
    step an optimizer inside (see :class:`RowNormCache`); nested uses keep the outer cache."""
    layers = [m for m in modules if hasattr(m, "norm_cache")]
    previous = [layer.norm_cache for layer in layers]
    for layer, cache in zip(layers, previous):
        layer.norm_cache = cache if cache is not None else RowNormCache()
    try:
        yield
    finally:
        for layer, cache in zip(layers, previous):
            layer.norm_cache = cache


def base_weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as ``(out, in)``; a view (no copy) of a Conv1D's ``(in, out)`` weight,
    and a dequantized dense copy of a bitsandbytes layer's (for merging and analysis only)."""
    return FrozenBase.of(base).dense()


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a base layer, quantized or not, without dequantizing anything."""
    return FrozenBase.of(base).shape


class DoRALinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with a DoRA (or, with ``use_dora=False``, LoRA) adapter.

    Forward (paper Eq. 5, norm detached as in §4.3)::

        y = g ⊙ (W0 x + s · B A x̃) + bias,     g = m / ||W0 + s·BA||_c   (no gradient through the norm)

    where x̃ = dropout(x). ``W0 x`` is computed once and reused: one GEMM with W0 per forward.

    Dropout: d2ora drops only the low-rank path's input, as LoRA does. PEFT's DoRA instead computes
    ``W0 x + (g - 1) ⊙ W0 x̃ + g ⊙ s·B A x̃`` when dropout is active, which costs a second GEMM with
    W0 on x̃. Both are unbiased for the same expectation (inverted dropout keeps E[x̃] = x):
    ``E = g ⊙ (W0 x + s·BA x)``; d2ora's has lower variance (the frozen path is never dropped) and
    no extra GEMM. With dropout 0, or in eval mode, the two are identical.

    Rows whose norm ``||W0 + s·BA||`` is exactly 0 follow the rule in
    :func:`d2ora.dora.math.magnitude_scale` (divide by 1, so no NaN; PEFT gives inf/NaN there).

    The math lives in :mod:`d2ora.dora.math` and accepts a leading stack dimension, so a later
    peer-batched layer can hold P adapter sets over this one ``W0``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_BASE_TYPES):
            raise TypeError(f"DoRALinear wraps nn.Linear or transformers Conv1D, not {type(base_layer).__name__}")
        frozen = FrozenBase.of(base_layer)
        out_features, in_features = frozen.shape
        if not 0 < r <= min(in_features, out_features):
            raise ValueError(f"rank r={r} must be between 1 and min(in={in_features}, out={out_features})")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = dora_math.lora_scaling(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Adapters live in fp32 when the base is half precision (PEFT does the same), for stable updates.
        dtype = torch.float32 if frozen.dtype in (torch.float16, torch.bfloat16) else frozen.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=frozen.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=frozen.device))
        # Kaiming-uniform with a=sqrt(5), as nn.Linear and PEFT initialise A.
        bound = 1.0 / math.sqrt(in_features)  # = gain(a=sqrt 5) * sqrt(3 / fan_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        # ||W0||² per row, cached once: W0 is frozen. Not persistent: it is derived, never saved.
        self.register_buffer("w0_row_sq", frozen.row_sq_norms(), persistent=False)
        self.norm_cache: RowNormCache | None = None  # set only inside reusing_row_norms
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.row_norms().to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    # ----------------------------------------------------------------------------------------------
    @property
    def frozen(self) -> FrozenBase:
        """The frozen base weight (dense or bitsandbytes-quantized) behind one interface."""
        return FrozenBase.of(self.base_layer)

    @property
    def weight0(self) -> torch.Tensor:
        """Frozen W0 as ``(out, in)``: a view of a dense weight; a dequantized copy of a quantized one."""
        return self.frozen.dense()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def refresh_base_cache(self) -> None:
        """Recompute the cached ``||W0||²`` rows; call after changing the base weight in place."""
        self.w0_row_sq = self.frozen.row_sq_norms()

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """``||W0 + s·BA||_c`` by the factored formula (never forms BA); reused inside
        :func:`reusing_row_norms` while A and B are unchanged."""
        def compute() -> torch.Tensor:
            return self.frozen.row_norms(self.w0_row_sq, self.lora_A, self.lora_B, self.scaling)

        if self.norm_cache is None:
            return compute()
        return self.norm_cache.get(RowNormCache.key_of(self.lora_A, self.lora_B, self.w0_row_sq), compute)

    def magnitude_scale(self) -> torch.Tensor:
        """``g = m / ||W0 + s·BA||_c`` with the norm detached; gradients flow into ``m`` only."""
        return dora_math.magnitude_scale(self.lora_magnitude_vector, self.row_norms())

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.frozen.matmul(x)  # the one GEMM with W0 (bitsandbytes' if quantized); bias after scaling
        x_lr = self.dropout(x).to(self.lora_A.dtype)
        xa = F.linear(x_lr, self.lora_A)
        if xa.dtype == base_out.dtype:
            # s·(xA^T)B^T added to the base output by the GEMM itself (no low-rank temporary). Out of
            # place, and kept 2-D until the in-place scale below: an in-place op on a view would make
            # autograd clone the whole activation in backward.
            flat = base_out.reshape(-1, self.out_features)
            combined = torch.addmm(flat, xa.reshape(-1, self.r), self.lora_B.t(), alpha=self.scaling)
        else:
            combined = F.linear(xa, self.lora_B).mul_(self.scaling).to(base_out.dtype).add_(base_out)
        bias = self.bias
        if self.use_dora:
            y = dora_math.scale_shift_(combined, self.magnitude_scale().to(combined.dtype), bias)
        else:
            y = combined if bias is None else combined.add_(bias)
        return y.view(base_out.shape)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """Dense ``W' = g·(W0 + s·BA)`` as ``(out, in)`` (``W0 + s·BA`` for LoRA)."""
        return dora_math.merged_weight(self.weight0, self.lora_A, self.lora_B, self.scaling, self.lora_magnitude_vector)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain layer of the base's type (``nn.Linear`` or ``Conv1D``) holding W' densely, for serving."""
        merged = self.merged_weight()
        base = self.base_layer
        has_bias = base.bias is not None
        if isinstance(base, Conv1D):
            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(merged.t().contiguous(), requires_grad=False)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=merged.device, dtype=merged.dtype)
            layer.weight = nn.Parameter(merged.contiguous(), requires_grad=False)
        if has_bias:  # Conv1D always has one
            layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind}(in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g})"
