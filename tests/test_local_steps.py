"""Peer-batched local training equals P independent per-peer trainings, piece by piece.

Every test checks one piece of ``d2ora.engine.local_steps`` / ``d2ora.engine.evaluate`` against a
reference built independently: each peer's rows padded and run alone, separate per-peer models
trained with plain ``torch.optim.AdamW`` and ``clip_grad_norm_``, or the definitions spelled out.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForSequenceClassification

from d2ora import DoRAConfig, attach, dora_layers
from d2ora.data.tasks import Batch, CausalLMTask, ClassificationTask, Task
from d2ora.engine.evaluate import collect_layer_inputs
from d2ora.engine.monitor import consensus_adapter
from d2ora.engine.local_steps import (
    LocalTrainer,
    PeerSampler,
    clip_per_peer_,
    linear_schedule,
)
from d2ora.engine.peers import PeerModel
from d2ora.mixers import make_mixer
from tests.conftest import load_causal, relative_error

PEERS, PER_PEER, LABELS = 3, 2, 3
LR, WEIGHT_DECAY, MAX_NORM, STEPS, WARMUP = 1e-2, 0.01, 0.05, 3, 0.34  # warm-up of 1 step, then decay
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
CLS_CONFIG = DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["score"], init_seed=0)
LM_CONFIG = DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=[], init_seed=0)
CLS_TASK = ClassificationTask(label_names=["a", "b", "c"])
Features = list[list[dict[str, Any]]]


# --- models and data ------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def fresh_classifier(path: str) -> nn.Module:
    return LlamaForSequenceClassification.from_pretrained(path).eval()


def randomize_peers(peers: PeerModel, seed: int = 1) -> PeerModel:
    """Give every peer its own A, B, m (and head), so a mix-up between peers shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in peers.layers.values():
            layer.lora_A.mul_(1 + 0.3 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
        for head in peers.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return peers


def make_cls_peers(path: str, peers: int = PEERS) -> PeerModel:
    model = fresh_classifier(path)
    attach(model, CLS_CONFIG)
    return randomize_peers(PeerModel(model, peers))


def make_lm_peers(path: str, peers: int = PEERS) -> PeerModel:
    model = load_causal(path)
    attach(model, LM_CONFIG)
    return randomize_peers(PeerModel(model, peers))


def peer_features(step: int, peers: int = PEERS, per_peer: int = PER_PEER, vocab: int = 64,
                  labels: bool = True) -> Features:
    """Peer k's examples at ``step``: ids >= 1, lengths varying within and across peers."""
    g = torch.Generator().manual_seed(100 + step)
    features: Features = []
    for k in range(peers):
        rows = []
        for i in range(per_peer):
            n = 2 + (3 * k + 5 * i + step) % 8
            row: dict[str, Any] = {"input_ids": torch.randint(1, vocab, (n,), generator=g).tolist(), "attention_mask": [1] * n}
            if labels:
                row["labels"] = (k + i + step) % LABELS
            rows.append(row)
        features.append(rows)
    return features


def flat(features: Features) -> list[dict[str, Any]]:
    return [row for rows in features for row in rows]


def assert_padding_differs(collate: Callable[[list[dict[str, Any]]], Batch], features: Features) -> None:
    """Guard against a vacuous check: some peer's rows alone pad to a narrower batch."""
    joint = collate(flat(features))["input_ids"].shape[1]
    assert any(collate(rows)["input_ids"].shape[1] < joint for rows in features)


def trainable_state(peers: PeerModel) -> dict[str, torch.Tensor]:
    """Detached copies of every stacked trainable tensor, by ``module.param`` name."""
    modules = {**peers.layers, **peers.heads}
    return {f"{name}.{p}": t.detach().clone() for name, m in modules.items() for p, t in m.named_parameters() if t.requires_grad}


def stacked_grads(peers: PeerModel) -> dict[str, torch.Tensor]:
    modules = {**peers.layers, **peers.heads}
    return {f"{name}.{p}": t.grad.detach().clone() for name, m in modules.items() for p, t in m.named_parameters() if t.requires_grad}


def make_trainer(peers: PeerModel, task: Task, group_size: int | None = None) -> LocalTrainer:
    return LocalTrainer(peers, task, task.collator(TOKENIZER), lr=LR, total_steps=STEPS, weight_decay=WEIGHT_DECAY,
                        warmup_ratio=WARMUP, max_grad_norm=MAX_NORM, group_size=group_size)


def peer_grad_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0).sqrt()


