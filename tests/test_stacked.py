"""StackedDoRALinear (P peers over one base) against P separate DoRALinear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from d2ora import DoRALinear
from d2ora.dora.stacked import StackedDoRALinear
from tests.conftest import relative_error


def stacked_layer(kind: str, peers: int, use_dora: bool) -> StackedDoRALinear:
    torch.manual_seed(0)
    base = Conv1D(12, 20) if kind == "conv1d" else nn.Linear(20, 12)
    stacked = StackedDoRALinear(DoRALinear(base, r=3, alpha=6, use_dora=use_dora), peers)
    with torch.no_grad():  # make the peers differ
        stacked.lora_A.add_(0.1 * torch.randn_like(stacked.lora_A))
        stacked.lora_B.normal_(0, 0.2)
        if use_dora:
            stacked.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(stacked.lora_magnitude_vector))
    return stacked


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_stacked_equals_one_layer_per_peer(kind: str, use_dora: bool) -> None:
    peers, per_peer = 4, 3
    stacked = stacked_layer(kind, peers, use_dora)
    singles = [stacked.peer_layer(k) for k in range(peers)]
    x = torch.randn(peers * per_peer, 5, 20)
    target = torch.randn(peers * per_peer, 5, 12)

    y = stacked(x)
    ((y - target) ** 2).sum().backward()
    for k, single in enumerate(singles):
        rows = slice(k * per_peer, (k + 1) * per_peer)
        y_k = single(x[rows])
        assert relative_error(y[rows], y_k) < 1e-6
        ((y_k - target[rows]) ** 2).sum().backward()
        assert relative_error(stacked.lora_A.grad[k], single.lora_A.grad) < 1e-5
        assert relative_error(stacked.lora_B.grad[k], single.lora_B.grad) < 1e-5
        if use_dora:
            assert relative_error(stacked.lora_magnitude_vector.grad[k], single.lora_magnitude_vector.grad) < 1e-5


def test_active_group_serves_a_slice_of_peers() -> None:
    stacked = stacked_layer("linear", 6, True)
    stacked.active = slice(2, 4)
    x = torch.randn(4, 20)
    y = stacked(x)
    assert torch.allclose(y[:2], stacked.peer_layer(2)(x[:2]), atol=1e-6)
    assert torch.allclose(y[2:], stacked.peer_layer(3)(x[2:]), atol=1e-6)
    with pytest.raises(ValueError, match="does not split evenly over 2 active peers"):
        stacked(torch.randn(3, 20))


def test_stacked_head_equals_one_linear_per_peer() -> None:
    from d2ora.dora.stacked import StackedLinear

    torch.manual_seed(1)
    head = StackedLinear(nn.Linear(8, 5), peers=3)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    x = torch.randn(6, 8)
    y = head(x)
    for k in range(3):
        assert torch.allclose(y[2 * k: 2 * k + 2], head.peer_module(k)(x[2 * k: 2 * k + 2]), atol=1e-6)
    with pytest.raises(TypeError, match="Conv1D"):
        StackedLinear(Conv1D(4, 4), peers=2)
