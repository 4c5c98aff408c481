"""Adapter files: d2ora -> PEFT and PEFT -> d2ora round trips, dense merges, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from d2ora import (
    AdapterFileError,
    DoRAConfig,
    attach,
    dora_layers,
    load_adapter,
    merge_and_save,
    save_adapter,
)
from tests.conftest import load_causal, load_minilm_classifier, minilm_path, randomise_peft_adapter, relative_error

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def randomise_adapter(model, seed: int = 0) -> None:
    """Move B and m away from their start values so the adapter really changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            if layer.use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


# -------------------------------------------------------------------------------- model families
def minilm_case():
    return load_minilm_classifier, DoRAConfig(r=4, alpha=8, target_modules=["query", "value", "dense"],
                                              modules_to_save=["classifier"])


def causal_case(path: str, targets):
    return (lambda: load_causal(path)), DoRAConfig(r=4, alpha=8, target_modules=targets, use_rslora=True)


@pytest.fixture(params=["minilm", "llama", "gpt2"])
def family(request, tiny_llama_dir, tiny_gpt2_dir):
    if request.param == "minilm":
        return minilm_case()
    if request.param == "llama":
        return causal_case(tiny_llama_dir, "all-linear")
    return causal_case(tiny_gpt2_dir, ["c_attn", "c_proj", "c_fc"])


@pytest.mark.parametrize("use_dora", [True, False])
def test_d2ora_adapter_loads_in_peft_with_same_logits(family, tmp_path: Path, use_dora: bool) -> None:
    load_model, config = family
    config = config.model_copy(update={"use_dora": use_dora})
    ours = load_model()
    attach(ours, config)
    randomise_adapter(ours)
    if config.modules_to_save:
        torch.nn.init.normal_(ours.classifier.weight, std=0.5)
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is use_dora

    theirs = PeftModel.from_pretrained(load_model(), tmp_path).eval()
    assert relative_error(logits(theirs), logits(ours)) < 1e-5
    assert relative_error(logits(load_model()), logits(ours)) > 1e-3  # the adapter does change the outputs
    theirs_layers = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")}
    assert len(theirs_layers) == len(dora_layers(ours))


def test_peft_dora_adapter_loads_in_d2ora_with_same_logits(family, tmp_path: Path) -> None:
    load_model, config = family
    is_gpt2 = isinstance(config.target_modules, list) and "c_attn" in config.target_modules
    theirs = get_peft_model(load_model(), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, use_rslora=config.use_rslora, target_modules=config.target_modules,
        modules_to_save=config.modules_to_save or None, fan_in_fan_out=is_gpt2,
    ))
    randomise_peft_adapter(theirs, seed=1)
    theirs.eval().save_pretrained(tmp_path)

    ours = load_model()
    untouched = logits(ours)
    report = load_adapter(ours, tmp_path)
    assert report.method == "dora"
    assert relative_error(logits(ours), logits(theirs)) < 1e-5
    assert relative_error(untouched, logits(ours)) > 1e-3


def save_with_nonzero_lora_b(peft_model, folder: Path) -> None:
    """PEFT initialises B to zero (the adapter would be a no-op): give it values, then save."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.eval().save_pretrained(folder)


def test_peft_lora_adapter_loads_as_dora_with_magnitude_from_norms(tiny_llama_dir: str, tmp_path: Path) -> None:
    theirs = get_peft_model(load_causal(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    save_with_nonzero_lora_b(theirs, tmp_path)

    ours = load_causal(tiny_llama_dir)
    load_adapter(ours, tmp_path, as_dora=True)
    assert relative_error(logits(ours), logits(theirs)) < 1e-5
    for layer in dora_layers(ours).values():
        dense = torch.linalg.norm(layer.weight0 + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
        assert torch.allclose(layer.lora_magnitude_vector, dense, rtol=1e-6)


def test_merge_and_save_loads_without_d2ora(tmp_path: Path) -> None:
    ours = load_minilm_classifier()
    attach(ours, DoRAConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    randomise_adapter(ours)
    merge_and_save(ours, tmp_path / "merged")
    assert dora_layers(ours), "merge_and_save must leave the model it was given as it was"
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    dense = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert relative_error(logits(dense), logits(ours)) < 1e-5


def test_merge_and_save_causal_lm(tiny_gpt2_dir: str, tmp_path: Path) -> None:
    ours = load_causal(tiny_gpt2_dir)
    attach(ours, DoRAConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomise_adapter(ours)
    merge_and_save(ours, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert relative_error(logits(dense), logits(ours)) < 1e-5


# -------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_saved_files_get_the_umask_mode(tiny_gpt2_dir: str, tmp_path: Path, umask_022) -> None:
    """Adapters and merged models are written via temporary files; they must end up as a plain write would."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644  # 0o666 & ~0o022, as the OS applies it to open()
    model = load_causal(tiny_gpt2_dir)
    attach(model, DoRAConfig(r=4, target_modules=["c_attn"]))
    randomise_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    merge_and_save(model, tmp_path / "out" / "merged")
    files = [*(tmp_path / "adapter").iterdir(), *(tmp_path / "out" / "merged").iterdir()]
    assert {"adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json"} <= {f.name for f in files}
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}
    for folder in (tmp_path / "adapter", tmp_path / "out", tmp_path / "out" / "merged"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]  # no staging folder left


