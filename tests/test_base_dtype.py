"""``model.base_dtype``: a bf16 frozen base with fp32 master adapters, checked against independent
references: PEFT's DoRA layer on the same bf16 base, a float64 dense row norm, and the same step
on an fp32 base."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaForSequenceClassification

from d2ora import DoRAConfig, attach
from d2ora.config_io import ConfigError, load_config
from d2ora.data.tasks import ClassificationTask
from d2ora.dora.layer import DoRALinear
from d2ora.dora.stacked import StackedDoRALinear
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.peers import PeerModel
from d2ora.models import base_autocast, frozen_dtype, keep_masters_fp32, resolve_base_dtype
from d2ora.recipes.sections import ModelSection
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.recipes.train import TrainConfig
from tests.conftest import relative_error
from tests.test_layer import OneLayer, peft_and_d2ora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

BF16_TOL = 3e-2  # a few bf16 ulps (2^-8 relative) accumulated over a tiny model (measured: <= 1e-2)
LAYER_TOL = 1.5e-2  # one layer (measured: about 4e-3 for both d2ora and PEFT against float64)
R, ALPHA = 4, 8.0


def bf16_base(in_f: int = 48, out_f: int = 40) -> OneLayer:
    torch.manual_seed(1)
    return OneLayer(nn.Linear(in_f, out_f)).to(torch.bfloat16)


def peft_and_d2ora_bf16() -> tuple[nn.Module, nn.Module, DoRALinear]:
    """The same bf16 base wrapped by PEFT's DoRA and by d2ora, with equal nonzero fp32 adapters."""
    return peft_and_d2ora("linear", False, r=R, alpha=ALPHA, base=bf16_base())


# --- 1. against PEFT on the same bf16 base --------------------------------------------------------
def test_bf16_base_matches_peft_and_keeps_fp32_masters() -> None:
    peft_model, peft_layer, ours = peft_and_d2ora_bf16()
    assert ours.base_layer.weight.dtype == torch.bfloat16
    for p in (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector):
        assert p.dtype == torch.float32 and p.requires_grad
    assert ours.w0_row_sq.dtype == torch.float32
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = peft_model(x)
        actual = ours(x)
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual.float(), expected.float()) < LAYER_TOL
    (expected.float() ** 2).sum().backward()
    (actual.float() ** 2).sum().backward()
    pairs = {
        "A": (ours.lora_A, peft_layer.lora_A["default"].weight),
        "B": (ours.lora_B, peft_layer.lora_B["default"].weight),
        "m": (ours.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight),
    }
    for name, (mine, theirs) in pairs.items():
        assert mine.grad is not None and mine.grad.dtype == torch.float32, name
        assert relative_error(mine.grad, theirs.grad.float()) < LAYER_TOL, name


