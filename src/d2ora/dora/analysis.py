"""Weight-decomposition analysis (DoRA paper, arXiv 2402.09353, §3 and Fig. 2).

For every adapted (or fine-tuned) layer and checkpoint it splits the change of the weight into a
magnitude part and a direction part, with rows = output units (PEFT's convention, ``m = ||W||_c``
one norm per output row of the ``(out, in)`` weight):

    m_0  = ||W0||_c
    V    = W0 + s·B A            (DoRA's direction; LoRA's and full fine-tuning's weight W_FT)
    m_FT = learned magnitude     (DoRA)   or   ||W_FT||_c   (LoRA, FT)
    ΔM   = mean_i |m_FT,i − m_0,i|
    ΔD   = mean_i (1 − cos(V_i, W0_i))

Plotting ΔD against ΔM over layers and training checkpoints gives the paper's Fig. 2: full
fine-tuning and DoRA show a negative correlation (slope), LoRA a positive one.

Everything is computed in float64. Reading is safetensors only (never pickle). The files it
writes are in :mod:`d2ora.dora.analysis_report`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from d2ora.dora import math as dora_math
from d2ora.dora.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_WEIGHTS,
    AdapterFileError,
    check_adapter,
    read_adapter_config,
)
from d2ora.dora.layer import SUPPORTED_BASE_TYPES, base_weight_out_in

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
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


class AnalysisError(ValueError):
    """Bad input to the analysis (missing folder, pickle file, mismatched modules/shapes, NaN ...)."""


# ================================================================================================ math
def decomposition_deltas(
    w0: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor | None = None
) -> tuple[float, float]:
    """``(ΔM, ΔD)`` of one layer, in float64; rows are output units.

    ``w0`` and ``direction`` are ``(out, in)``. ``magnitude`` is DoRA's learned ``m`` ``(out,)``;
    ``None`` means the magnitude is the row norm of ``direction`` itself (LoRA / full fine-tuning,
    where the direction *is* the fine-tuned weight).

    Zero rows: a row has no direction when its norm is 0. If both ``W0_i`` and ``V_i`` are zero the
    direction counts as unchanged (cos = 1); if exactly one is zero it counts as lost (cos = 0).
    """
    if w0.dim() != 2 or direction.shape != w0.shape:
        raise AnalysisError(f"weights must both be (out, in) of one shape, got {list(w0.shape)} and {list(direction.shape)}")
    w0 = w0.detach().to(torch.float64)
    v = direction.detach().to(torch.float64)
    m0 = torch.linalg.vector_norm(w0, dim=-1)
    v_norm = torch.linalg.vector_norm(v, dim=-1)
    if magnitude is None:
        m_ft = v_norm
    else:
        if tuple(magnitude.shape) != (w0.shape[0],):
            raise AnalysisError(f"magnitude has shape {list(magnitude.shape)}, expected [{w0.shape[0]}]")
        m_ft = magnitude.detach().to(torch.float64)
    delta_m = (m_ft - m0).abs().mean()
    denom = m0 * v_norm
    both_zero = (m0 == 0) & (v_norm == 0)
    cos = torch.where(
        denom > 0,
        (v * w0).sum(dim=-1) / torch.where(denom > 0, denom, torch.ones_like(denom)),
        torch.where(both_zero, torch.ones_like(denom), torch.zeros_like(denom)),
    ).clamp(-1.0, 1.0)
    delta_d = (1.0 - cos).mean()
    return float(delta_m), float(delta_d)


def adapter_deltas(
    w0: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> tuple[float, float]:
    """``(ΔM, ΔD)`` of one LoRA (``magnitude=None``) or DoRA layer: ``V = W0 + s·B A`` in float64."""
    f64 = torch.float64
    direction = dora_math.merged_weight(w0.to(f64), lora_a.to(f64), lora_b.to(f64), scaling, None)
    return decomposition_deltas(w0, direction, magnitude)


# ========================================================================================= checkpoints
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


# ======================================================================================= base loading
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


def load_model(path: Path, model_class: str, what: str) -> nn.Module:
    """``AutoModel*.from_pretrained(path)`` from safetensors only, quietly; errors become AnalysisError."""
    import transformers

    auto = getattr(transformers, MODEL_CLASSES[model_class])
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(str(path), use_safetensors=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for bad folders
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"cannot load {what} '{path}' as {MODEL_CLASSES[model_class]}: {first}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv1D of ``model`` by full module name."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_BASE_TYPES)}


def default_dense_layers(model: nn.Module) -> list[str]:
    """Linear layers inside the repeated blocks (a ``.<index>.`` in the name): attention and MLP.

    Embeddings, poolers and heads (classifier, lm_head, score) sit outside the numbered blocks and
    are left out; so is the output embedding, whatever its name.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [n for n, m in linear_layers(model).items() if m is not out and _BLOCK_INDEX.search(n)]