# --- 1. peer_losses ---------------------------------------------------------------------------------

def test_classification_peer_losses_equal_each_peer_alone(tiny_classifier_dir: str) -> None:
    """``peer_losses`` on a jointly padded peer-major batch equals ``loss`` on each peer's rows padded
    alone through its own view, and the sum's gradient in slice k is peer k's own gradient."""
    peers = make_cls_peers(tiny_classifier_dir)
    collate = CLS_TASK.collator(TOKENIZER)
    features = peer_features(0)
    assert_padding_differs(collate, features)
    losses = CLS_TASK.peer_losses(peers.model, collate(flat(features)), PEERS)
    assert losses.shape == (PEERS,)
    losses.sum().backward()
    name = "model.layers.1.mlp.down_proj"
    alone = []
    for k in range(PEERS):
        with peers.peer_view(k) as view:
            loss = CLS_TASK.loss(view, collate(features[k]))
            loss.backward()
            layer, head = view.get_submodule(name), view.get_submodule("score")
            assert relative_error(peers.layers[name].lora_B.grad[k], layer.lora_B.grad) < 1e-5
            assert relative_error(peers.layers[name].lora_magnitude_vector.grad[k], layer.lora_magnitude_vector.grad) < 1e-5
            assert relative_error(peers.heads["score"].weight.grad[k], head.weight.grad) < 1e-5
        alone.append(loss.detach())
    expected = torch.stack(alone)
    assert relative_error(losses, expected) < 1e-5
    assert (expected.max() - expected.min()) > 1e-3  # the peers really differ


def test_causal_lm_peer_losses_equal_each_peer_alone(tiny_llama_dir: str) -> None:
    """Token-weighted per-peer NLL of a joint batch equals ``loss`` on each peer's rows alone (the
    peers hold different token counts, so a mean over the whole batch or of row means would fail)."""
    peers = make_lm_peers(tiny_llama_dir)
    task = CausalLMTask()
    collate = task.collator(TOKENIZER)
    features = peer_features(1, vocab=128, labels=False)
    assert_padding_differs(collate, features)
    assert len({sum(len(r["input_ids"]) for r in rows) for rows in features}) > 1
    with torch.no_grad():
        losses = task.peer_losses(peers.model, collate(flat(features)), PEERS)
        alone = []
        for k in range(PEERS):
            with peers.peer_view(k) as view:
                alone.append(task.loss(view, collate(features[k])))
    expected = torch.stack(alone)
    assert relative_error(losses, expected) < 1e-5
    assert (expected.max() - expected.min()) > 1e-3


# --- 2. peer-batched vs sequential ------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 2])
def test_peer_batched_steps_equal_sequential_steps(tiny_classifier_dir: str, group_size: int | None) -> None:
    """Three clipped, weight-decayed steps peer-batched (all at once, or in groups of 2 over 3 peers)
    give the same losses, clipped gradients and parameters as one peer at a time padded alone."""
    batched_peers, sequential_peers = make_cls_peers(tiny_classifier_dir), make_cls_peers(tiny_classifier_dir)
    initial = trainable_state(batched_peers)
    batched = make_trainer(batched_peers, CLS_TASK, group_size)
    sequential = make_trainer(sequential_peers, CLS_TASK)
    clipped = 0
    for step in range(STEPS):
        features = peer_features(step)
        loss_b = batched.step(features)
        loss_s = sequential.step(features, sequential=True)
        assert relative_error(loss_b, loss_s) < 1e-5
        grads_b, grads_s = stacked_grads(batched_peers), stacked_grads(sequential_peers)
        for name, grad in grads_s.items():
            assert relative_error(grads_b[name], grad) < 1e-5, (step, name)
        clipped += int((peer_grad_norms(grads_s) > 0.999 * MAX_NORM).sum())
        state_b, state_s = trainable_state(batched_peers), trainable_state(sequential_peers)
        for name, value in state_s.items():
            assert relative_error(state_b[name], value) < 1e-5, (step, name)
    assert clipped > 0  # clipping was active
    final = trainable_state(batched_peers)
    assert all(relative_error(final[n], initial[n]) > 1e-3 for n in initial)  # the steps moved everything


# --- 3. P independent optimizers --------------------------------------------------------------------

