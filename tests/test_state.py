"""Components own their state: a sampler, trainer or drift correction restored from its
``state_dict`` (through the checkpoint's two files: safetensors and JSON) continues exactly like
an uninterrupted reference run of the same component; values cross processes by name."""

from __future__ import annotations

import math

import json
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from d2ora.data.tasks import ClassificationTask
from d2ora.engine import state as component_state
from d2ora.engine.drift import LocalCorrection
from d2ora.engine.local_steps import LocalTrainer, PeerSampler
from d2ora.engine.peer_values import MetricColumns, PeerRoundValues
from d2ora.engine.peers import PeerModel
from tests.conftest import stacked_tiny_classifier, tiny_features

PEERS = 3
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
TASK = ClassificationTask(label_names=["a", "b", "c"])

pytestmark = pytest.mark.usefixtures("one_thread")


def through_files(components: dict[str, component_state.Stateful]) -> dict[str, dict]:
    """What a checkpoint keeps of each component: its tensors through safetensors, the rest
    through JSON, filed under the component's name and read back."""
    tensors, values = component_state.split(components)
    tensors = load(save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))
    values = json.loads(json.dumps(values))
    return {name: component_state.part(name, tensors, values) for name in components}


# --- the sampler ----------------------------------------------------------------------------------

SHARDS = [np.arange(7), np.arange(10, 13), np.arange(20, 31)]  # one shard smaller than a batch


def test_a_restored_sampler_draws_what_the_uninterrupted_one_draws() -> None:
    reference = PeerSampler(SHARDS, 4, seed=5, peer_ids=[3, 4, 5])
    for _ in range(3):  # mid-epoch for some peers, past an epoch boundary for others
        reference.draw_all()
    saved = through_files({"sampler": reference})["sampler"]
    assert {k for k in saved if k.startswith("order.")} == {"order.0", "order.1", "order.2"}
    restored = PeerSampler(SHARDS, 4, seed=99, peer_ids=[3, 4, 5])  # another seed: all must come from the state
    restored.load_state_dict(saved)
    for _ in range(6):
        for ours, theirs in zip(restored.draw_all(), reference.draw_all()):
            np.testing.assert_array_equal(ours, theirs)


def test_a_sampler_refuses_state_for_other_peers() -> None:
    saved = through_files({"sampler": PeerSampler(SHARDS, 4, seed=5)})["sampler"]
    with pytest.raises(ValueError, match="for 3 peers, this sampler has 2"):
        PeerSampler(SHARDS[:2], 4, seed=5).load_state_dict(saved)


# --- the trainer and the drift correction ---------------------------------------------------------

def peer_model(path: str) -> PeerModel:
    return stacked_tiny_classifier(path, PEERS)


def features(seed: int) -> list[list[dict]]:
    return tiny_features(seed, PEERS)


def make_trainer(peers: PeerModel, correction: LocalCorrection | None = None) -> LocalTrainer:
    # Warm-up then decay over more steps than the tests take: the schedule's position matters.
    return LocalTrainer(peers, TASK, TASK.collator(TOKENIZER), lr=5e-2, total_steps=16, warmup_ratio=0.25,
                        weight_decay=0.01, max_grad_norm=0.5, correction=correction)


def test_a_restored_trainer_continues_exactly(one_layer_classifier_dir: str) -> None:
    """AdamW's moments and step counts (by parameter name), the groups' rates and the scheduler's
    position: a fresh trainer loading them steps exactly as the uninterrupted one."""
    model = peer_model(one_layer_classifier_dir)
    reference = make_trainer(model)
    for step in range(3):
        reference.step(features(step))
    reference.reset_factor_moments()  # as after a re-basing mix: A and B have no state, and must stay so
    saved = through_files({"trainer": reference})["trainer"]
    adapters = model.flat().clone()
    names = {name for name, p in model.model.named_parameters() if p.requires_grad}
    moments = {key.removeprefix("optimizer.").rsplit(".", 1)[0] for key in saved if key.endswith(".exp_avg")}
    assert moments and moments <= names  # keyed by the stacked parameters' names
    assert not any(n.endswith(("lora_A", "lora_B")) for n in moments)
    assert "lr_lambdas" not in saved["scheduler"]
    for step in range(3, 7):
        reference.step(features(step))

    other_model = peer_model(one_layer_classifier_dir)
    other = make_trainer(other_model)
    other_model.load_flat(adapters)
    other.load_state_dict(saved)
    for step in range(3, 7):
        other.step(features(step))
    assert torch.equal(other_model.flat(), model.flat())
    assert other.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    assert [g["lr"] for g in other.optimizer.param_groups] == [g["lr"] for g in reference.optimizer.param_groups]
    for param, twin in zip(other.params, reference.params):
        state, expected = other.optimizer.state.get(param, {}), reference.optimizer.state.get(twin, {})
        assert state.keys() == expected.keys()
        for key in state:
            assert torch.equal(state[key], expected[key]) and state[key].device == expected[key].device, key


