"""The frozen base weight ``W0`` of an adapted layer, dense or quantized by bitsandbytes, behind one interface.

DoRA needs four things from ``W0`` (PEFT's ``(out, in)`` convention):

- ``matmul(x)``: ``x W0ᵀ`` without the bias (the bias is added after DoRA's scale), through the
  layer's own kernel: ``F.linear`` for a dense layer, bitsandbytes' ``matmul_4bit`` / int8 ``matmul``
  for a quantized one (so the base GEMM is bitsandbytes', never a dequantized copy);
- ``row_sq_norms()``: ``||W0_i||²`` per row, cached once by the layer (W0 is frozen);
- ``times_At(A)``: ``W0 Aᵀ`` ``(.., out, r)`` for the factored row norms. A quantized ``W0`` is
  dequantized a block of rows at a time, so no full-size dense copy of W0 is ever held;
- ``dense()``: the whole ``W0`` as a dense tensor, for merging and analysis only.

Why a small class here and not PEFT's helpers: PEFT dequantizes the whole weight on every forward
(``dequantize_module_weight``) to compute DoRA's norm, which holds a dense ``out x in`` copy per
layer at a time; the chunked ``times_At`` needs block-aligned slices of the packed 4-bit data,
which no library exposes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from d2ora.dora import math as dora_math

# Elements of W0 dequantized at once by times_At / row_sq_norms (64 MiB of fp32): small next to any
# model that needs quantizing, big enough that a GPU step is not bound by per-chunk kernel launches.
# Measured on an H200 (Llama-3.1-8B shape, nf4, 1 x 1024 tokens, checkpointing; llm_step.py): 927
# tokens/s with 1 << 22 (14 chunks per MLP projection), 1154 with 1 << 24, 1150 with one piece a layer.
CHUNK_ELEMENTS = 1 << 24
#: Attribute the loader sets on a quantized layer: the dtype its dense W0 is served in (base_dtype).
BASE_DTYPE_ATTR = "d2ora_base_dtype"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm arithmetic runs in at least fp32 (the squared-norm expansion cancels badly in half)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    # Same rule as d2ora.dora.math._no_autocast: W0·Aᵀ must not be run in bf16 by an outer autocast.
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _bnb_kind(layer: nn.Module) -> str | None:
    """'nf4'/'fp4' for a bitsandbytes ``Linear4bit``, 'int8' for ``Linear8bitLt``, else None.

    By class name first, so that a dense model never imports bitsandbytes."""
    names = {cls.__name__ for cls in type(layer).__mro__}
    if "Linear4bit" in names:
        state = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
        return getattr(state, "quant_type", None) or "nf4"
    if "Linear8bitLt" in names:
        return "int8"
    return None


def is_quantized_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 4-bit or 8-bit Linear."""
    return _bnb_kind(layer) is not None