def reference_model(path: str, peers: PeerModel, k: int) -> nn.Module:
    """A separate model holding peer k's current A, B, m and head."""
    model = fresh_classifier(path)
    attach(model, CLS_CONFIG)
    with torch.no_grad():
        for name, layer in dora_layers(model).items():
            stacked = peers.layers[name]
            layer.lora_A.copy_(stacked.lora_A[k])
            layer.lora_B.copy_(stacked.lora_B[k])
            layer.lora_magnitude_vector.copy_(stacked.lora_magnitude_vector[k])
        model.get_submodule("score").weight.copy_(peers.heads["score"].weight[k])
    return model


def reference_optimizer(model: nn.Module) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    """Plain AdamW: decay on A, B and the head weight; none on magnitudes and biases."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n.endswith(("lora_A", "lora_B", "score.weight"))]
    no_decay = [p for n, p in named if not n.endswith(("lora_A", "lora_B", "score.weight"))]
    assert len(decay) == 2 * len(dora_layers(model)) + 1 and len(no_decay) == len(dora_layers(model))
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR), [p for _, p in named]


def reference_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference model's tensors under the PeerModel's ``module.param`` names."""
    out = {}
    for name, layer in dora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
        out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    out["score.weight"] = model.get_submodule("score").weight.detach()
    return out


def test_fused_step_equals_independent_per_peer_optimizers(tiny_classifier_dir: str) -> None:
    """Per-peer clipping plus one fused AdamW over the stacks equals P separate models, each with its
    own AdamW, ``clip_grad_norm_`` and linear schedule on its own examples (checked every step)."""
    peers = make_cls_peers(tiny_classifier_dir)
    collate = CLS_TASK.collator(TOKENIZER)
    refs = [reference_model(tiny_classifier_dir, peers, k) for k in range(PEERS)]
    optims = [reference_optimizer(m) for m in refs]
    schedules = [linear_schedule(opt, STEPS, WARMUP) for opt, _ in optims]
    trainer = make_trainer(peers, CLS_TASK)
    initial = trainable_state(peers)
    norms = []
    for step in range(STEPS):
        features = peer_features(step)
        losses = trainer.step(features)
        for k, (model, (opt, params), schedule) in enumerate(zip(refs, optims, schedules)):
            opt.zero_grad(set_to_none=True)
            loss = CLS_TASK.loss(model, collate(features[k]))
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
            opt.step()
            schedule.step()
            assert abs(float(losses[k]) - loss.item()) < 1e-5 * abs(loss.item()), (step, k)
    state = trainable_state(peers)
    for k, model in enumerate(refs):
        for name, value in reference_tensors(model).items():
            assert relative_error(state[name][k], value) < 1e-5, (k, name)
            assert relative_error(value, initial[name][k]) > 1e-3, (k, name)  # trained, not vacuous
    assert any(n > MAX_NORM for n in norms) and len({round(n, 6) for n in norms}) > 1


# --- 4. reset_factor_moments ------------------------------------------------------------------------

def test_reset_factor_moments_gives_a_fresh_adamw_step_for_factors_only(tiny_classifier_dir: str) -> None:
    """After a reset, A and B take exactly the step a brand-new AdamW would take from the same
    (clipped) gradient, while magnitudes and heads keep their moments (step count 2)."""
    peers = make_cls_peers(tiny_classifier_dir)
    trainer = make_trainer(peers, CLS_TASK)
    trainer.step(peer_features(0))
    trainer.reset_factor_moments()
    name = "model.layers.0.self_attn.v_proj"
    layer = peers.layers[name]
    factors = (layer.lora_A, layer.lora_B)
    before = [p.detach().clone() for p in factors]
    decay_group = next(g for g in trainer.optimizer.param_groups if any(p is layer.lora_A for p in g["params"]))
    lr, weight_decay = decay_group["lr"], decay_group["weight_decay"]
    assert weight_decay == WEIGHT_DECAY and lr > 0
    trainer.step(peer_features(1))

    clones = [nn.Parameter(b.clone()) for b in before]
    for clone, param in zip(clones, factors):
        clone.grad = param.grad.detach().clone()
    torch.optim.AdamW(clones, lr=lr, weight_decay=weight_decay).step()
    for param, clone, old in zip(factors, clones, before):
        assert relative_error(param.detach() - old, clone.detach() - old) < 1e-5
    state = trainer.optimizer.state
    assert float(state[layer.lora_A]["step"]) == 1 and float(state[layer.lora_B]["step"]) == 1
    assert float(state[layer.lora_magnitude_vector]["step"]) == 2
    assert float(state[peers.heads["score"].weight]["step"]) == 2


