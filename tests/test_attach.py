"""attach(): PEFT's target-name rules, freezing, modules_to_save, and one clear error per bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from d2ora import AttachError, DoRAConfig, DoRALinear, attach, detach, dora_layers, merge
from tests.conftest import load_causal, load_minilm_classifier


def peft_targets(model, **kwargs) -> set[str]:
    peft_model = get_peft_model(model, LoraConfig(r=2, **kwargs))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["mlp.down_proj"], r".*layers\.1\..*_proj"])
def test_target_names_select_what_peft_selects(tiny_llama_dir: str, targets) -> None:
    ours = load_causal(tiny_llama_dir)
    report = attach(ours, DoRAConfig(r=2, target_modules=targets))
    assert set(report.adapted) == peft_targets(load_causal(tiny_llama_dir), target_modules=targets)


def test_all_linear_skips_output_layer_and_saved_head() -> None:
    model = load_minilm_classifier()
    report = attach(model, DoRAConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in report.adapted and report.modules_to_save == ["classifier"]
    assert all(isinstance(m, DoRALinear) for m in dora_layers(model).values())
    assert len(report.adapted) == 6 * 6 + 1  # six linears per BERT layer + the pooler
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all("lora_" in n or n.startswith("classifier") for n in trainable)
    expected = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert report.trainable_params == expected
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_llama_all_linear_excludes_lm_head(tiny_llama_dir: str) -> None:
    model = load_causal(tiny_llama_dir)
    report = attach(model, DoRAConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in report.adapted and len(report.adapted) == 2 * 7


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DoRAConfig(r=2, target_modules=["query", "nonexistent"]), "no module named 'nonexistent'"),
        (DoRAConfig(r=2, target_modules=r"zzz.*"), "matches no module"),
        (DoRAConfig(r=2, target_modules=["LayerNorm"]), "is a LayerNorm"),
        (DoRAConfig(r=2, target_modules=["word_embeddings"]), "is a Embedding"),
        (DoRAConfig(r=400, target_modules=["query"]), "rank r=400 must be between 1 and 384"),
        (DoRAConfig(r=2, target_modules=["query"], modules_to_save=["head"]), "modules_to_save: no module named 'head'"),
    ],
)
def test_bad_targets_give_one_clear_error_and_leave_model_unchanged(config: DoRAConfig, message: str) -> None:
    model = load_minilm_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(AttachError, match=message):
        attach(model, config)
    assert not dora_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="r"):
        DoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        DoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="target_modules is empty"):
        DoRAConfig(target_modules=[])


def test_merge_and_detach(tiny_llama_dir: str) -> None:
    model = load_causal(tiny_llama_dir)
    ids = torch.randint(0, 128, (2, 12))
    reference = model(ids).logits
    attach(model, DoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
    for layer in dora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, reference, atol=1e-4)
    merged = merge(copy.deepcopy(model))
    assert not dora_layers(merged)
    assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    detach(model)
    assert torch.allclose(model(ids).logits, reference, atol=1e-6)
