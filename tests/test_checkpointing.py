"""Activation checkpointing of the transformer blocks (``model.gradient_checkpointing``) with the
peer-batched ``StackedDoRALinear``: the same gradients as without, and the blocks really recompute.

The reference is the same model's autograd without checkpointing. The base runs in eval mode (as
in ``LocalTrainer``), the case where Hugging Face's own checkpointing would silently do nothing.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from d2ora import DoRAConfig, attach
from d2ora.activation_checkpointing import (
    disable_checkpointing,
    enable_checkpointing,
    transformer_blocks,
)
from d2ora.data.tasks import CausalLMTask
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.peers import PeerModel
from tests.conftest import load_causal, relative_error

PEERS = 2
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
TASK = CausalLMTask()

pytestmark = pytest.mark.usefixtures("one_thread")


def stacked_llama(path: str, dropout: float = 0.0) -> PeerModel:
    model = load_causal(path)
    attach(model, DoRAConfig(r=2, alpha=4, dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                             modules_to_save=[], init_seed=0))
    peers = PeerModel(model, PEERS)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in peers.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
    return peers


def features(per_peer: int = 2) -> list[list[dict[str, Any]]]:
    g = torch.Generator().manual_seed(11)
    lengths = [[5, 9], [7, 3]]
    return [[{"input_ids": torch.randint(1, 128, (n,), generator=g).tolist(), "attention_mask": [1] * n}
             for n in lengths[k][:per_peer]] for k in range(PEERS)]


def train_mode(peers: PeerModel) -> None:
    peers.model.eval()  # the frozen base in eval mode, adapters in train mode: LocalTrainer's rule
    for layer in peers.layers.values():
        layer.train()


def gradients(peers: PeerModel, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    train_mode(peers)
    for _, _, _, p in peers.named_stacked():
        p.grad = None
    batch = TASK.collator(TOKENIZER)([row for rows in features() for row in rows])
    torch.manual_seed(seed)  # the adapter dropout's masks
    losses = TASK.peer_losses(peers.model, batch, PEERS)
    losses.sum().backward()
    return losses.detach(), {f"{m}.{n}": p.grad.clone() for m, _, n, p in peers.named_stacked()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_gradients_equal_plain_ones(tiny_llama_dir: str, dropout: float) -> None:
    """Same losses and gradients of every stacked A, B, m with and without checkpointing (with the
    adapter's dropout on too: the replay restores the RNG, so it draws the same masks)."""
    peers = stacked_llama(tiny_llama_dir, dropout)
    plain_losses, plain = gradients(peers)
    assert enable_checkpointing(peers.model) == 2  # both decoder layers
    ckpt_losses, ckpt = gradients(peers)
    assert torch.allclose(ckpt_losses, plain_losses, rtol=1e-6, atol=0)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(ckpt[name], grad) < 1e-6, name


def test_checkpointing_recomputes_each_block(tiny_llama_dir: str) -> None:
    """A submodule of a decoder block runs once per step without checkpointing and twice with it
    (forward, then the replay in the backward); evaluation without gradients runs it once."""
    peers = stacked_llama(tiny_llama_dir)
    calls = {"n": 0}
    block = transformer_blocks(peers.model)[0]
    # A pre-hook on the first sublayer: torch's replay stops early once it has every tensor the
    # backward needs, so a hook at the end of the block may not see the replay.
    block.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    gradients(peers)
    assert calls["n"] == 1
    enable_checkpointing(peers.model)
    enable_checkpointing(peers.model)  # idempotent: wrapped once
    calls["n"] = 0
    gradients(peers)
    assert calls["n"] == 2
    calls["n"] = 0
    with torch.no_grad():
        TASK.peer_losses(peers.model, TASK.collator(TOKENIZER)([r for rows in features() for r in rows]), PEERS)
    assert calls["n"] == 1
    disable_checkpointing(peers.model)
    calls["n"] = 0
    gradients(peers)
    assert calls["n"] == 1


def test_trainer_steps_with_checkpointing_and_peer_groups_equal_plain_steps(tiny_llama_dir: str) -> None:
    """Two clipped AdamW steps in peer groups of one (the replay must see the group being served)
    and with accumulation leave the same parameters with checkpointing as without."""
    def run(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        peers = stacked_llama(tiny_llama_dir)
        trainer = LocalTrainer(peers, TASK, TASK.collator(TOKENIZER), lr=1e-2, total_steps=2, max_grad_norm=0.05,
                               group_size=1, grad_accum=2, gradient_checkpointing=checkpointing)
        losses = torch.stack([trainer.step(features()) for _ in range(2)])
        return losses, peers.flat()

    plain_losses, plain = run(False)
    ckpt_losses, ckpt = run(True)
    assert relative_error(ckpt_losses, plain_losses) < 1e-6
    assert relative_error(ckpt, plain) < 1e-6
