"""QDoRA: DoRA over a bitsandbytes-quantized frozen base (NF4 and int8), against bitsandbytes' own
dequantization, dense DoRA, PEFT (both ways), a merged plain model, and per-peer layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from d2ora import (
    DoRAConfig,
    attach,
    dora_layers,
    load_adapter,
    merge_and_save,
    save_adapter,
)
from d2ora.activation_checkpointing import enable_checkpointing
from d2ora.dora import frozen_base
from d2ora.dora import math as dora_math
from d2ora.dora.frozen_base import FrozenBase, is_quantized_layer
from d2ora.dora.layer import DoRALinear
from d2ora.dora.stacked import StackedDoRALinear
from d2ora.models import ModelLoadError, load_model, quantize_linears
from tests.conftest import randomise_peft_adapter, relative_error

KINDS = ["nf4", "int8"]
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A random Llama whose in_features (64, 128) are whole NF4 blocks, so row chunks are exercised."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("qdora_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def quantized(path: str, kind: str) -> nn.Module:
    model = load_model(path, "causal_lm", quantize=kind, with_tokenizer=False).model.eval()
    # The loader keeps bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs in its own
    # inference forward (which PEFT and the unadapted layers call), so every CI machine sees one layout.
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    return model


def randomise(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def bnb_dense(layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' own full dequantization (the reference for the chunked one)."""
    if type(layer).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB  # moved to state by a forward
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb)


# ------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", KINDS)
def test_loader_quantizes_linears_but_not_the_head(llama_dir: str, kind: str) -> None:
    model = quantized(llama_dir, kind)
    names = {n for n, m in model.named_modules() if is_quantized_layer(m)}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    # By hand (the GGUF path) and by transformers' BitsAndBytesConfig: the same layers, the same bits.
    by_hand = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert set(quantize_linears(by_hand, kind, torch.float32)) == names
    # By hand too, no 4-bit layer repacks itself for AVX512-BF16 CPUs (PEFT's DoRA misreads that layout).
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in by_hand.modules())
    for name in sorted(names)[:3]:
        assert torch.equal(bnb_dense(model.get_submodule(name)), bnb_dense(by_hand.get_submodule(name)))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_takes_a_model_quantized_by_hand_as_a_quantized_one(llama_dir: str, kind: str) -> None:
    # The GGUF path quantizes by hand; PEFT must still wrap its layers with its bitsandbytes DoRA
    # layers (a plain LoRA layer over packed weights would be wrong), and at initialisation the
    # adapted model is the quantized base itself.
    reference = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    quantize_linears(reference, kind, torch.float32)
    expected = logits(reference)  # a copy: an int8 layer's first forward drops the state PEFT dequantizes from
    by_hand = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    quantize_linears(by_hand, kind, torch.float32)
    theirs = get_peft_model(by_hand, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)).eval()
    wrapped = theirs.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(wrapped).__module__ == "peft.tuners.lora.bnb"
    # int8: PEFT's 8-bit DoRA layer at initialisation is 0.6% off the int8 forward it wraps (measured
    # with bitsandbytes 0.50 / peft 0.21; the int8 path's outlier handling, not d2ora's flag).
    assert relative_error(logits(theirs), expected) < (1e-5 if kind == "nf4" else 2e-2)


def test_loader_errors_are_one_line(llama_dir: str, monkeypatch) -> None:
    with pytest.raises(ModelLoadError, match="unknown model.quantize 'fp8'"):
        load_model(llama_dir, "causal_lm", quantize="fp8", with_tokenizer=False)  # type: ignore[arg-type]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes.*pip install 'd2ora\[quantize\]'"):
        load_model(llama_dir, "causal_lm", quantize="nf4", with_tokenizer=False)


