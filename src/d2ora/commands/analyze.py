"""``d2ora analyze``: the DoRA paper's weight-decomposition analysis (ΔD vs ΔM, Fig. 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from d2ora.commands._errors import fail
from d2ora.dora.analysis_files import MODEL_CLASSES
from d2ora.dora.analysis_report import write_outputs
from d2ora.dora.decomposition import AnalysisError
from d2ora.models import MINILM, ModelLoadError, resolve_model

# --base presets: the analysis reads safetensors folders, so only the MiniLM preset (a plain
# model folder) qualifies; SmolLM2 ships as a GGUF file.
BASE_PRESETS = (MINILM,)


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def resolve_base(base: str) -> Path:
    """The base model folder ``--base`` names: a preset's packaged folder, or a local folder."""
    if base in BASE_PRESETS:
        try:
            return Path(resolve_model(base).path)
        except ModelLoadError as exc:
            raise AnalysisError(str(exc)) from exc
    path = Path(base)
    if not path.is_dir():
        presets = ", ".join(f"'{p}'" for p in BASE_PRESETS)
        raise AnalysisError(f"base model folder '{path}' does not exist (a local folder or the preset {presets})")
    return path


def analyze(
    checkpoints: Annotated[
        list[str],
        typer.Argument(
            help="Fine-tuned checkpoints in order: adapter folders (DoRA/LoRA), dense model folders (FT), "
            "or a folder holding epoch-* subfolders.",
            show_default=False,
        ),
    ],
    base: Annotated[
        str, typer.Option("--base", help="Base model: a local folder or the preset 'minilm'.", show_default=False)
    ],
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Name of each checkpoint, in order (default: its folder name)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for analysis.csv, analysis.json, analysis.png.")] = Path(
        "analysis"
    ),
    model_class: Annotated[
        str | None,
        typer.Option(
            "--model-class",
            help=f"transformers auto class to load the base with: {', '.join(MODEL_CLASSES)} "
            "(default: from the adapter's task_type / the model's architectures, else base).",
            show_default=False,
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Regex (searched in the module name) selecting the layers to analyse; default: every adapted "
            "layer, and for FT the Linear layers inside the numbered blocks (attention and MLP).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Analyse fine-tuned checkpoints' weight decomposition: magnitude change ΔM vs direction change ΔD."""
    from d2ora.recipes.analyze import run_analysis  # heavy imports after --help

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console()
    try:
        base_path = resolve_base(base)
        result = run_analysis(base_path, checkpoints, labels=label or None, model_class=model_class, layers=layers)
        written = write_outputs(result, out)
    except (AnalysisError, OSError) as exc:
        raise fail(str(exc)) from None

    table = Table(title=f"Weight decomposition vs {result.base.name} ({result.model_class})")
    table.add_column("method")
    table.add_column("checkpoints", justify="right")
    table.add_column("points", justify="right")
    table.add_column("slope ΔD/ΔM", justify="right")
    table.add_column("r", justify="right")
    table.add_column("mean ΔM", justify="right")
    table.add_column("mean ΔD", justify="right")
    for method, summary in result.summaries.items():
        f = summary.fit
        table.add_row(
            method, str(len(summary.checkpoints)), str(f.points), _fmt(f.slope), _fmt(f.r_value, ".3f"),
            _fmt(f.mean_delta_m), _fmt(f.mean_delta_d),
        )
    console.print(table)
    for path in written.values():
        console.print(f"wrote {path}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("analyze", no_args_is_help=True)(analyze)