# -------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved_llama_adapter(tiny_llama_dir: str, tmp_path: Path) -> Path:
    model = load_causal(tiny_llama_dir)
    attach(model, DoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_adapter(model)
    return save_adapter(model, tmp_path / "adapter")


def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def break_magnitude(tensors):
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    del tensors[key]


def break_shape(tensors):
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 7)


def break_finite(tensors):
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")


def break_module(tensors):
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key.replace("q_proj", "no_such_proj")] = tensors.pop(key)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (break_magnitude, "use_dora is true but .*lora_magnitude_vector' is missing"),
        (break_shape, r"lora_A of '.*q_proj' has shape \[4, 7\], but the model's layer \(64 -> 64\) needs \[4, 64\]"),
        (break_finite, "holds NaN or infinite values"),
        (break_module, "no_such_proj' is not in LlamaForCausalLM"),
    ],
)
def test_bad_adapter_tensors_leave_model_unchanged(tiny_llama_dir, saved_llama_adapter, edit, message) -> None:
    rewrite_tensors(saved_llama_adapter, edit)
    model = load_causal(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(model, saved_llama_adapter)
    assert not dora_layers(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    assert not dora_layers(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # r = 2 in the config, rank 4 in every layer's tensors: the first layer read is named.
        ({"r": 2}, r"adapter_config.json gives 'model\.layers\.\d+\.self_attn\.[qv]_proj' r=2, "
                   r"but its lora_A / lora_B tensors have rank 4"),
        # Only the v_proj layers are said to be rank 8; q_proj (r = 4) still agrees.
        ({"rank_pattern": {"v_proj": 8}}, r"adapter_config.json gives 'model\.layers\.\d+\.self_attn\.v_proj' "
                                          r"rank_pattern\['v_proj'\]=8, but its lora_A / lora_B tensors have rank 4"),
    ],
)
def test_config_rank_that_disagrees_with_the_tensors_is_refused(tiny_llama_dir, saved_llama_adapter, edit, message) -> None:
    config_path = saved_llama_adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    # The reference: PEFT 0.21 builds the layers at the config's rank and refuses the tensors.
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_causal(tiny_llama_dir), saved_llama_adapter)
    model = load_causal(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(model, saved_llama_adapter)
    assert_unchanged(model, before)


def test_peft_rank_pattern_that_agrees_is_loaded(tiny_llama_dir: str, tmp_path: Path) -> None:
    """The other side of the rank check: PEFT's own per-layer ranks load, with PEFT's outputs."""
    theirs = get_peft_model(load_causal(tiny_llama_dir), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    save_with_nonzero_lora_b(theirs, tmp_path)
    ours = load_causal(tiny_llama_dir)
    report = load_adapter(ours, tmp_path)
    assert len(report.per_module_rank) == 4  # q_proj and v_proj in 2 layers
    assert {(n.rpartition(".")[2], r) for n, r in report.per_module_rank.items()} == {("q_proj", 4), ("v_proj", 2)}
    assert relative_error(logits(ours), logits(theirs)) < 1e-5


def test_pickle_file_is_refused(tiny_llama_dir, saved_llama_adapter) -> None:
    (saved_llama_adapter / "adapter_model.safetensors").rename(saved_llama_adapter / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="is a pickle file, which d2ora never loads"):
        load_adapter(load_causal(tiny_llama_dir), saved_llama_adapter)


def test_corrupt_safetensors_is_refused(tiny_llama_dir, saved_llama_adapter) -> None:
    path = saved_llama_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapter(load_causal(tiny_llama_dir), saved_llama_adapter)


def test_wrong_peft_type_and_missing_folder(tiny_llama_dir, saved_llama_adapter, tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(load_causal(tiny_llama_dir), tmp_path / "missing")
    config_path = saved_llama_adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="peft_type must be 'LORA'"):
        load_adapter(load_causal(tiny_llama_dir), saved_llama_adapter)


def test_failed_saves_keep_the_earlier_adapter(tiny_llama_dir, saved_llama_adapter, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in saved_llama_adapter.iterdir()}
    model = load_causal(tiny_llama_dir)
    load_adapter(model, saved_llama_adapter)
    with torch.no_grad():
        next(iter(dora_layers(model).values())).lora_B.fill_(float("inf"))
    with pytest.raises(AdapterFileError, match="non-finite"):
        save_adapter(model, saved_llama_adapter)

    with torch.no_grad():
        next(iter(dora_layers(model).values())).lora_B.fill_(0.5)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("d2ora.dora.files.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, saved_llama_adapter)
    after = {p.name: p.read_bytes() for p in saved_llama_adapter.iterdir()}
    assert after == before  # same files, same bytes, no temporary files left behind


def test_loading_into_a_differently_attached_model_is_refused(tiny_llama_dir, saved_llama_adapter) -> None:
    model = load_causal(tiny_llama_dir)
    attach(model, DoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match="attached with r=2"):
        load_adapter(model, saved_llama_adapter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_saved_target_names_are_portable(tmp_path: Path) -> None:
    model = load_minilm_classifier()
    attach(model, DoRAConfig(r=2, target_modules=r".*layer\.0\.attention\.self\.query"))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # "query" alone would select all six layers, so the exact name is written instead.
    assert config["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]
    shutil.rmtree(tmp_path)
    model = load_minilm_classifier()
    attach(model, DoRAConfig(r=2, target_modules=["query", "key"]))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["key", "query"]
    assert minilm_path() in json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
