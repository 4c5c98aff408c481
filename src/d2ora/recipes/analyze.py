"""The weight-decomposition analysis as one call: load the models, measure every layer, fit.

The measuring lives in :mod:`d2ora.dora.analysis` (and its neighbours), which loads nothing: the
DoRA core never imports the model loaders. This module is the one place that loads, with
:func:`d2ora.models.load_model`, the single loader every d2ora command uses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from d2ora.dora.analysis import analyze_checkpoints, compile_layers
from d2ora.dora.analysis_files import (
    MODEL_CLASSES,
    resolve_base_path,
    resolve_checkpoints,
    resolve_model_class,
)
from d2ora.dora.analysis_report import AnalysisResult, summarize
from d2ora.dora.decomposition import AnalysisError
from d2ora.models import ModelLoadError, load_model


def _as_folder(path: Path) -> str:
    # load_model reads a bare name such as 'minilm' as a preset: a relative folder gets a './'.
    return str(path) if path.is_absolute() else os.path.join(os.curdir, path)


def load_for_analysis(path: Path, model_class: str, what: str) -> nn.Module:
    """The model in folder ``path`` as saved (no new head, no tokenizer), from safetensors only."""
    auto_class = MODEL_CLASSES[model_class]
    try:
        loaded = load_model(
            _as_folder(path), None, auto_class=auto_class, with_tokenizer=False, safetensors_only=True
        )
    except ModelLoadError as exc:
        raise AnalysisError(f"{exc} (the {what}, as {auto_class})") from exc
    return loaded.model.eval()


def run_analysis(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    model_class: str | None = None,
    layers: str | None = None,
) -> AnalysisResult:
    """Analyse every checkpoint against the base model folder; nothing is written.

    :func:`d2ora.dora.analysis_report.write_outputs` writes the result's CSV, JSON and PNG.
    """
    base_path = resolve_base_path(base)
    resolved = resolve_checkpoints(checkpoints, labels)
    choice = resolve_model_class(model_class, resolved)
    compile_layers(layers)  # a bad regex fails before any model is loaded
    base_model = load_for_analysis(base_path, choice, "base model")
    rows = analyze_checkpoints(
        base_model, resolved, lambda path: load_for_analysis(path, choice, "fine-tuned model"), layers
    )
    return AnalysisResult(base_path, choice, resolved, rows, summarize(rows))
