"""PEFT-compatible adapter files: save, load (ours and PEFT's), and merge into a dense model folder.

Format (what PEFT 0.21 writes for ``LoraConfig(use_dora=True)``):
  - ``adapter_config.json``: ``peft_type: LORA``, ``use_dora``, ``r``, ``lora_alpha``, ``target_modules`` ...
  - ``adapter_model.safetensors``: ``base_model.model.<path>.lora_A.weight`` (r x in),
    ``.lora_B.weight`` (out x r), ``.lora_magnitude_vector`` (out,) and the full weights of
    ``modules_to_save`` as ``base_model.model.<path>.<param>``.

Only safetensors is read: a pickle file (``adapter_model.bin``) is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from d2ora import atomic
from d2ora.dora.attach import (
    AttachReport,
    attach,
    attached_config,
    count_params,
    dora_layers,
    name_matches,
    resolve_modules_to_save,
    set_submodule,
)
from d2ora.dora.config import DoRAConfig
from d2ora.dora.frozen_base import dense_linear, is_quantized_layer
from d2ora.dora.layer import SUPPORTED_BASE_TYPES, DoRALinear, base_shape
from d2ora.dora.math import lora_scaling

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"
_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read or does not fit the model; the model is left unchanged."""


# ------------------------------------------------------------------------------------------------ save
def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _portable_target_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """Leaf names (``["query", "value"]``) when they select exactly the adapted layers, else full names.

    Leaf names are what people write and survive a different prefix; full names are the fallback
    that PEFT still matches exactly (``key == target``).
    """
    leaves = sorted({name.rpartition(".")[2] for name in adapted})
    selected = {n for n, _ in model.named_modules() if n and any(name_matches(n, leaf) for leaf in leaves)}
    return leaves if selected == set(adapted) else sorted(adapted)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (contiguous CPU copies)."""
    config = attached_config(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in dora_layers(model).items():
        tensors[f"{KEY_PREFIX}{name}{_LORA_A}"] = layer.lora_A
        tensors[f"{KEY_PREFIX}{name}{_LORA_B}"] = layer.lora_B
        if layer.use_dora:
            tensors[f"{KEY_PREFIX}{name}{_MAGNITUDE[0]}"] = layer.lora_magnitude_vector
    for name in resolve_modules_to_save(model, config.modules_to_save):
        for pname, param in model.get_submodule(name).named_parameters():
            tensors[f"{KEY_PREFIX}{name}.{pname}"] = param
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None, task_type: str | None) -> dict:
    config = attached_config(model)
    layers = dora_layers(model)
    adapted = list(layers)
    rank_pattern = {n: layer.r for n, layer in layers.items() if layer.r != config.r}
    alpha_pattern = {n: layer.alpha for n, layer in layers.items() if layer.alpha != config.alpha}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _infer_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _portable_target_names(model, adapted),
        "modules_to_save": list(config.modules_to_save or []) or None,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        "library": "d2ora",
    }


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT's ``from_pretrained`` loads.

    Each file is written atomically; other files already in ``directory`` are left alone.
    """
    directory = Path(directory)
    tensors = adapter_state(model)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        # Refuse rather than overwrite a good adapter with a diverged one.
        raise AdapterFileError(f"not saving to '{directory}': '{bad[0]}' holds non-finite values (NaN/inf)")
    config = adapter_config_dict(model, base_model_name_or_path, task_type)
    config.pop("library")  # PEFT's LoraConfig rejects unknown keys; the metadata below records it
    with atomic.atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "library": "d2ora"})
    atomic.write_json(directory / ADAPTER_CONFIG, config)
    return directory


# ------------------------------------------------------------------------------------------------ read
def read_adapter_config(directory: str | Path) -> dict:
    """Check an adapter folder's files (safetensors weights present, never pickle) and return its
    LoRA-type ``adapter_config.json``; no tensor is read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder '{directory}' does not exist")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p for p in PICKLE_WEIGHTS if (directory / p).exists()]
        if pickled:
            raise AdapterFileError(
                f"'{directory / pickled[0]}' is a pickle file, which d2ora never loads (it can run code); "
                f"re-save it as {ADAPTER_WEIGHTS} (e.g. PEFT's save_pretrained(safe_serialization=True))"
            )
        raise AdapterFileError(f"'{directory}' has no {ADAPTER_WEIGHTS}")
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"'{directory}' has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"'{config_path}' is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"'{config_path}': peft_type must be 'LORA', got {config.get('peft_type')!r}")
    return config


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter folder: safetensors only, every tensor finite, a LoRA-type config."""
    config = read_adapter_config(directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"'{weights}' is not a readable safetensors file: {exc}") from exc
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"'{weights}': tensor '{key}' holds NaN or infinite values")
    return config, tensors