# --- 5. clip_per_peer_ ------------------------------------------------------------------------------

def test_clip_per_peer_equals_clip_grad_norm_on_each_peer() -> None:
    """Peer k's slices are clipped as ``clip_grad_norm_`` clips them alone; peers under the limit are
    untouched, and the returned norms are the norms before clipping."""
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([10.0, 0.01, 1.0, 0.1])  # above, below, above, below max_norm = 1
    shapes = [(4, 3, 4), (4, 5), (4, 2, 2, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scales.view(-1, *([1] * (p.dim() - 1)))
    params.append(nn.Parameter(torch.randn(4, 3, generator=g)))  # no gradient: skipped
    expected_norms, expected_grads = [], []
    for k in range(4):
        leaves = [nn.Parameter(p.detach()[k].clone()) for p in params[:-1]]
        for leaf, p in zip(leaves, params):
            leaf.grad = p.grad[k].clone()
        expected_norms.append(torch.nn.utils.clip_grad_norm_(leaves, 1.0))
        expected_grads.append([leaf.grad for leaf in leaves])
    original = [p.grad.clone() for p in params[:-1]]
    norms = clip_per_peer_(params, 1.0)
    expected = torch.stack(expected_norms)
    assert torch.allclose(norms, expected, rtol=1e-6)
    assert (expected > 1).sum() == 2 and (expected < 1).sum() == 2
    for k in range(4):
        for p, grad, old in zip(params, expected_grads[k], original):
            assert torch.allclose(p.grad[k], grad, rtol=1e-6, atol=0)
            if expected[k] < 1:
                assert torch.equal(p.grad[k], old[k])
    assert params[-1].grad is None


# --- 6. PeerSampler ---------------------------------------------------------------------------------

SHARDS = [np.arange(0, 10), np.arange(100, 107), np.arange(200, 202)]


def draws(seed: int, rounds: int, batch: int = 3) -> list[list[np.ndarray]]:
    sampler = PeerSampler(SHARDS, batch, seed)
    return [sampler.draw_all() for _ in range(rounds)]


def test_peer_sampler_draws_own_shard_without_repeats_and_is_seeded() -> None:
    """Each peer draws only its own shard, one pass of ``len(shard)//b`` batches repeats nothing, a
    shard smaller than the batch still gives full batches covering it, and the seed decides."""
    batch = 3
    rounds = draws(seed=7, rounds=6, batch=batch)
    for k, shard in enumerate(SHARDS):
        drawn = [r[k] for r in rounds]
        assert all(len(d) == batch for d in drawn)
        assert set(np.concatenate(drawn).tolist()) <= set(shard.tolist())
        passes = len(shard) // batch
        if passes:
            one_pass = np.concatenate(drawn[:passes])
            assert len(set(one_pass.tolist())) == len(one_pass)
    small = np.concatenate([r[2] for r in rounds])  # shard of 2, batches of 3
    assert set(small[:2].tolist()) == set(SHARDS[2].tolist())
    assert set(np.concatenate([r[0] for r in rounds])[:10].tolist()) == set(SHARDS[0].tolist())  # a full epoch first

    same, other = draws(seed=7, rounds=6, batch=batch), draws(seed=8, rounds=6, batch=batch)
    assert all(np.array_equal(a, b) for ra, rb in zip(rounds, same) for a, b in zip(ra, rb))
    assert not all(np.array_equal(a, b) for ra, rb in zip(rounds, other) for a, b in zip(ra[:2], rb[:2]))


def test_peer_sampler_rejects_an_empty_shard() -> None:
    """An empty shard is an error naming the peer, not an endless loop or a silent skip."""
    with pytest.raises(ValueError, match=r"peer\(s\) \[1\]"):
        PeerSampler([np.arange(3), np.array([], dtype=np.int64), np.arange(2)], 2, seed=0)


# --- 7. consensus -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["d2ora", "local"])
def test_consensus_is_the_plain_mean_and_holding_restores(tiny_classifier_dir: str, mixer: str) -> None:
    """D²ORA's consensus (and a local run's one-shot average) is the plain mean over peers of A, B,
    m and the head, computed by peer 0 from every peer's flat adapter; ``holding`` lends peer 0's
    slot to it and restores each peer's own tensors exactly afterwards, also when its body raises."""
    peers = make_cls_peers(tiny_classifier_dir)
    own = trainable_state(peers)
    layout = peers.layout()
    adapter = consensus_adapter(layout, peers.flat(), make_mixer(mixer))
    views = layout.views(adapter)
    for name in peers.layers:
        for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
            mean = own[f"{name}.{key}"].mean(dim=0)
            assert torch.allclose(views[f"{name}.{key}"], mean, atol=1e-6, rtol=1e-5), (name, key)
    head_mean = own["score.weight"].mean(dim=0)
    assert torch.allclose(views["score.weight"], head_mean, atol=1e-6, rtol=1e-5)

    with peers.holding(0, adapter):
        for name in peers.layers:
            assert torch.allclose(peers.layers[name].lora_B[0], own[f"{name}.lora_B"].mean(dim=0), atol=1e-6)
            assert torch.equal(peers.layers[name].lora_B[1:], own[f"{name}.lora_B"][1:])
        assert torch.allclose(peers.heads["score"].weight[0], head_mean, atol=1e-6)
    assert all(torch.equal(t, own[n]) for n, t in trainable_state(peers).items())
    with pytest.raises(RuntimeError, match="boom"), peers.holding(0, adapter):
        raise RuntimeError("boom")
    assert all(torch.equal(t, own[n]) for n, t in trainable_state(peers).items())


# --- 8. collect_layer_inputs ------------------------------------------------------------------------

def inputs_alone(peers: PeerModel, k: int, name: str, batch: Batch) -> torch.Tensor:
    """The non-padding inputs layer ``name`` receives when peer k's rows run alone through its view."""
    seen: list[torch.Tensor] = []
    with peers.peer_view(k) as view, torch.no_grad():
        handle = view.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            view(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            handle.remove()
    (x,) = seen
    return x[batch["attention_mask"].bool()]


def test_collect_layer_inputs_equal_each_peer_alone(tiny_classifier_dir: str) -> None:
    """Captured inputs are, per peer and layer, the non-padding inputs that layer sees on the peer's
    own rows run alone (in order when nothing is dropped); ``max_tokens`` keeps that many of them."""
    peers = make_cls_peers(tiny_classifier_dir)
    collate = CLS_TASK.collator(TOKENIZER)
    features = peer_features(2)
    assert_padding_differs(collate, features)
    batch = collate(flat(features))
    everything = collect_layer_inputs(peers, batch, max_tokens=1000)
    sampled = collect_layer_inputs(peers, batch, max_tokens=4, seed=3)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for k in range(PEERS):
            expected = inputs_alone(peers, k, name, collate(features[k]))
            assert expected.shape[0] == sum(len(r["input_ids"]) for r in features[k])
            got = everything(k, name)
            assert got.shape == expected.shape and relative_error(got, expected) < 1e-5, (name, k)
            subset = sampled(k, name)
            assert subset.shape == (4, expected.shape[1])
            distance = torch.cdist(subset, expected)  # each kept row is one of the peer's own tokens
            nearest = distance.min(dim=1)
            assert (nearest.values < 1e-5 * expected.norm(dim=1).max()).all(), (name, k)
            if name.endswith("down_proj"):  # position-dependent inputs: distinct tokens, distinct rows
                assert len(set(nearest.indices.tolist())) == 4
    assert all(peers.model.get_submodule(n) is layer for n, layer in peers.layers.items())


def test_collect_layer_inputs_handles_one_row_per_example_layers() -> None:
    """BERT's pooler sees one vector per example (not per token); "all-linear" adapts it, so DIMAT
    must capture those rows: they equal what the pooler receives on the peer's rows alone."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                        vocab_size=64, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    attach(model, DoRAConfig(r=2, alpha=4, target_modules="all-linear", modules_to_save=["classifier"], init_seed=0))
    peers = PeerModel(model, 2)
    ids = torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    captured = collect_layer_inputs(peers, batch, max_tokens=100)
    for k in range(2):
        rows = slice(2 * k, 2 * k + 2)
        seen: list[torch.Tensor] = []
        with peers.peer_view(k) as view, torch.no_grad():
            handle = view.get_submodule("bert.pooler.dense").register_forward_pre_hook(
                lambda _m, args: seen.append(args[0].detach()))
            view(input_ids=ids[rows], attention_mask=batch["attention_mask"][rows])
            handle.remove()
        assert captured(k, "bert.pooler.dense").shape == (2, 32)
        assert relative_error(captured(k, "bert.pooler.dense"), seen[0]) < 1e-5