def _weight(module: nn.Module, name: str, source: str) -> torch.Tensor:
    w = base_weight_out_in(module).detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise AnalysisError(f"{source}: weight of '{name}' holds NaN or infinite values")
    return w


def _compile_layers(layers: str | None) -> re.Pattern[str] | None:
    if layers is None:
        return None
    try:
        return re.compile(layers)
    except re.error as exc:
        raise AnalysisError(f"--layers regex '{layers}' is invalid: {exc}") from exc


# ============================================================================================ analysis
@dataclass(frozen=True)
class LayerDelta:
    """One point of Fig. 2: a layer of one checkpoint."""

    method: str
    checkpoint: str
    layer: str
    module_type: str
    delta_m: float
    delta_d: float


def analyze_adapter(
    model: nn.Module, checkpoint: Checkpoint, layers: str | None = None
) -> list[LayerDelta]:
    """ΔM / ΔD of every adapted layer of one adapter folder (``layers`` regex filters by module name)."""
    source = str(checkpoint.path)
    try:
        # The same checks as loading an adapter: names, shapes, finite values, alpha.
        checked = check_adapter(model, checkpoint.path, check_saved_modules=False)  # heads are not analysed
    except AdapterFileError as exc:
        raise AnalysisError(str(exc)) from exc
    pattern = _compile_layers(layers)
    modules = linear_layers(model)
    rows: list[LayerDelta] = []
    for name, t in checked.layers.items():
        if pattern is not None and not pattern.search(name):
            continue
        w0 = _weight(modules[name], name, "base model")
        magnitude = t.magnitude if checked.use_dora else None
        dm, dd = adapter_deltas(w0, t.lora_a, t.lora_b, checked.scaling(name), magnitude)
        rows.append(LayerDelta(checkpoint.method, checkpoint.label, name, "", dm, dd))
    if not rows:
        raise AnalysisError(f"{source}: --layers '{layers}' matches none of the adapter's {len(checked.layers)} layers")
    return rows


def analyze_dense(
    base: nn.Module, checkpoint: Checkpoint, model_class: str, layers: str | None = None
) -> list[LayerDelta]:
    """ΔM / ΔD of the Linear layers of a fully fine-tuned model folder against the base."""
    source = str(checkpoint.path)
    pattern = _compile_layers(layers)
    base_layers = linear_layers(base)
    names = [n for n in base_layers if pattern.search(n)] if pattern is not None else default_dense_layers(base)
    if not names:
        what = f"--layers '{layers}'" if pattern is not None else "the default selection (layers inside numbered blocks)"
        raise AnalysisError(f"{source}: {what} matches no Linear layer of {type(base).__name__}; pass --layers")
    tuned = load_model(checkpoint.path, model_class, "fine-tuned model")
    tuned_layers = linear_layers(tuned)
    rows: list[LayerDelta] = []
    for name in names:
        if name not in tuned_layers:
            raise AnalysisError(f"{source}: layer '{name}' of the base model is not in the fine-tuned model")
        w0 = _weight(base_layers[name], name, "base model")
        w_ft = _weight(tuned_layers[name], name, source)
        if w_ft.shape != w0.shape:
            raise AnalysisError(
                f"{source}: layer '{name}' has shape {list(w_ft.shape)} (out, in), the base's has {list(w0.shape)}"
            )
        dm, dd = decomposition_deltas(w0, w_ft, None)
        rows.append(LayerDelta(checkpoint.method, checkpoint.label, name, "", dm, dd))
    del tuned
    return rows