@dataclass
class AdapterLayerTensors:
    """One module's tensors from a file; ``r`` and ``alpha`` are filled in once checked."""

    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    r: int = 0
    alpha: float = 0.0


@dataclass
class CheckedAdapter:
    """An adapter folder validated against a model: every tensor present, finite, and of the right shape."""

    source: str
    config: dict
    use_dora: bool
    use_rslora: bool
    layers: dict[str, AdapterLayerTensors] = field(default_factory=dict)
    saved_params: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module path>.<param>"

    def scaling(self, name: str) -> float:
        layer = self.layers[name]
        return lora_scaling(layer.alpha, layer.r, self.use_rslora)


def _parse_keys(tensors: dict[str, torch.Tensor], checked: CheckedAdapter) -> None:
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(f"{checked.source}: key '{key}' does not start with '{KEY_PREFIX}'")
        rest = key[len(KEY_PREFIX):]
        if rest.endswith(_LORA_A):
            checked.layers.setdefault(rest[: -len(_LORA_A)], AdapterLayerTensors()).lora_a = tensor
        elif rest.endswith(_LORA_B):
            checked.layers.setdefault(rest[: -len(_LORA_B)], AdapterLayerTensors()).lora_b = tensor
        elif rest.endswith(_MAGNITUDE):
            suffix = next(s for s in _MAGNITUDE if rest.endswith(s))
            checked.layers.setdefault(rest[: -len(suffix)], AdapterLayerTensors()).magnitude = tensor
        elif ".lora_" in rest:
            raise AdapterFileError(
                f"{checked.source}: '{key}' is a LoRA feature d2ora does not support (embedding/bias adapters)"
            )
        else:
            checked.saved_params[rest] = tensor
    if not checked.layers:
        raise AdapterFileError(f"{checked.source}: no lora_A / lora_B tensors found")


def pattern_key(name: str, patterns: dict | None) -> str | None:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a module whose name ends with it."""
    return next((key for key in patterns or {} if re.match(rf"(.*\.)?({key})$", name)), None)


def pattern_value(name: str, patterns: dict | None, default):
    """The pattern's value for ``name`` (see :func:`pattern_key`), else ``default``."""
    key = pattern_key(name, patterns)
    return default if key is None else patterns[key]


def _check_rank(name: str, tensor_rank: int, file_config: dict, source: str) -> None:
    """The rank adapter_config.json gives ``name`` (``rank_pattern``, else ``r``) must be the tensors'.

    PEFT builds each layer at the config's rank and then fails to copy tensors of another shape
    into it; a file that says one rank and holds another is inconsistent, whoever wrote it.
    """
    patterns = file_config.get("rank_pattern")
    key = pattern_key(name, patterns)
    declared, origin = (file_config.get("r"), "r") if key is None else (patterns[key], f"rank_pattern['{key}']")
    if declared is None:  # no r at all: the tensors are the only word on the rank
        return
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise AdapterFileError(f"{source}: {origin} for '{name}' must be a positive integer, got {declared!r}")
    if declared != tensor_rank:
        raise AdapterFileError(
            f"{source}: adapter_config.json gives '{name}' {origin}={declared}, "
            f"but its lora_A / lora_B tensors have rank {tensor_rank}"
        )


def _check_layer(name: str, base: nn.Module, t: AdapterLayerTensors, use_dora: bool, source: str) -> int:
    if t.lora_a is None or t.lora_b is None:
        missing = "lora_A" if t.lora_a is None else "lora_B"
        raise AdapterFileError(f"{source}: module '{name}' has no {missing} weight")
    if use_dora and t.magnitude is None:
        raise AdapterFileError(f"{source}: use_dora is true but '{KEY_PREFIX}{name}.lora_magnitude_vector' is missing")
    out_f, in_f = base_shape(base)
    r = t.lora_a.shape[0] if t.lora_a.dim() == 2 else -1
    expected = {"lora_A": (r, in_f), "lora_B": (out_f, r), "lora_magnitude_vector": (out_f,)}
    actual = {"lora_A": tuple(t.lora_a.shape), "lora_B": tuple(t.lora_b.shape)}
    if t.magnitude is not None:
        actual["lora_magnitude_vector"] = tuple(t.magnitude.shape)
    for what, shape in actual.items():
        if shape != expected[what] or r < 1:
            raise AdapterFileError(
                f"{source}: {what} of '{name}' has shape {list(shape)}, but the model's layer "
                f"({in_f} -> {out_f}) needs {list(expected[what])}"
            )
    return r


