"""P adapter sets over one frozen layer, run in one forward: the peer-batched form of DoRALinear.

The input's first dimension is peer-major: rows ``[k·b, (k+1)·b)`` belong to peer ``k`` of the
active group. The frozen GEMM with W0 runs once over every peer's tokens; the low-rank path and
the magnitude run per peer with batched matmuls. Parameters are stacked (``(P, r, in)``,
``(P, out, r)``, ``(P, out)``), so one fused optimizer step updates every peer; AdamW is
element-wise, so peers stay independent.
"""

from __future__ import annotations

import torch
from torch import nn

from d2ora.dora import math as dora_math
from d2ora.dora.frozen_base import FrozenBase
from d2ora.dora.layer import DoRALinear, RowNormCache


class StackedDoRALinear(nn.Module):
    """``DoRALinear`` with a leading peer dimension on m, A and B, sharing the base layer.

    ``active`` selects the peers a forward serves (a contiguous range, for peer groups that keep
    activations bounded); by default all. Peer k's math is exactly ``DoRALinear``'s, so
    ``stacked.peer_layer(k)`` reproduces it for checking.
    """

    def __init__(self, template: DoRALinear, peers: int) -> None:
        super().__init__()
        if peers < 1:
            raise ValueError(f"peers must be at least 1, got {peers}")
        self.base_layer = template.base_layer
        self.in_features = template.in_features
        self.out_features = template.out_features
        self.r = template.r
        self.alpha = template.alpha
        self.use_rslora = template.use_rslora
        self.use_dora = template.use_dora
        self.scaling = template.scaling
        self.dropout = template.dropout
        self.peers = peers
        self.active = slice(0, peers)

        def stack(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().unsqueeze(0).repeat(peers, *([1] * t.dim())).contiguous())

        # Every peer starts from the same m, B, A (D²ORA's step 1).
        self.lora_A = stack(template.lora_A)
        self.lora_B = stack(template.lora_B)
        if self.use_dora:
            self.lora_magnitude_vector = stack(template.lora_magnitude_vector)
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("w0_row_sq", template.w0_row_sq.clone(), persistent=False)
        self.norm_cache: RowNormCache | None = None  # set only inside reusing_row_norms (PeerModel.serving)

    @property
    def frozen(self) -> FrozenBase:
        return FrozenBase.of(self.base_layer)

    @property
    def weight0(self) -> torch.Tensor:
        """Frozen W0 as ``(out, in)`` (a dequantized copy when the base is quantized)."""
        return self.frozen.dense()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def active_count(self) -> int:
        return len(range(*self.active.indices(self.peers)))

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """``(P_active, out)`` detached ``||W0 + s·B_k A_k||_c`` by the factored formula; reused
        inside :func:`~d2ora.dora.layer.reusing_row_norms` while A, B and the active peers are unchanged."""
        def compute() -> torch.Tensor:
            a, b = self.lora_A[self.active], self.lora_B[self.active]
            return self.frozen.row_norms(self.w0_row_sq, a, b, self.scaling)

        if self.norm_cache is None:
            return compute()
        active = self.active.indices(self.peers)
        return self.norm_cache.get(RowNormCache.key_of(self.lora_A, self.lora_B, self.w0_row_sq, extra=active), compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_count
        if x.shape[0] % p:
            raise ValueError(f"batch of {x.shape[0]} rows does not split evenly over {p} active peers")
        base_out = self.frozen.matmul(x).reshape(p, -1, self.out_features)  # one GEMM over every peer's tokens
        lead = x.shape[:-1]
        x_lr = self.dropout(x).to(self.lora_A.dtype).reshape(p, -1, self.in_features)
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        xa = torch.bmm(x_lr, a.transpose(1, 2))  # (P, n, r)
        if xa.dtype == base_out.dtype:
            # s·(xA^T)B^T added to the base output by the GEMM itself (no low-rank temporary). Out of
            # place on purpose: base_out is a view, and an in-place op on a view makes autograd clone
            # the whole activation in backward (CopySlices), which costs more than it saves.
            combined = torch.baddbmm(base_out, xa, b.transpose(1, 2), alpha=self.scaling)
        else:
            low_rank = torch.bmm(xa, b.transpose(1, 2)).mul_(self.scaling)
            combined = low_rank.to(base_out.dtype).add_(base_out)
        bias = self.bias
        if self.use_dora:
            g = dora_math.magnitude_scale(self.lora_magnitude_vector[self.active], self.row_norms())
            y = dora_math.scale_shift_(combined, g.unsqueeze(1).to(combined.dtype), bias)
        else:
            y = combined if bias is None else combined.add_(bias)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def peer_layer(self, k: int) -> DoRALinear:
        """A standalone ``DoRALinear`` holding peer ``k``'s adapter over the shared base layer."""
        p_drop = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        layer = DoRALinear(self.base_layer, self.r, self.alpha, p_drop, self.use_rslora, self.use_dora)
        layer.lora_A.copy_(self.lora_A[k])
        layer.lora_B.copy_(self.lora_B[k])
        if self.use_dora:
            layer.lora_magnitude_vector.copy_(self.lora_magnitude_vector[k])
        return layer


class StackedLinear(nn.Module):
    """P trainable copies of a dense ``nn.Linear`` (a ``modules_to_save`` head), one per peer."""

    def __init__(self, template: nn.Linear, peers: int) -> None:
        super().__init__()
        if not isinstance(template, nn.Linear):
            raise TypeError(
                f"peer-batched training stacks nn.Linear saved modules only, not {type(template).__name__}"
            )
        self.in_features = template.in_features
        self.out_features = template.out_features
        self.peers = peers
        self.active = slice(0, peers)
        w = template.weight.detach()
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(peers, 1, 1).contiguous())
        if template.bias is not None:
            self.bias = nn.Parameter(template.bias.detach().unsqueeze(0).repeat(peers, 1).contiguous())
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[self.active]
        p = w.shape[0]
        if x.shape[0] % p:
            raise ValueError(f"batch of {x.shape[0]} rows does not split evenly over {p} active peers")
        lead = x.shape[:-1]
        flat = x.reshape(p, -1, self.in_features)
        if self.bias is None:
            y = torch.bmm(flat, w.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias[self.active].unsqueeze(1), flat, w.transpose(1, 2))
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def peer_module(self, k: int) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        layer.weight.copy_(self.weight[k])
        if self.bias is not None:
            layer.bias.copy_(self.bias[k])
        return layer