def module_types(names: Sequence[str]) -> dict[str, str]:
    """Short module types: the shortest dotted suffix of the in-block name that tells the layers apart.

    BERT gives ``query``, ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense`` and
    ``output.dense``; Llama gives ``q_proj`` ... ``down_proj``.
    """
    def in_block(name: str) -> str:
        parts = name.split(".")
        idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        return ".".join(parts[idx + 1:]) or name

    relative = {n: in_block(n) for n in names}
    distinct = set(relative.values())
    result: dict[str, str] = {}
    for name, rel in relative.items():
        parts = rel.split(".")
        chosen = rel
        for k in range(1, len(parts) + 1):
            suffix = parts[-k:]
            if not any(o != rel and o.split(".")[-k:] == suffix for o in distinct):
                chosen = ".".join(suffix)
                break
        result[name] = chosen
    return result


@dataclass
class FitSummary:
    """Least-squares fit of ΔD on ΔM over a set of points (``None`` when it is undefined)."""

    points: int
    slope: float | None
    intercept: float | None
    r_value: float | None
    p_value: float | None
    stderr: float | None
    mean_delta_m: float | None
    mean_delta_d: float | None


@dataclass
class MethodSummary:
    method: str
    checkpoints: list[str]
    fit: FitSummary
    by_module_type: dict[str, FitSummary] = field(default_factory=dict)
    by_checkpoint: dict[str, FitSummary] = field(default_factory=dict)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def fit(rows: Sequence[LayerDelta]) -> FitSummary:
    """``scipy.stats.linregress(ΔM, ΔD)``; slope etc. are None for fewer than 2 points or constant ΔM."""
    xs = [r.delta_m for r in rows]
    ys = [r.delta_d for r in rows]
    n = len(rows)
    mean_m = sum(xs) / n if n else None
    mean_d = sum(ys) / n if n else None
    if n < 2 or max(xs) == min(xs):
        return FitSummary(n, None, None, None, None, None, mean_m, mean_d)
    from scipy.stats import linregress

    res = linregress(xs, ys)
    return FitSummary(
        n, _finite(res.slope), _finite(res.intercept), _finite(res.rvalue), _finite(res.pvalue),
        _finite(res.stderr), mean_m, mean_d,
    )


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def summarize(rows: Sequence[LayerDelta]) -> dict[str, MethodSummary]:
    """Per method (in order of appearance): the overall fit and fits per module type and checkpoint."""
    result: dict[str, MethodSummary] = {}
    for method in _ordered([r.method for r in rows]):
        mine = [r for r in rows if r.method == method]
        checkpoints = _ordered([r.checkpoint for r in mine])
        result[method] = MethodSummary(
            method=method,
            checkpoints=checkpoints,
            fit=fit(mine),
            by_module_type={t: fit([r for r in mine if r.module_type == t]) for t in _ordered([r.module_type for r in mine])},
            by_checkpoint={c: fit([r for r in mine if r.checkpoint == c]) for c in checkpoints},
        )
    return result


@dataclass
class AnalysisResult:
    base: Path
    model_class: str
    checkpoints: list[Checkpoint]
    rows: list[LayerDelta]
    summaries: dict[str, MethodSummary]


def run_analysis(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    model_class: str | None = None,
    layers: str | None = None,
) -> AnalysisResult:
    """Analyse every checkpoint against the base model; nothing is written (see :func:`write_outputs`)."""
    base_path = resolve_base_path(base)
    resolved = resolve_checkpoints(checkpoints, labels)
    choice = resolve_model_class(model_class, resolved)
    _compile_layers(layers)  # a bad regex fails before any model is loaded
    base_model = load_model(base_path, choice, "base model")
    rows: list[LayerDelta] = []
    with torch.no_grad():
        for ckpt in resolved:
            if ckpt.kind == "adapter":
                rows.extend(analyze_adapter(base_model, ckpt, layers))
            else:
                rows.extend(analyze_dense(base_model, ckpt, choice, layers))
    for r in rows:
        if not (math.isfinite(r.delta_m) and math.isfinite(r.delta_d)):
            raise AnalysisError(f"checkpoint '{r.checkpoint}': layer '{r.layer}' gives a non-finite ΔM/ΔD")
    types = module_types(_ordered([r.layer for r in rows]))
    rows = [replace(r, module_type=types[r.layer]) for r in rows]
    return AnalysisResult(base_path, choice, resolved, rows, summarize(rows))
