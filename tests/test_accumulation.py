"""Gradient accumulation (``optim.grad_accum``): micro-batches whose gradients add up to one big batch's.

The reference is plain autograd without accumulation: the task's per-peer losses of the whole
peer-major batch, summed and back-propagated once, on an identical copy of the stacked peers.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaForSequenceClassification

from d2ora import DoRAConfig, attach
from d2ora.data.tasks import CausalLMTask, ClassificationTask, Task
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.peers import PeerModel
from d2ora.recipes.sections import OptimSection
from d2ora.recipes.train import _accumulated_backward
from tests.conftest import load_causal, relative_error

PEERS = 3
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
CLS_TASK = ClassificationTask(label_names=["a", "b", "c"])
LM_TASK = CausalLMTask()
Features = list[list[dict[str, Any]]]

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(peers: PeerModel) -> PeerModel:
    """Every peer its own B, m and head, so a mix-up between peers or micro-batches shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in peers.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
        for head in peers.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return peers


def cls_peers(path: str) -> PeerModel:
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["score"], init_seed=0))
    return randomize(PeerModel(model, PEERS))


def lm_peers(path: str) -> PeerModel:
    model = load_causal(path)
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=[], init_seed=0))
    return randomize(PeerModel(model, PEERS))


def features(per_peer: int, vocab: int, labels: bool) -> Features:
    """Lengths vary within and across peers, so micro-batches hold different token counts."""
    g = torch.Generator().manual_seed(7)
    out: Features = []
    for k in range(PEERS):
        rows = []
        for i in range(per_peer):
            n = 2 + (5 * k + 7 * i) % 11
            row: dict[str, Any] = {"input_ids": torch.randint(1, vocab, (n,), generator=g).tolist(), "attention_mask": [1] * n}
            if labels:
                row["labels"] = (k + i) % 3
            rows.append(row)
        out.append(rows)
    return out


def grads(peers: PeerModel) -> dict[str, torch.Tensor]:
    return {f"{m}.{n}": p.grad.detach().clone() for m, _, n, p in peers.named_stacked()}


def reference(peers: PeerModel, task: Task, feats: Features) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One big peer-major batch, one backward: no accumulation."""
    peers.model.eval()
    for module in (*peers.layers.values(), *peers.heads.values()):
        module.train()
    batch = task.collator(TOKENIZER)([row for rows in feats for row in rows])
    losses = task.peer_losses(peers.model, batch, PEERS)
    losses.sum().backward()
    return losses.detach(), grads(peers)


def trainer(peers: PeerModel, task: Task, grad_accum: int, **kwargs: Any) -> LocalTrainer:
    return LocalTrainer(peers, task, task.collator(TOKENIZER), lr=1e-2, total_steps=2, weight_decay=0.01,
                        grad_accum=grad_accum, **kwargs)


@pytest.mark.parametrize("grad_accum", [2, 3])
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_accumulated_gradients_equal_one_big_batch(kind: str, grad_accum: int, tiny_classifier_dir: str, tiny_llama_dir: str) -> None:
    """P=3 peers, 5 examples each in 2 or 3 micro-batches (uneven parts): the accumulated gradient
    of every stacked tensor and the returned per-peer losses equal one big batch's."""
    if kind == "classification":
        task, make, feats = CLS_TASK, lambda: cls_peers(tiny_classifier_dir), features(5, 64, labels=True)
    else:
        task, make, feats = LM_TASK, lambda: lm_peers(tiny_llama_dir), features(5, 128, labels=False)
    expected_losses, expected = reference(make(), task, feats)
    peers = make()
    losses = trainer(peers, task, grad_accum, max_grad_norm=None).step(feats)
    got = grads(peers)  # the step leaves the gradients it used
    assert relative_error(losses, expected_losses) < 1e-6
    for name, grad in expected.items():
        assert relative_error(got[name], grad) < 1e-5, name
    assert (expected_losses.max() - expected_losses.min()) > 1e-3  # the peers really differ


def test_token_weighting_is_what_makes_the_lm_equal(tiny_llama_dir: str) -> None:
    """Guard against a vacuous check: a plain mean of the micro-batches' per-peer means (no token
    weights) is not the big batch's loss on these examples."""
    feats = features(4, 128, labels=False)
    collate = LM_TASK.collator(TOKENIZER)
    peers = lm_peers(tiny_llama_dir)
    with torch.no_grad():
        whole = LM_TASK.peer_losses(peers.model, collate([r for rows in feats for r in rows]), PEERS)
        halves = [LM_TASK.peer_losses(peers.model, collate([r for rows in feats for r in rows[s]]), PEERS)
                  for s in (slice(0, 2), slice(2, 4))]
    assert relative_error((halves[0] + halves[1]) / 2, whole) > 1e-3


@pytest.mark.parametrize("sequential", [False, True])
def test_clipped_step_with_accumulation_equals_the_plain_step(tiny_llama_dir: str, sequential: bool) -> None:
    """Two clipped AdamW steps with grad_accum 2 (peer-batched, or one peer at a time) leave the same
    parameters as the same steps with grad_accum 1."""
    plain, accum = lm_peers(tiny_llama_dir), lm_peers(tiny_llama_dir)
    t_plain = trainer(plain, LM_TASK, 1, max_grad_norm=0.05)
    t_accum = trainer(accum, LM_TASK, 2, max_grad_norm=0.05)
    feats = features(4, 128, labels=False)
    for _ in range(2):
        assert relative_error(t_accum.step(feats, sequential=sequential), t_plain.step(feats, sequential=sequential)) < 1e-6
    after_plain, after_accum = plain.flat(), accum.flat()
    assert relative_error(after_accum, after_plain) < 1e-5


def test_too_few_examples_for_the_micro_batches(tiny_classifier_dir: str) -> None:
    with pytest.raises(ValueError, match="grad_accum 3"):
        trainer(cls_peers(tiny_classifier_dir), CLS_TASK, 3).step(features(2, 64, labels=True))
    with pytest.raises(ValueError, match="grad_accum must be at least 1"):
        trainer(cls_peers(tiny_classifier_dir), CLS_TASK, 0)


def test_config_refuses_more_micro_batches_than_examples() -> None:
    assert OptimSection().grad_accum == 1
    assert OptimSection(batch_size=8, grad_accum=8).grad_accum == 8
    with pytest.raises(ValueError, match="grad_accum 9 is more than batch_size 8"):
        OptimSection(batch_size=8, grad_accum=9)


def test_train_accumulation_equals_the_whole_batch(tiny_llama_dir: str) -> None:
    """``d2ora train``'s accumulation (one model, no peers) against ``task.loss`` on the whole batch."""
    def model() -> nn.Module:
        m = load_causal(tiny_llama_dir)
        attach(m, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=[], init_seed=0))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        return m

    batch = LM_TASK.collator(TOKENIZER)(features(1, 128, labels=False)[0] + features(4, 128, labels=False)[1])
    whole, accum = model(), model()
    loss = LM_TASK.loss(whole, batch)
    loss.backward()
    got = _accumulated_backward(LM_TASK, accum, batch, 3)
    assert relative_error(got, loss.detach()) < 1e-6
    expected = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    for name, p in accum.named_parameters():
        if p.requires_grad:
            assert relative_error(p.grad, expected[name]) < 1e-5, name
