"""PeerModel: stacked peers over one base equal separate per-peer models, files included."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import LlamaForSequenceClassification

from d2ora import DoRAConfig, attach, load_adapter, save_adapter
from d2ora.engine.peers import PeerModel
from d2ora.mixers import make_mixer, mix_stacks
from tests.conftest import relative_error

PEERS, PER_PEER = 3, 2


def fresh(path: str):
    return LlamaForSequenceClassification.from_pretrained(path).eval()


def make_peers(path: str) -> PeerModel:
    model = fresh(path)
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["score"]))
    peers = PeerModel(model, PEERS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # give every peer its own adapter and head
        for layer in peers.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
        peers.heads["score"].weight.copy_(torch.randn(peers.heads["score"].weight.shape, generator=g))
    return peers


def test_peer_batched_forward_equals_each_peer_alone(tiny_classifier_dir: str, tmp_path: Path) -> None:
    peers = make_peers(tiny_classifier_dir)
    ids = torch.randint(1, 64, (PEERS * PER_PEER, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = peers.model(input_ids=ids).logits
    for k in range(PEERS):
        rows = slice(k * PER_PEER, (k + 1) * PER_PEER)
        with peers.peer_view(k) as view, torch.no_grad():
            alone = view(input_ids=ids[rows]).logits
            save_adapter(view, tmp_path / f"peer{k}")
        assert relative_error(batched[rows], alone) < 1e-5
        # The saved peer adapter means the same in d2ora and in PEFT.
        reloaded = fresh(tiny_classifier_dir)
        load_adapter(reloaded, tmp_path / f"peer{k}")
        peft_model = PeftModel.from_pretrained(fresh(tiny_classifier_dir), tmp_path / f"peer{k}").eval()
        with torch.no_grad():
            assert relative_error(reloaded(input_ids=ids[rows]).logits, alone) < 1e-5
            assert relative_error(peft_model(input_ids=ids[rows]).logits, alone) < 1e-5
    with peers.peer_view(0) as view, torch.no_grad():  # the peers really differ
        assert relative_error(view(input_ids=ids[PER_PEER:2 * PER_PEER]).logits, batched[PER_PEER:2 * PER_PEER]) > 1e-2
    assert isinstance(peers.model.get_submodule("score"), type(peers.heads["score"]))  # views restored


def test_serving_a_group_and_mixing_back(tiny_classifier_dir: str) -> None:
    peers = make_peers(tiny_classifier_dir)
    ids = torch.randint(1, 64, (PER_PEER, 7), generator=torch.Generator().manual_seed(3))
    with peers.serving(slice(1, 2)) as model, torch.no_grad():
        group = model(input_ids=ids).logits
    with peers.peer_view(1) as view, torch.no_grad():
        assert relative_error(group, view(input_ids=ids).logits) < 1e-5

    layer = next(iter(peers.layers.values()))
    param_before = layer.lora_B
    expected_b = layer.lora_B.detach().mean(dim=0)
    expected_head = peers.heads["score"].weight.detach().mean(dim=0)
    uniform = torch.full((PEERS, PEERS), 1.0 / PEERS)
    layers, dense = peers.stacks()
    mixed = mix_stacks(make_mixer("d2ora"), layers, uniform, dense=dense)
    peers.load_flat(peers.layout().flatten_stacks(mixed.layers, mixed.dense))
    assert layer.lora_B is param_before  # same Parameter: optimizers keep tracking it
    for k in range(PEERS):
        assert torch.allclose(layer.lora_B[k], expected_b, atol=1e-6)
        assert torch.allclose(peers.heads["score"].weight[k], expected_head, atol=1e-6)


def test_flat_layout_round_trip_and_holding(tiny_classifier_dir: str) -> None:
    """A peer's flat row is its slice of every stacked tensor in the layout's order; writing rows
    back changes exactly those peers; ``holding`` lends a peer's slot and restores it exactly."""
    peers = make_peers(tiny_classifier_dir)
    with torch.no_grad():
        for p in peers.stacked_parameters():
            p.add_(torch.randn_like(p))
    layout = peers.layout()
    flat = peers.flat()
    assert flat.shape == (PEERS, layout.numel)
    assert layout.numel == sum(p[0].numel() for p in peers.stacked_parameters())
    views = layout.views(flat)
    for module, _, name, param in peers.named_stacked():
        assert torch.equal(views[f"{module}.{name}"], param.detach())
    layers, dense = layout.unflatten(flat)
    assert torch.equal(layout.flatten_stacks(layers, dense), flat)
    before = flat.clone()
    peers.load_flat(torch.zeros(1, layout.numel), slice(1, 2))
    after = peers.flat()
    assert torch.equal(after[1], torch.zeros(layout.numel))
    assert torch.equal(after[0], before[0]) and torch.equal(after[2:], before[2:])
    peers.load_flat(before)
    with peers.holding(2, before[0]):
        assert torch.equal(peers.flat()[2], before[0])
    assert torch.equal(peers.flat(), before)
    assert layout.digest() == make_peers(tiny_classifier_dir).layout().digest()  # values do not enter it