# --- 2. row norms in fp32 against a float64 dense reference --------------------------------------
def dense_reference(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.linalg.vector_norm(w0.double() + scaling * (b.double() @ a.double()), dim=-1)


@pytest.mark.parametrize("under_autocast", [False, True])
def test_row_norms_on_bf16_base_are_fp32_exact(under_autocast: bool) -> None:
    layer = DoRALinear(bf16_base().proj, r=R, alpha=ALPHA, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    stacked = StackedDoRALinear(layer, peers=2)
    with torch.no_grad():
        stacked.lora_B[1].mul_(-2.0)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if under_autocast else torch.autocast("cpu", enabled=False)
    with context:  # autocast would run matmuls in bf16: the norms must not follow it
        single, both = layer.row_norms(), stacked.row_norms()
    assert single.dtype == both.dtype == torch.float32
    expected = dense_reference(layer.weight0, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(single.double(), expected, rtol=1e-5, atol=1e-6)
    for k in range(2):
        expected_k = dense_reference(layer.weight0, stacked.lora_A[k], stacked.lora_B[k], layer.scaling)
        torch.testing.assert_close(both[k].double(), expected_k, rtol=1e-5, atol=1e-6)


# --- 3. a LocalTrainer step on a bf16 base --------------------------------------------------------
PEERS, LABELS = 2, 3
CLS_CONFIG = DoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["score"], init_seed=0)
TASK = ClassificationTask(label_names=["a", "b", "c"])
TOKENIZER = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)


def peers_on(path: str, dtype: torch.dtype) -> PeerModel:
    """The recipe's order: load in the base dtype, attach, keep the saved head fp32, stack."""
    model = LlamaForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
    report = attach(model, CLS_CONFIG)
    keep_masters_fp32(model, report.modules_to_save)
    peers = PeerModel(model, PEERS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero B and a shared fp32 head: both bases start from the same masters
        for layer in peers.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        for head in peers.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return peers


def features() -> list[list[dict[str, Any]]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for k in range(PEERS):
        rows = []
        for i in range(3):
            n = 3 + (2 * k + 3 * i) % 6
            rows.append({"input_ids": torch.randint(1, 64, (n,), generator=g).tolist(), "attention_mask": [1] * n,
                         "labels": (k + i) % LABELS})
        out.append(rows)
    return out


def test_local_step_on_bf16_base_trains_fp32_masters_close_to_fp32_base(tiny_classifier_dir: str) -> None:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        peers = peers_on(tiny_classifier_dir, dtype)
        assert frozen_dtype(peers.model) == dtype
        trainer = LocalTrainer(peers, TASK, TASK.collator(TOKENIZER), lr=1e-2, total_steps=2, max_grad_norm=None)
        params = trainer.params
        assert all(p.dtype == torch.float32 for p in params)  # m, A, B and the head: fp32 masters
        before = [p.detach().clone() for p in params]
        losses = trainer.step(features())
        grads = [p.grad.detach().clone() for p in params]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert all(g.abs().sum() > 0 for g in grads)  # the gradient reached every master
        assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))  # and AdamW moved it
        assert torch.isfinite(losses).all()
        results[dtype] = (losses, grads)
    (loss32, grads32), (loss16, grads16) = results[torch.float32], results[torch.bfloat16]
    torch.testing.assert_close(loss16, loss32, rtol=BF16_TOL, atol=BF16_TOL)
    flat32 = torch.cat([g.flatten() for g in grads32])
    flat16 = torch.cat([g.flatten() for g in grads16])
    assert relative_error(flat16, flat32) < 5e-2  # bf16 activations, fp32 masters


def test_fp32_base_gets_no_autocast(tiny_classifier_dir: str) -> None:
    model = LlamaForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    attach(model, CLS_CONFIG)
    with base_autocast(model, "cpu"):
        assert not torch.is_autocast_enabled("cpu")  # fp32 results stay bit for bit as before


def test_merge_of_bf16_base_saves_in_bf16(tiny_classifier_dir: str, tmp_path) -> None:
    from safetensors import safe_open

    from d2ora.dora.files import merge_and_save

    model = LlamaForSequenceClassification.from_pretrained(tiny_classifier_dir, dtype=torch.bfloat16).eval()
    report = attach(model, CLS_CONFIG)
    keep_masters_fp32(model, report.modules_to_save)
    with torch.no_grad():
        for name in report.adapted:
            model.get_submodule(name).lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad(), base_autocast(model, "cpu"):
        unmerged = model(input_ids=ids).logits.float()
    merge_and_save(model, tmp_path / "merged")
    assert model.score.weight.dtype == torch.float32  # the save cast a copy, not the master
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merged = LlamaForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.score.weight.dtype == torch.bfloat16
    with torch.no_grad():
        served = merged(input_ids=ids).logits.float()
    assert relative_error(served, unmerged) < BF16_TOL


# --- 4. auto resolves to fp32 on a CPU ------------------------------------------------------------
def test_auto_is_fp32_on_cpu() -> None:
    assert ModelSection().base_dtype == "auto"
    assert resolve_base_dtype("auto", "cpu") == torch.float32
    assert resolve_base_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_base_dtype("fp16", "cpu") == torch.float16
    assert resolve_base_dtype("fp32", "cuda") == torch.float32


# --- 5. an unknown dtype is refused with one line -------------------------------------------------
@pytest.mark.parametrize("config_cls", [SimulateConfig, TrainConfig])
def test_unknown_base_dtype_is_refused_in_one_line(config_cls: type) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_cls, None, ["model.base_dtype=fp8"])
    message = str(caught.value)
    assert "\n" not in message and len(caught.value.problems) == 1
    assert "model.base_dtype (from the command line)" in message and "'fp8'" in message
    assert "bf16" in message  # the allowed values are named