def check_adapter(model: nn.Module, directory: str | Path, *, check_saved_modules: bool = True) -> CheckedAdapter:
    """Read an adapter folder and check it fits ``model`` (module names, shapes, values); touches nothing.

    ``check_saved_modules=False`` skips the full-weight modules (e.g. a classification head whose
    size depends on the task), for readers that only need the adapted layers.
    """
    directory = Path(directory)
    file_config, tensors = read_adapter(directory)
    checked = CheckedAdapter(
        source=str(directory),
        config=file_config,
        use_dora=bool(file_config.get("use_dora", False)),
        use_rslora=bool(file_config.get("use_rslora", False)),
    )
    _parse_keys(tensors, checked)
    source = checked.source
    modules = dict(model.named_modules())
    for name, t in checked.layers.items():
        module = modules.get(name)
        if module is None:
            raise AdapterFileError(
                f"{source}: module '{name}' is not in {type(model).__name__} "
                "(a different base model, or a different model class than the adapter was trained with)"
            )
        base = module.base_layer if isinstance(module, DoRALinear) else module
        if not isinstance(base, SUPPORTED_BASE_TYPES):
            raise AdapterFileError(f"{source}: module '{name}' is a {type(base).__name__}, not Linear/Conv1D")
        t.r = _check_layer(name, base, t, checked.use_dora, source)
        _check_rank(name, t.r, file_config, source)

    r_default = int(file_config.get("r") or next(iter(checked.layers.values())).r)
    alpha_default = file_config.get("lora_alpha", r_default)
    for name, t in checked.layers.items():
        alpha = pattern_value(name, file_config.get("alpha_pattern"), alpha_default)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise AdapterFileError(f"{source}: lora_alpha for '{name}' must be a positive number, got {alpha!r}")
        t.alpha = float(alpha)

    params = dict(model.named_parameters(remove_duplicate=False))
    for pname, tensor in checked.saved_params.items() if check_saved_modules else ():
        if pname not in params:
            raise AdapterFileError(f"{source}: saved module parameter '{pname}' is not in {type(model).__name__}")
        if tuple(params[pname].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{source}: '{pname}' has shape {list(tensor.shape)}, the model's has {list(params[pname].shape)}"
            )
    return checked