class FrozenBase:
    """A dense ``nn.Linear`` or GPT-2 ``Conv1D``. Reads the layer's weight on every call (never caches
    it), so ``.to(device)`` or a swapped weight is always seen."""

    quantized = False

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @staticmethod
    def of(layer: nn.Module) -> FrozenBase:
        """The right kind of frozen base for ``layer``."""
        kind = _bnb_kind(layer)
        if kind == "int8":
            return Int8Base(layer)
        if kind is not None:
            return FourBitBase(layer)
        if isinstance(layer, (nn.Linear, Conv1D)):
            return FrozenBase(layer)
        raise TypeError(f"d2ora adapts nn.Linear, transformers Conv1D or bitsandbytes Linear4bit/Linear8bitLt, not {type(layer).__name__}")

    # -------------------------------------------------------------------------------- dense layers
    def weight(self) -> torch.Tensor:
        """Dense W0 as ``(out, in)``: a view (no copy) of a Conv1D's ``(in, out)`` weight."""
        return self.layer.weight.t() if isinstance(self.layer, Conv1D) else self.layer.weight

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.weight().shape
        return int(out_f), int(in_f)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype W0's products come out in (the weight's own; a quantized layer's compute dtype)."""
        return self.weight().dtype

    @property
    def device(self) -> torch.device:
        return self.weight().device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    def row_sq_norms(self) -> torch.Tensor:
        return dora_math.row_sq_norms(self.weight().detach())

    def row_norms(self, w0_row_sq: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        """``||W0 + s·BA||_c`` by the factored formula, ``w0_row_sq`` being the cached ``row_sq_norms()``."""
        return dora_math.factored_row_norms(self.weight(), w0_row_sq, lora_a, lora_b, scaling)

    def times_At(self, lora_a: torch.Tensor) -> torch.Tensor:
        """``W0 Aᵀ`` as ``(.., out, r)`` in at least fp32; ``lora_a`` is ``(.., r, in)``."""
        w0 = self.weight()
        compute = _compute_dtype(w0.dtype)
        with _no_autocast(w0.device):
            a = lora_a.to(compute)
            return torch.matmul(a, w0.to(compute).transpose(-1, -2)).transpose(-1, -2)

    def dense(self) -> torch.Tensor:
        return self.weight()


class _QuantizedBase(FrozenBase):
    """Shared by the bitsandbytes kinds: everything but the GEMM goes through ``pieces()``."""

    quantized = True

    def pieces(self) -> Iterator[torch.Tensor]:  # pragma: no cover - overridden
        """W0 dequantized a block of rows at a time, top to bottom (at most CHUNK_ELEMENTS values each)."""
        raise NotImplementedError

    def row_step(self) -> int:
        """Chunks start on multiples of this many rows (a 4-bit block must not straddle two chunks)."""
        return 1

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.layer.out_features), int(self.layer.in_features)

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    def _chunks(self) -> list[tuple[int, int]]:
        out_f, in_f = self.shape
        step = self.row_step()
        size = max(step, (CHUNK_ELEMENTS // max(in_f, 1)) // step * step)
        return [(i, min(i + size, out_f)) for i in range(0, out_f, size)]

    @torch.no_grad()
    def row_sq_norms(self) -> torch.Tensor:
        return torch.cat([dora_math.row_sq_norms(w) for w in self.pieces()])

    def row_norms(self, w0_row_sq: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        return dora_math.row_norms_from_w0_at(self.times_At(lora_a), w0_row_sq, lora_a, lora_b, scaling)

    def times_At(self, lora_a: torch.Tensor) -> torch.Tensor:
        compute = _compute_dtype(self.dtype)
        with _no_autocast(self.device):
            a = lora_a.to(compute)
            parts = [torch.matmul(a, w.to(compute).transpose(-1, -2)) for w in self.pieces()]
            return torch.cat(parts, dim=-1).transpose(-1, -2)

    @torch.no_grad()
    def dense(self) -> torch.Tensor:
        return torch.cat(list(self.pieces())).to(self.dtype)


class FourBitBase(_QuantizedBase):
    """A bitsandbytes ``Linear4bit`` (NF4 or FP4): packed two values a byte, row-major, one absmax per
    ``blocksize`` consecutive values (itself 8-bit quantized when ``compress_statistics``)."""

    def _state(self) -> Any:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self.layer)
        state = self.layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a Linear4bit for AVX512-BF16 CPUs when its own forward runs in
            # inference; d2ora never calls that forward, and the repacked layout has no row slices.
            raise RuntimeError("a bitsandbytes Linear4bit was repacked for CPU inference by its own forward; "
                               "load the model again and do not run the base layer outside its d2ora adapter")
        return state

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.compute_dtype or self._state().dtype

    def row_step(self) -> int:
        out_f, in_f = self.shape
        if in_f % int(self._state().blocksize):
            # bitsandbytes' CPU kernel lays blocks out differently when a row is not a whole number
            # of blocks (a slice then decodes wrongly, measured with bnb 0.50): dequantize in one piece.
            return out_f
        return 1

    def _absmax(self, state: Any) -> torch.Tensor:
        # dequantize_4bit's own nested-statistics step, done once for the whole layer (out·in/64 floats).
        from bitsandbytes import functional as bnb_f

        if not state.nested:
            return state.absmax.float()
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        return absmax.float()

    def pieces(self) -> Iterator[torch.Tensor]:
        from bitsandbytes import functional as bnb_f

        state = self._state()
        chunks = self._chunks()
        if len(chunks) == 1:  # one piece: bitsandbytes' own full dequantization
            yield bnb_f.dequantize_4bit(self.layer.weight.data, state)
            return
        in_f = self.shape[1]
        block = int(state.blocksize)
        packed = self.layer.weight.data.reshape(-1)
        absmax = self._absmax(state)
        for start, stop in chunks:  # every chunk starts on a block (row_step), so it decodes alone
            piece = bnb_f.QuantState(
                absmax=absmax[start * in_f // block: -(-stop * in_f // block)],
                shape=torch.Size((stop - start, in_f)),
                code=state.code,
                blocksize=block,
                quant_type=state.quant_type,
                dtype=state.dtype,
            )
            yield bnb_f.dequantize_4bit(packed[start * in_f // 2: stop * in_f // 2].reshape(-1, 1), piece)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Linear4bit.forward without the bias and without its CPU repacking step (see _state).
        import bitsandbytes as bnb

        state = self._state()
        compute = self.layer.compute_dtype or x.dtype
        return bnb.matmul_4bit(x.to(compute), self.layer.weight, quant_state=state).to(x.dtype)


class Int8Base(_QuantizedBase):
    """A bitsandbytes ``Linear8bitLt`` (LLM.int8()): int8 rows with one absmax scale (``SCB``) per row."""

    def _scb(self) -> torch.Tensor:
        layer = self.layer
        if getattr(layer.state, "has_fp16_weights", False):
            raise RuntimeError("d2ora adapts frozen int8 layers only (Linear8bitLt with has_fp16_weights=False)")
        scb = layer.state.SCB if layer.state.SCB is not None else getattr(layer.weight, "SCB", None)
        if scb is None:
            raise RuntimeError("a Linear8bitLt whose weight is not quantized yet (call .to(device) first)")
        return scb

    @property
    def dtype(self) -> torch.dtype:
        # int8 keeps no compute dtype: the loader records the model's (d2ora.models.quantize_linears).
        recorded = getattr(self.layer, BASE_DTYPE_ATTR, None)
        if recorded is not None:
            return recorded
        bias = self.layer.bias
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32

    def pieces(self) -> Iterator[torch.Tensor]:
        from bitsandbytes import functional as bnb_f

        w = self.layer.weight.data
        if w.dtype != torch.int8:
            raise RuntimeError(f"a Linear8bitLt with {w.dtype} weights is not quantized")
        scb = self._scb().to(w.device)
        for start, stop in self._chunks():
            yield bnb_f.int8_vectorwise_dequant(w[start:stop], scb[start:stop])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Linear8bitLt.forward without the bias: bitsandbytes' own int8 matmul (LLM.int8()).
        import bitsandbytes as bnb

        layer = self.layer
        self._scb()
        layer.state.is_training = layer.training
        if layer.weight.CB is not None:
            layer.init_8bit_state()
        out = bnb.matmul(x, layer.weight, bias=None, state=layer.state)
        if not layer.state.has_fp16_weights and layer.state.CB is not None:
            layer.weight.data = layer.state.CB
        return out


@torch.no_grad()
def dense_linear(layer: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding a bitsandbytes layer's dequantized weight (and bias) in its base
    dtype: what a merged, unquantized model is saved with."""
    frozen = FrozenBase.of(layer)
    weight = frozen.dense()
    out_f, in_f = frozen.shape
    bias = layer.bias
    dense = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return dense
