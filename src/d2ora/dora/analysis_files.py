"""Finding the analysis's inputs on disk: checkpoint folders, and how to load their base model.

A checkpoint is an adapter folder (DoRA / LoRA, PEFT format) or a dense model folder (full
fine-tuning, FT); a folder holding ``epoch-*`` subfolders stands for all of them in epoch order.
Only the folders' JSON is read here, and a pickle weight file is refused without being opened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from d2ora.dora.decomposition import AnalysisError
from d2ora.dora.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_WEIGHTS,
    AdapterFileError,
    read_adapter_config,
)

# The model class to load the base with is decided here, from what the folders say (PEFT task_type,
# config.json architectures); loading itself happens above d2ora.dora (d2ora.recipes.analyze).
#: ``--model-class`` choices -> transformers auto class name.
MODEL_CLASSES: dict[str, str] = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}

#: PEFT ``task_type`` (adapter_config.json) -> ``--model-class`` choice.
TASK_TYPE_MODEL_CLASS: dict[str, str] = {
    "SEQ_CLS": "sequence-classification",
    "CAUSAL_LM": "causal-lm",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "SEQ_2_SEQ_LM": "seq2seq-lm",
    "FEATURE_EXTRACTION": "base",
}

#: transformers ``architectures[0]`` suffix (config.json of a dense model) -> ``--model-class`` choice.
_ARCHITECTURE_MODEL_CLASS: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "masked-lm"),
    ("ForConditionalGeneration", "seq2seq-lm"),
    ("Model", "base"),
)

METHOD_DORA = "DoRA"
METHOD_LORA = "LoRA"
METHOD_FT = "FT"

_DENSE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_DENSE_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_EPOCH = re.compile(r"epoch[-_]?(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One fine-tuned checkpoint: an adapter folder (DoRA / LoRA) or a dense model folder (FT)."""

    path: Path
    label: str
    kind: str  # "adapter" or "dense"
    method: str  # DoRA, LoRA or FT
    model_class_hint: str | None = None  # from task_type / architectures, if any


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnalysisError(f"'{path}' is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AnalysisError(f"'{path}' does not hold a JSON object")
    return data


def _architecture_hint(config: dict) -> str | None:
    archs = config.get("architectures") or []
    if not archs or not isinstance(archs[0], str):
        return None
    return next((choice for suffix, choice in _ARCHITECTURE_MODEL_CLASS if archs[0].endswith(suffix)), None)


def _classify(path: Path, label: str) -> Checkpoint:
    """What kind of checkpoint ``path`` is; refuses pickle-only folders without opening them."""
    if (path / ADAPTER_CONFIG).is_file() or any((path / p).exists() for p in (ADAPTER_WEIGHTS, *PICKLE_WEIGHTS)):
        try:  # the same file checks as loading: safetensors present, pickle refused unopened
            config = read_adapter_config(path)
        except AdapterFileError as exc:
            raise AnalysisError(str(exc)) from exc
        method = METHOD_DORA if config.get("use_dora") else METHOD_LORA
        hint = TASK_TYPE_MODEL_CLASS.get(str(config.get("task_type")))
        return Checkpoint(path, label, "adapter", method, hint)
    if (path / "config.json").is_file():
        if not any((path / p).is_file() for p in _DENSE_WEIGHTS):
            pickled = next((p for p in _DENSE_PICKLES if (path / p).exists()), None)
            if pickled:
                raise AnalysisError(
                    f"'{path / pickled}' is a pickle file, which d2ora never loads (it can run code); "
                    "re-save the model with save_pretrained(safe_serialization=True)"
                )
            raise AnalysisError(f"model folder '{path}' has no model.safetensors")
        return Checkpoint(path, label, "dense", METHOD_FT, _architecture_hint(_read_json(path / "config.json")))
    raise AnalysisError(
        f"'{path}' is neither an adapter folder ({ADAPTER_CONFIG}) nor a model folder (config.json), "
        "nor holds epoch-* subfolders"
    )


def _epoch_key(path: Path) -> tuple[int, str]:
    match = _EPOCH.search(path.name)
    return (int(match.group(1)) if match else 1 << 62, path.name)


def _is_checkpoint_folder(path: Path) -> bool:
    return any((path / p).exists() for p in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *PICKLE_WEIGHTS, "config.json"))


def resolve_checkpoints(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Checkpoint]:
    """Checkpoint folders in order; a folder holding ``epoch-*`` subfolders expands to them (numeric order).

    ``labels`` (optional) name the resolved checkpoints one by one; by default a checkpoint is named
    after its folder (``parent/folder`` where two folders of one method share a name).
    """
    if not paths:
        raise AnalysisError("give at least one checkpoint folder")
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise AnalysisError(f"checkpoint '{path}' does not exist")
        if not path.is_dir():
            raise AnalysisError(f"checkpoint '{path}' is not a folder")
        if _is_checkpoint_folder(path):
            folders.append(path)
            continue
        epochs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.startswith("epoch")), key=_epoch_key)
        if not epochs:
            raise AnalysisError(
                f"'{path}' is neither an adapter folder ({ADAPTER_CONFIG}) nor a model folder (config.json), "
                "nor holds epoch-* subfolders"
            )
        folders.extend(epochs)
    if labels:
        if len(labels) != len(folders):
            raise AnalysisError(
                f"{len(labels)} --label given for {len(folders)} checkpoints "
                f"({', '.join(str(f) for f in folders[:6])}{' ...' if len(folders) > 6 else ''})"
            )
        resolved = [_classify(f, n) for f, n in zip(folders, labels)]
        keys = [(c.method, c.label) for c in resolved]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise AnalysisError(f"--label '{dup[1]}' names two {dup[0]} checkpoints; give each its own label")
        return resolved
    real = [f.resolve() for f in folders]
    twice = next((f for f, r in zip(folders, real) if real.count(r) > 1), None)
    if twice is not None:
        raise AnalysisError(f"checkpoint '{twice}' is given twice")
    resolved = [_classify(f, f.name) for f in folders]
    for rename in (lambda c: f"{c.path.parent.name}/{c.path.name}", lambda c: str(c.path)):
        keys = [(c.method, c.label) for c in resolved]
        resolved = [replace(c, label=rename(c)) if keys.count((c.method, c.label)) > 1 else c for c in resolved]
    return resolved


def resolve_base_path(base: str | Path) -> Path:
    """The base model folder, checked to exist. Presets (``minilm``) are resolved by the caller
    (``d2ora analyze`` does it): the analysis core knows folders, not where packaged models live."""
    path = Path(base)
    if not path.is_dir():
        raise AnalysisError(f"base model folder '{path}' does not exist")
    return path


def resolve_model_class(model_class: str | None, checkpoints: Sequence[Checkpoint]) -> str:
    """``--model-class`` if given, else the one the checkpoints agree on (PEFT task_type / architectures)."""
    if model_class is not None:
        if model_class not in MODEL_CLASSES:
            raise AnalysisError(f"unknown --model-class '{model_class}'; choose one of {', '.join(MODEL_CLASSES)}")
        return model_class
    hints = {c.model_class_hint for c in checkpoints if c.model_class_hint is not None}
    if len(hints) > 1:
        detail = ", ".join(f"{c.label}: {c.model_class_hint}" for c in checkpoints if c.model_class_hint)
        raise AnalysisError(f"checkpoints were trained with different model classes ({detail}); pass --model-class")
    return hints.pop() if hints else "base"