def load_adapter(model: nn.Module, directory: str | Path, *, as_dora: bool | None = None) -> AttachReport:
    """Load an adapter folder (d2ora's or PEFT's) into ``model``; attaches the layers if needed.

    ``as_dora=None`` follows the file; ``as_dora=True`` loads a plain LoRA adapter as DoRA with the
    magnitude set to ``||W0 + s·BA||_c`` (so the model computes exactly what the LoRA did).
    Everything is checked before the model is touched: on any error the model is unchanged.
    """
    checked = check_adapter(model, directory)
    source = checked.source
    use_dora = checked.use_dora if as_dora is None else as_dora
    if checked.use_dora and not use_dora:
        raise AdapterFileError(f"{source}: a DoRA adapter cannot be loaded as plain LoRA (its magnitude would be lost)")
    ranks = {n: t.r for n, t in checked.layers.items()}
    alphas = {n: t.alpha for n, t in checked.layers.items()}
    saved_modules = sorted({pname.rpartition(".")[0] for pname in checked.saved_params})

    existing = dora_layers(model)
    if existing:
        _check_matches_attached(existing, checked, use_dora)
    else:
        config = DoRAConfig(
            r=int(checked.config.get("r") or next(iter(ranks.values()))),
            alpha=float(checked.config.get("lora_alpha") or next(iter(alphas.values()))),
            dropout=float(checked.config.get("lora_dropout") or 0.0),
            target_modules=sorted(ranks),
            modules_to_save=saved_modules,
            use_rslora=checked.use_rslora,
            use_dora=use_dora,
        )
        attach(model, config, ranks=ranks, alphas=alphas)

    layers = dora_layers(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in checked.layers.items():
            layer = layers[name]
            layer.lora_A.copy_(t.lora_a)
            layer.lora_B.copy_(t.lora_b)
            if use_dora:
                # A LoRA file has no magnitude: m = ||W0 + s·BA||_c makes g = 1, the LoRA model exactly.
                layer.lora_magnitude_vector.copy_(t.magnitude if t.magnitude is not None else layer.row_norms())
        for pname, tensor in checked.saved_params.items():
            params[pname].copy_(tensor)
    trainable, total = count_params(model)
    return AttachReport(sorted(ranks), saved_modules, trainable, total, "dora" if use_dora else "lora", ranks)


def _check_matches_attached(existing: dict[str, DoRALinear], checked: CheckedAdapter, use_dora: bool) -> None:
    source = checked.source
    if set(existing) != set(checked.layers):
        extra = sorted(set(checked.layers) - set(existing))[:3]
        missing = sorted(set(existing) - set(checked.layers))[:3]
        raise AdapterFileError(
            f"{source}: the adapter's layers differ from those attached to the model "
            f"(in file only: {extra}, in model only: {missing})"
        )
    for name, layer in existing.items():
        t = checked.layers[name]
        if layer.r != t.r or layer.use_dora != use_dora:
            raise AdapterFileError(
                f"{source}: module '{name}' is attached with r={layer.r}, use_dora={layer.use_dora}; "
                f"the file has r={t.r}, use_dora={use_dora}"
            )
        if layer.alpha != t.alpha or layer.use_rslora != checked.use_rslora:
            raise AdapterFileError(f"{source}: module '{name}' is attached with a different alpha / rsLoRA setting")


# ------------------------------------------------------------------------------------------------ merge
def _in_base_dtype(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, object]:
    """``save_pretrained``'s ``state_dict`` with every float tensor in a half-precision base's dtype.

    Over a bf16 / fp16 base the saved heads (``modules_to_save``) are fp32 masters; the merged model
    is served in the base's dtype, so it is saved in it (one dtype, as its config says). Nothing
    for an fp32 base: the save stays exactly what it was."""
    dtype = next(iter(layers.values())).frozen.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return {}
    # .to() returns the same tensor where the dtype already matches, so tied weights stay shared.
    return {"state_dict": {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}}


# What transformers hangs on a model it loaded quantized (bitsandbytes) or from a GGUF file; the
# quantizer refuses save_pretrained ("... is not serializable") and a saved quantization_config
# would make the merged folder load quantized again. Mirrors HfQuantizer.remove_quantization_config.
_QUANTIZER_ATTRS = ("hf_quantizer", "quantization_method", "is_quantized", "is_loaded_in_4bit",
                    "is_loaded_in_8bit", "_weight_conversions")


@contextlib.contextmanager
def _as_plain_model(model: nn.Module) -> Iterator[None]:
    """While saving, ``model`` carries no quantizer marks; they all come back afterwards, so the
    live (still quantized or GGUF-loaded) model keeps working."""
    config = getattr(model, "config", None)
    held = {k: model.__dict__.pop(k) for k in _QUANTIZER_ATTRS if k in model.__dict__}
    held_config = config.__dict__.pop("quantization_config", None) if config is not None else None
    try:
        yield
    finally:
        model.__dict__.update(held)
        if held_config is not None:
            config.quantization_config = held_config


def _dense_swaps(model: nn.Module, layers: dict[str, DoRALinear]) -> dict[str, nn.Module]:
    """Each adapted layer's merged dense layer, and a dequantized dense copy of every other
    bitsandbytes layer (those no adapter targets), so the saved model is plain throughout."""
    swaps: dict[str, nn.Module] = {name: layer.merge() for name, layer in layers.items()}
    for name, module in model.named_modules():
        if is_quantized_layer(module) and not any(name == n or name.startswith(n + ".") for n in layers):
            swaps[name] = dense_linear(module)
    return swaps


def merge_and_save(model: nn.Module, directory: str | Path, *, tokenizer=None) -> Path:
    """Save a dense model folder with every adapter merged (W' = g·(W0 + s·BA)).

    The folder loads with ``AutoModel*.from_pretrained`` and no d2ora installed. ``model`` itself is
    left as it was (merged layers are swapped in only for the save). Written into a staging folder
    first, then moved in file by file, so an interrupted save never leaves a half-written model.

    A quantized base (bitsandbytes NF4 / int8) is dequantized and saved unquantized in its base
    dtype; a model transformers loaded from a GGUF file (already de-quantized to dense tensors) is
    saved as a plain model too.
    """
    layers = dora_layers(model)
    if not layers:
        raise AdapterFileError(f"{type(model).__name__} has no d2ora adapter to merge")
    if not hasattr(model, "save_pretrained"):
        raise AdapterFileError(f"{type(model).__name__} is not a transformers model (no save_pretrained)")
    directory = Path(directory)
    swaps = _dense_swaps(model, layers)
    originals = {name: model.get_submodule(name) for name in swaps}
    with atomic.staging_folder(directory) as staged:
        try:
            for name, module in swaps.items():
                set_submodule(model, name, module)
            with _as_plain_model(model):
                model.save_pretrained(staged, safe_serialization=True, **_in_base_dtype(model, layers))
        finally:
            for name, module in originals.items():
                set_submodule(model, name, module)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return directory