def test_identical_peers_are_scored_once_with_each_peers_own_result(tiny_classifier_dir: str) -> None:
    """evaluate_peers serves each distinct adapter once: twins get the twin's scores, which equal
    scoring them separately; a peer that differs in one value is scored on its own."""
    from d2ora.engine.evaluate import evaluate_peers

    peers = make_peers(tiny_classifier_dir)
    flat = peers.flat()
    flat[2] = flat[0]
    peers.load_flat(flat)
    served: list[int] = []

    class CountingTask:
        def evaluate(self, model, batches, device):
            served.append(1)
            ids = batches[0]["input_ids"]
            with torch.no_grad():
                return {"logit_sum": float(model(input_ids=ids).logits.double().sum())}

    batches = [{"input_ids": torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(3))}]
    results = evaluate_peers(peers, CountingTask(), batches, "cpu")
    assert len(served) == 2  # peers 0 and 2 are one adapter
    separately = [evaluate_peers(peers, CountingTask(), batches, "cpu", peers=[k])[0] for k in range(PEERS)]
    assert results == separately and results[0] == results[2] != results[1]


def test_serving_reuses_row_norms_only_while_the_adapter_is_unchanged(tiny_classifier_dir: str, monkeypatch) -> None:
    """Inside serving, each layer's ||W0 + s·BA|| is computed once per adapter state: a second forward
    reuses it, an in-place load of another adapter is seen, and a fused AdamW step (which bumps no
    version counter) happens outside, so the next serving recomputes. Reference: the same forward
    with no cache at all."""
    from d2ora.dora.frozen_base import FrozenBase

    peers = make_peers(tiny_classifier_dir)
    ids = torch.randint(1, 64, (PER_PEER, 7), generator=torch.Generator().manual_seed(3))
    calls = []
    original = FrozenBase.row_norms
    monkeypatch.setattr(FrozenBase, "row_norms", lambda self, *a: calls.append(1) or original(self, *a))
    layers = len(peers.layers)

    def uncached(k: int) -> torch.Tensor:
        stacked = [*peers.layers.values(), *peers.heads.values()]
        with torch.no_grad():
            for module in stacked:
                module.active = slice(k, k + 1)
            out = peers.model(input_ids=ids).logits
            for module in stacked:
                module.active = slice(0, PEERS)
            return out

    reference = uncached(1)
    calls.clear()
    with peers.serving(slice(1, 2)) as model, torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert len(calls) == layers  # the second forward reused every layer's norms
        assert torch.equal(first, reference) and torch.equal(second, reference)
        for layer in peers.layers.values():  # load peer 2's adapter into slot 1 in place (as the monitor does)
            layer.lora_A[1].copy_(layer.lora_A[2])
            layer.lora_B[1].copy_(layer.lora_B[2])
            layer.lora_magnitude_vector[1].copy_(layer.lora_magnitude_vector[2])
        peers.heads["score"].weight[1].copy_(peers.heads["score"].weight[2])
        loaded = model(input_ids=ids).logits
        assert len(calls) == 2 * layers
    assert torch.equal(loaded, uncached(2))
    assert all(layer.norm_cache is None for layer in peers.layers.values())  # dropped on leaving

    params = [p for layer in peers.layers.values() for p in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    with peers.serving(slice(0, PEERS)) as model:
        model(input_ids=ids.repeat(PEERS, 1)).logits.square().mean().backward()
    optimizer.step()  # outside serving, as the trainer steps
    with peers.serving(slice(1, 2)) as model, torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, uncached(1)) and not torch.equal(after, loaded)
