"""Weight-decomposition analysis (DoRA paper, arXiv 2402.09353, §3 and Fig. 2): ΔM / ΔD per layer.

For every adapted (or fine-tuned) layer of every checkpoint it splits the change of the weight
into a magnitude part ΔM and a direction part ΔD (:mod:`d2ora.dora.decomposition`). Plotting ΔD
against ΔM over layers and training checkpoints gives the paper's Fig. 2: full fine-tuning and
DoRA show a negative correlation (slope), LoRA a positive one.

The analysis is split by job:

- :mod:`d2ora.dora.decomposition`: the ΔM / ΔD math (pure tensor functions, float64);
- :mod:`d2ora.dora.analysis_files`: finding checkpoint folders and the model class to load with;
- this module: walking the layers of models already loaded, one :class:`LayerDelta` per layer;
- :mod:`d2ora.dora.analysis_report`: fitting ΔD on ΔM and writing CSV / JSON / PNG;
- :mod:`d2ora.recipes.analyze`: loading the models (``d2ora.models``) and running it all, which
  lives above ``d2ora.dora`` because the DoRA core never imports the model loaders.

Reading is safetensors only (never pickle).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from d2ora.dora.analysis_files import (
    METHOD_DORA,
    METHOD_FT,
    METHOD_LORA,
    MODEL_CLASSES,
    Checkpoint,
    resolve_base_path,
    resolve_checkpoints,
    resolve_model_class,
)
from d2ora.dora.decomposition import AnalysisError, adapter_deltas, decomposition_deltas
from d2ora.dora.files import AdapterFileError, check_adapter
from d2ora.dora.layer import SUPPORTED_BASE_TYPES, base_weight_out_in

# The names below were all defined here before the split; callers may still import them from here.
__all__ = [
    "METHOD_DORA",
    "METHOD_FT",
    "METHOD_LORA",
    "MODEL_CLASSES",
    "AnalysisError",
    "Checkpoint",
    "LayerDelta",
    "LoadDense",
    "adapter_deltas",
    "analyze_adapter",
    "analyze_checkpoints",
    "analyze_dense",
    "compile_layers",
    "decomposition_deltas",
    "default_dense_layers",
    "linear_layers",
    "module_types",
    "resolve_base_path",
    "resolve_checkpoints",
    "resolve_model_class",
]

#: Loads a dense (fully fine-tuned) checkpoint folder as a model: supplied by the caller, since
#: ``d2ora.dora`` does not load models (``d2ora.recipes.analyze`` passes one over ``d2ora.models``).
LoadDense = Callable[[Path], nn.Module]

_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class LayerDelta:
    """One point of Fig. 2: a layer of one checkpoint."""

    method: str
    checkpoint: str
    layer: str
    module_type: str
    delta_m: float
    delta_d: float


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


def compile_layers(layers: str | None) -> re.Pattern[str] | None:
    """The ``--layers`` regex, compiled; None selects the defaults."""
    if layers is None:
        return None
    try:
        return re.compile(layers)
    except re.error as exc:
        raise AnalysisError(f"--layers regex '{layers}' is invalid: {exc}") from exc


def _weight(module: nn.Module, name: str, source: str) -> torch.Tensor:
    w = base_weight_out_in(module).detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise AnalysisError(f"{source}: weight of '{name}' holds NaN or infinite values")
    return w


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
    pattern = compile_layers(layers)
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
    base: nn.Module, checkpoint: Checkpoint, load_dense: LoadDense, layers: str | None = None
) -> list[LayerDelta]:
    """ΔM / ΔD of the Linear layers of a fully fine-tuned model folder against the base."""
    source = str(checkpoint.path)
    pattern = compile_layers(layers)
    base_layers = linear_layers(base)
    names = [n for n in base_layers if pattern.search(n)] if pattern is not None else default_dense_layers(base)
    if not names:
        what = f"--layers '{layers}'" if pattern is not None else "the default selection (layers inside numbered blocks)"
        raise AnalysisError(f"{source}: {what} matches no Linear layer of {type(base).__name__}; pass --layers")
    tuned = load_dense(checkpoint.path)  # only now: a selection that matches nothing fails without a load
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
    del tuned  # one fine-tuned model in memory at a time
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


def analyze_checkpoints(
    base: nn.Module, checkpoints: Sequence[Checkpoint], load_dense: LoadDense, layers: str | None = None
) -> list[LayerDelta]:
    """Every checkpoint's layers against the loaded ``base``, in order, with their module types set."""
    rows: list[LayerDelta] = []
    with torch.no_grad():
        for ckpt in checkpoints:
            if ckpt.kind == "adapter":
                rows.extend(analyze_adapter(base, ckpt, layers))
            else:
                rows.extend(analyze_dense(base, ckpt, load_dense, layers))
    for r in rows:
        if not (math.isfinite(r.delta_m) and math.isfinite(r.delta_d)):
            raise AnalysisError(f"checkpoint '{r.checkpoint}': layer '{r.layer}' gives a non-finite ΔM/ΔD")
    types = module_types(list(dict.fromkeys(r.layer for r in rows)))  # layer names once, in order
    return [replace(r, module_type=types[r.layer]) for r in rows]
