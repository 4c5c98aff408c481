"""Chunked causal-LM cross-entropy (``d2ora.data.losses``) equals ``F.cross_entropy`` on full logits."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from d2ora import DoRAConfig, attach
from d2ora.data import losses
from d2ora.data.tasks import IGNORE_INDEX, CausalLMTask
from d2ora.engine.peers import PeerModel
from tests.conftest import load_causal, relative_error

TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 logits of every position, then F.cross_entropy: sums and counts per group."""
    logits = head(hidden)[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(groups, -1).sum(1), (targets != IGNORE_INDEX).reshape(groups, -1).sum(1)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_nll_and_gradients_equal_full_cross_entropy(chunk: int) -> None:
    """Sums, counts and the gradients of hidden states and a trainable head, with chunks smaller
    than a row, across rows and peers, and one chunk for everything."""
    assert losses.IGNORE_INDEX == IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    groups, rows, length, width, vocab = 3, 6, 7, 16, 50
    hidden = torch.randn(rows, length, width, generator=g, requires_grad=True)
    head = nn.Linear(width, vocab)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[1, 4:] = IGNORE_INDEX  # padding
    labels[3, 1:] = IGNORE_INDEX  # a row with no target at all
    weights = torch.tensor([1.0, 2.0, 3.0])

    sums, counts = losses.chunked_token_nll(hidden, head, labels, groups, chunk_tokens=chunk)
    (sums * weights).sum().backward()
    got = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    ref_sums, ref_counts = reference(hidden, head, labels, groups)
    (ref_sums * weights).sum().backward()

    assert torch.equal(counts, ref_counts)
    assert relative_error(sums, ref_sums) < 1e-6
    for mine, theirs in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert relative_error(mine, theirs) < 1e-6


def test_causal_lm_peer_losses_take_the_chunked_path_and_equal_full_logits(tiny_llama_dir: str, monkeypatch) -> None:
    """The task's per-peer losses (stacked peers, a HF Llama) through the chunked head equal the
    full-logits computation, losses and adapter gradients; the model's logits are never asked for."""
    model = load_causal(tiny_llama_dir)
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=[], init_seed=0))
    peers = PeerModel(model, 2)
    with torch.no_grad():
        for layer in peers.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    task = CausalLMTask()
    rows = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n} for n in (4, 9, 6, 3)]
    batch = task.collator(TOKENIZER)(rows)
    assert losses.output_head(model) is model.lm_head
    monkeypatch.setattr(losses, "CHUNK_TOKENS", 4)  # several chunks on this small batch
    calls = []
    chunk = losses._chunk_nll
    monkeypatch.setattr(losses, "_chunk_nll", lambda *args: calls.append(len(args[1])) or chunk(*args))

    got = task.peer_losses(model, batch, 2)
    got.sum().backward()
    grads = {f"{m}.{n}": p.grad.clone() for m, _, n, p in peers.named_stacked()}
    for _, _, _, p in peers.named_stacked():
        p.grad = None
    sums, counts = losses.full_token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                         batch["labels"], 2)
    expected = sums / counts
    expected.sum().backward()
    assert relative_error(got, expected.detach()) < 1e-6
    assert sorted(set(calls[:5])) == [2, 4] and sum(calls[:5]) == 3 + 8 + 5 + 2  # 18 targets in chunks of 4
    for m, _, n, p in peers.named_stacked():
        assert relative_error(grads[f"{m}.{n}"], p.grad) < 1e-5, (m, n)


def test_models_whose_logits_are_not_a_plain_head_take_the_full_path() -> None:
    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=24, vocab_size=32)
    model = LlamaForCausalLM(config)
    assert losses.output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # a logit transform after the head
    assert losses.output_head(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head = nn.Sequential(nn.Linear(16, 32))  # not a plain Linear
    assert losses.output_head(model) is None
    assert losses.output_head(nn.Linear(3, 3)) is None  # not a causal LM at all