def test_a_trainer_refuses_state_for_other_parameters(one_layer_classifier_dir: str) -> None:
    model = peer_model(one_layer_classifier_dir)
    trainer = make_trainer(model)
    trainer.step(features(0))
    saved = through_files({"trainer": trainer})["trainer"]
    saved["optimizer.param_groups"][0]["params"][0] = "model.some.other.weight"
    with pytest.raises(ValueError, match="other parameters"):
        make_trainer(peer_model(one_layer_classifier_dir)).load_state_dict(saved)


def correction_round(model: PeerModel, trainer: LocalTrainer, correction: LocalCorrection, index: int) -> None:
    """One round as run_round drives the hooks, with a stand-in mix (every adapter pulled to 0.9x;
    neighbours' updates Δ as half the peer's own)."""
    correction.begin_round()
    for step in range(2):
        trainer.step(features(10 * index + step))
    sent = correction.extra_payloads()
    model.load_flat(model.flat() * 0.9)
    correction.after_mix(sent, [payload * 0.5 for payload in sent])


@pytest.mark.parametrize("method", ["qgm", "kgt"])
def test_a_restored_correction_continues_exactly(one_layer_classifier_dir: str, method: str) -> None:
    model = peer_model(one_layer_classifier_dir)
    correction = LocalCorrection(model, method, beta=0.8, prox_mu=0.1)
    trainer = make_trainer(model, correction)
    for index in range(2):
        correction_round(model, trainer, correction, index)
    saved = through_files({"trainer": trainer, "drift": correction})
    assert saved["drift"].keys() == {"state"} and saved["drift"]["state"].abs().max() > 0
    adapters = model.flat().clone()
    for index in range(2, 4):
        correction_round(model, trainer, correction, index)

    other_model = peer_model(one_layer_classifier_dir)
    other_correction = LocalCorrection(other_model, method, beta=0.8, prox_mu=0.1)
    other = make_trainer(other_model, other_correction)
    other_model.load_flat(adapters)
    other.load_state_dict(saved["trainer"])
    other_correction.load_state_dict(saved["drift"])
    for index in range(2, 4):
        correction_round(other_model, other, other_correction, index)
    assert torch.equal(other_correction.state, correction.state)
    assert torch.equal(other_model.flat(), model.flat())


def test_correction_state_must_fit(one_layer_classifier_dir: str) -> None:
    model = peer_model(one_layer_classifier_dir)
    prox_only = LocalCorrection(model, prox_mu=0.1)
    assert prox_only.state_dict() == {}  # FedProx's anchor is set again every round
    prox_only.load_state_dict({})
    qgm = LocalCorrection(model, "qgm")
    with pytest.raises(ValueError, match="keeps none"):
        prox_only.load_state_dict(qgm.state_dict())
    with pytest.raises(ValueError, match="no drift-correction state"):
        qgm.load_state_dict({})


# --- values by name ---------------------------------------------------------------------------------

def test_round_values_and_metrics_cross_by_name() -> None:
    rows = [PeerRoundValues(train_loss=float(torch.tensor(1.1)), payload_bytes=2**40 + 3, samples=8, local_s=0.5,
                            exchange_s=0.25, mix_s=0.125, wire_bytes=k * 7) for k in range(3)]
    table = PeerRoundValues.encode(rows)
    assert table.dtype == torch.float64 and table.shape == (3, 7)
    assert PeerRoundValues.decode(table) == rows
    assert isinstance(PeerRoundValues.decode(table)[0].payload_bytes, int)

    columns = MetricColumns(["val", "test"], ["accuracy", "examples"], frozenset({"examples"}))
    results = {"val": [{"accuracy": 0.5, "examples": 4}, None], "test": [{"accuracy": 0.25, "examples": 12}] * 2}
    decoded = columns.decode(columns.encode(results))
    assert decoded == results and isinstance(decoded["val"][0]["examples"], int)
    with pytest.raises(ValueError, match="sections"):
        columns.encode({"val": results["val"]})
    # A metric one section does not report stays absent there; a NaN metric stays NaN.
    generative = MetricColumns(["val", "test"], ["perplexity", "generative_accuracy"])
    results = {"val": [{"perplexity": 3.0}, {"perplexity": float("nan")}],
               "test": [{"perplexity": 2.0, "generative_accuracy": 0.5}, {"perplexity": 4.0, "generative_accuracy": 0.0}]}
    decoded = generative.decode(generative.encode(results))
    assert decoded["test"] == results["test"] and decoded["val"][0] == {"perplexity": 3.0}
    assert list(decoded["val"][1]) == ["perplexity"] and math.isnan(decoded["val"][1]["perplexity"])
    with pytest.raises(ValueError, match="first evaluation"):
        columns.encode({"val": [{"accuracy": 0.5, "loss": 1.0}, None], "test": [None, None]})