# ---------------------------------------------------------------------------------- frozen base
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_base_against_bitsandbytes(llama_dir: str, kind: str, monkeypatch) -> None:
    layer = quantized(llama_dir, kind).model.layers[0].mlp.down_proj  # 128 -> 64
    monkeypatch.setattr(frozen_base, "CHUNK_ELEMENTS", 3 * 128)  # 3 rows a chunk: 22 chunks
    base = FrozenBase.of(layer)
    assert base.quantized and base.shape == (64, 128) and len(base._chunks()) == 22
    w = bnb_dense(layer)
    assert torch.equal(base.dense(), w)
    torch.testing.assert_close(base.row_sq_norms(), (w * w).sum(-1), rtol=1e-6, atol=0)
    a = torch.randn(3, 4, 128)  # a stack of 3 A's
    torch.testing.assert_close(base.times_At(a), (a @ w.t()).transpose(-1, -2), rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 128)
    torch.testing.assert_close(base.matmul(x), layer(x), rtol=0, atol=0)  # bitsandbytes' own GEMM
    if kind == "nf4":  # NF4's GEMM is over the dequantized weight; int8 also quantizes x (LLM.int8())
        torch.testing.assert_close(base.matmul(x), F.linear(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_layer_over_quantized_base_matches_hand_computation(llama_dir: str, kind: str) -> None:
    layer = quantized(llama_dir, kind).model.layers[0].mlp.down_proj
    dora = DoRALinear(layer, r=4, alpha=8)
    with torch.no_grad():
        dora.lora_B.normal_(0, 0.05)
        dora.lora_magnitude_vector.mul_(1.1)
    w = bnb_dense(layer)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = dora(x)
    # Independent: dense norms of W0 + s·BA from bitsandbytes' dequantized W0, and the layer's own GEMM.
    a, b, s = dora.lora_A.detach(), dora.lora_B.detach(), dora.scaling
    g = dora.lora_magnitude_vector.detach() / dora_math.dense_row_norms(w, a, b, s)
    with torch.no_grad():
        expected = g * (layer(x) + s * (x @ a.t()) @ b.t())
    assert relative_error(y, expected) < 1e-5
    y.square().sum().backward()
    assert dora.lora_A.grad is not None and dora.lora_magnitude_vector.grad is not None
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow through bitsandbytes' matmul


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_peers_match_their_own_layers(llama_dir: str, kind: str) -> None:
    layer = quantized(llama_dir, kind).model.layers[0].self_attn.q_proj
    stacked = StackedDoRALinear(DoRALinear(layer, r=4, alpha=8), peers=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        stacked.lora_B.copy_(torch.randn(stacked.lora_B.shape, generator=g) * 0.05)
        stacked.lora_A.add_(torch.randn(stacked.lora_A.shape, generator=g) * 0.01)
        stacked.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(stacked.lora_magnitude_vector.shape, generator=g))
    x = torch.randn(3 * 2, 7, 64)
    y = stacked(x).reshape(3, 2, 7, 64)
    for k in range(3):
        with torch.no_grad():
            alone = stacked.peer_layer(k)(x[2 * k: 2 * k + 2])
        torch.testing.assert_close(y[k].detach(), alone, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_d2ora_qdora_adapter_loads_in_peft(llama_dir: str, kind: str, tmp_path: Path) -> None:
    ours = quantized(llama_dir, kind)
    attach(ours, DoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    randomise(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(quantized(llama_dir, kind), tmp_path).eval()
    assert relative_error(logits(ours), logits(theirs)) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_peft_qdora_adapter_loads_in_d2ora(llama_dir: str, kind: str, tmp_path: Path) -> None:
    theirs = get_peft_model(quantized(llama_dir, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    randomise_peft_adapter(theirs, seed=2)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = quantized(llama_dir, kind)
    load_adapter(ours, tmp_path)
    assert relative_error(logits(ours), logits(theirs)) < 1e-4


# ----------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", KINDS)
def test_merged_qdora_model_is_plain_and_gives_the_adapter_logits(llama_dir: str, kind: str, tmp_path: Path) -> None:
    ours = quantized(llama_dir, kind)
    attach(ours, DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))  # other layers stay 4/8-bit
    randomise(ours)
    before = logits(ours)
    merge_and_save(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(is_quantized_layer(m) for m in merged.modules())
    assert merged.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    # The live model is still the quantized adapter model, marks included.
    assert torch.equal(logits(ours), before) and ours.config.quantization_config is not None
    assert is_quantized_layer(ours.model.layers[0].self_attn.k_proj)
    # NF4's GEMM is the dequantized weight's, so the plain model is the adapter model; int8 also
    # rounds activations to 8 bits in the adapter model, which the dense merged model does not.
    assert relative_error(logits(merged), before) < (1e-5 if kind == "nf4" else 2e-2)
    layer = dora_layers(ours)["model.layers.0.self_attn.q_proj"]
    expected = dora_math.merged_weight(bnb_dense(layer.base_layer), layer.lora_A, layer.lora_B, layer.scaling,
                                       layer.lora_magnitude_vector)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)


# ------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_over_quantized_base_gives_the_same_gradients(llama_dir: str, kind: str) -> None:
    grads = []
    for checkpointed in (False, True):
        model = quantized(llama_dir, kind)
        attach(model, DoRAConfig(r=4, alpha=8, target_modules=TARGETS, init_seed=0))
        randomise(model)
        if checkpointed:
            assert enable_checkpointing(model) == 2
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 4 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ GGUF
@pytest.mark.slow
def test_gguf_model_merges_and_saves_as_plain_model(tmp_path: Path) -> None:
    """SmolLM2 from its GGUF file: transformers refuses to save a GGUF-loaded model, yet its tensors
    are dense already; the merged folder must be a plain model with the adapter's logits."""
    pytest.importorskip("gguf")
    try:
        loaded = load_model("smollm2", "causal_lm", with_tokenizer=False)
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    model = loaded.model.eval()
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    randomise(model)
    tokens = TOKENS[:1, :6]
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    merge_and_save(model, tmp_path)
    assert getattr(model, "hf_quantizer", None) is not None  # the live model keeps its marks
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert relative_error(merged(input_ids=tokens).logits, before) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_base_weights_are_dequantized_one_layer_at_a_time(llama_dir: str, kind: str, monkeypatch) -> None:
    # DoRA-exact mixing reads W0 per layer: asking for the mapping dequantizes nothing, each access
    # one layer, and every value is bitsandbytes' own dequantization.
    from d2ora.engine.peers import PeerModel

    model = quantized(llama_dir, kind)
    attach(model, DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    peer_model = PeerModel(model, peers=2)
    calls: list[int] = []
    base_class = type(FrozenBase.of(next(iter(peer_model.layers.values())).base_layer))
    original = base_class.dense
    monkeypatch.setattr(base_class, "dense", lambda self: calls.append(1) or original(self))
    weights = peer_model.base_weights()
    assert calls == [] and sorted(weights) == sorted(peer_model.layers) and len(weights) == len(peer_model.layers)
    for count, (name, layer) in enumerate(peer_model.layers.items(), start=1):
        w0 = weights[name]
        assert len(calls) == count
        torch.testing.assert_close(w0, bnb_dense(layer.base_layer).to(w0.dtype), rtol=0, atol=0)
