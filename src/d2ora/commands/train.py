"""``d2ora train``: centralised DoRA / LoRA fine-tuning (the baseline); a thin layer over d2ora.recipes.train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from d2ora.commands._errors import USER_ERRORS, fail
from d2ora.config_io import load_config


def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of TrainConfig keys (see configs/train_default.yaml).", show_default=False),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one key: key=value (YAML value; dotted keys for nested). Repeatable.", show_default=False),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="dora or lora (overrides the config).", show_default=False)
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where the adapter, checkpoints and metrics.json go.", show_default=False)
    ] = None,
) -> None:
    """Fine-tune a model with a DoRA (or LoRA) adapter.

    With no arguments: MiniLM on BBC News, offline.
    """
    from d2ora.recipes.train import TrainConfig  # heavy imports after --help
    from d2ora.recipes.train import train as run_train

    updates: dict[str, Any] = {}
    if method is not None:
        updates["method"] = method
    if output_dir is not None:
        updates["output_dir"] = str(output_dir)
    try:
        cfg = load_config(TrainConfig, config, set_ or [], updates=updates)
        run_train(cfg, console=Console())
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    app.command("train")(train)
