"""DoRALinear against PEFT 0.21's DoRA layer, the dense norm, and hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from d2ora import DoRALinear
from d2ora.dora import math as dora_math
from tests.conftest import relative_error


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_base(kind: str, in_f: int = 40, out_f: int = 24) -> nn.Module:
    torch.manual_seed(1)
    if kind == "conv1d":
        layer = Conv1D(out_f, in_f)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.1)
        return layer
    layer = nn.Linear(in_f, out_f)
    return layer


def peft_and_d2ora(kind: str, use_rslora: bool, r: int = 6, alpha: float = 12.0, base: nn.Module | None = None):
    """The same base layer (``base``, a ``OneLayer``; default a fresh one of ``kind``) wrapped by
    PEFT's DoRA and by d2ora, with equal, nonzero adapter values."""
    base = OneLayer(make_base(kind)) if base is None else base
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True, use_rslora=use_rslora,
                   fan_in_fan_out=kind == "conv1d"),
    )
    peft_layer = peft_model.base_model.model.proj
    ours = DoRALinear(copy.deepcopy(base.proj), r=r, alpha=alpha, use_rslora=use_rslora)
    torch.manual_seed(2)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.2)
        mag = peft_layer.lora_magnitude_vector["default"].weight
        mag.mul_(1 + 0.3 * torch.rand_like(mag))  # m away from the norms, so g != 1
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(mag)
    return peft_model, peft_layer, ours


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_gradients_match_peft(kind: str, use_rslora: bool) -> None:
    peft_model, peft_layer, ours = peft_and_d2ora(kind, use_rslora)
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(3))
    target = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(4))

    expected = peft_model(x)
    actual = ours(x)
    assert relative_error(actual, expected) < 1e-6
    F.mse_loss(expected, target).backward()
    F.mse_loss(actual, target).backward()

    pairs = {
        "A": (ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad),
        "B": (ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad),
        "m": (ours.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad),
    }
    for name, (mine, theirs) in pairs.items():
        assert theirs is not None and theirs.abs().max() > 0, name
        assert relative_error(mine, theirs) < 1e-5, name
    assert all(p.grad is None for p in ours.base_layer.parameters())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factored_norm_equals_dense_norm(use_rslora: bool) -> None:
    torch.manual_seed(5)
    out_f, in_f, r = 96, 160, 8
    w0 = torch.randn(out_f, in_f)
    a = torch.randn(r, in_f) * 0.1
    b = torch.randn(out_f, r) * 0.5
    s = dora_math.lora_scaling(16, r, use_rslora)
    factored = dora_math.factored_row_norms(w0, dora_math.row_sq_norms(w0), a, b, s)
    dense = torch.linalg.norm(w0 + s * (b @ a), dim=1)
    assert ((factored - dense).abs() / dense).max() < 1e-6


def test_factored_norm_accepts_a_stack_of_adapters() -> None:
    """P adapter sets over one W0 in one call (the shape a peer-batched layer will use)."""
    torch.manual_seed(6)
    w0 = torch.randn(20, 30)
    a = torch.randn(4, 3, 30)
    b = torch.randn(4, 20, 3)
    stacked = dora_math.factored_row_norms(w0, dora_math.row_sq_norms(w0), a, b, 0.5)
    for p in range(4):
        assert torch.allclose(stacked[p], torch.linalg.norm(w0 + 0.5 * b[p] @ a[p], dim=1), rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_starts_exactly_at_the_base_layer(kind: str) -> None:
    base = make_base(kind)
    x = torch.randn(7, 40)
    layer = DoRALinear(copy.deepcopy(base), r=4, alpha=8)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.allclose(layer.lora_magnitude_vector, torch.linalg.norm(layer.weight0, dim=1))
    assert torch.allclose(layer(x), base(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_agrees_with_unmerged(kind: str, use_dora: bool) -> None:
    layer = DoRALinear(make_base(kind), r=4, alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        if use_dora:
            layer.lora_magnitude_vector.mul_(1.2)
    merged = layer.merge()
    assert type(merged) is type(layer.base_layer)
    x = torch.randn(9, 40)
    assert (merged(x) - layer(x)).abs().max() < 1e-5


def test_dropout_formula_drops_only_the_low_rank_path() -> None:
    """The docstring's formula, checked by hand with the same dropout mask."""
    layer = DoRALinear(make_base("linear"), r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(0.9)
    x = torch.randn(6, 40)
    torch.manual_seed(11)
    actual = layer(x)
    torch.manual_seed(11)
    x_dropped = F.dropout(x, 0.5, training=True)
    w0 = layer.weight0
    norms = torch.linalg.norm(w0 + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    g = layer.lora_magnitude_vector / norms
    expected = g * (x @ w0.T + layer.scaling * x_dropped @ layer.lora_A.T @ layer.lora_B.T) + layer.bias
    assert torch.allclose(actual, expected, atol=1e-5)
    layer.eval()  # no dropout in eval: equals the plain formula on x
    expected_eval = g * (x @ w0.T + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T) + layer.bias
    assert torch.allclose(layer(x), expected_eval, atol=1e-5)


def test_zero_norm_rows_stay_finite_and_zero() -> None:
    base = nn.Linear(10, 6)
    with torch.no_grad():
        base.weight[2].zero_()
        base.bias.zero_()
    layer = DoRALinear(base, r=2, alpha=4)
    assert layer.lora_magnitude_vector[2] == 0
    x = torch.randn(4, 10)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.all(y[:, 2] == 0)
    assert torch.isfinite(layer.lora_magnitude_vector.grad).all()
    merged = layer.merged_weight()
    assert torch.isfinite(merged).all() and torch.all(merged[2] == 0)


def test_lora_mode_is_plain_lora() -> None:
    base = make_base("linear")
    layer = DoRALinear(copy.deepcopy(base), r=4, alpha=8, use_dora=False)
    assert layer.lora_magnitude_vector is None
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 40)
    expected = base(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_rejects_bad_rank_and_type() -> None:
    with pytest.raises(ValueError, match="rank r=0"):
        DoRALinear(nn.Linear(8, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="rank r=5"):
        DoRALinear(nn.Linear(8, 4), r=5, alpha=1)
    with pytest.raises(TypeError, match="Embedding"):
        DoRALinear(nn.Embedding(8, 4), r=2, alpha=1)


@pytest.mark.parametrize("with_bias", [True, False])
def test_in_place_scale_shift_gradients_by_finite_differences(with_bias: bool) -> None:
    """The hand-written backward (z recovered from y) against float64 finite differences."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = (torch.rand(5, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(5, dtype=torch.float64, generator=gen) if with_bias else None
    # clone(): the op overwrites its input, and gradcheck must reuse z
    assert torch.autograd.gradcheck(lambda z_, g_: dora_math.scale_shift_(z_.clone(), g_, bias), (z, g))
