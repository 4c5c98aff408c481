"""``d2ora train``: centralised DoRA / LoRA fine-tuning (the baseline); a thin layer over d2ora.recipes.train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from d2ora.commands._errors import USER_ERRORS, fail
from d2ora.config_io import load_config, to_yaml


def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of TrainConfig sections (see configs/train_default.yaml).", show_default=False),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one key: section.key=value (YAML value), e.g. optim.lr=1e-4. Repeatable.", show_default=False),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="dora or lora (overrides the config).", show_default=False)
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where the adapter, checkpoints and metrics.json go.", show_default=False)
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config (defaults, --config, --set) as YAML and exit.")
    ] = False,
) -> None:
    """Fine-tune a model with a DoRA (or LoRA) adapter.

    With no arguments: MiniLM on BBC News, offline.
    """
    from d2ora.recipes.train import TrainConfig  # heavy imports after --help
    from d2ora.recipes.train import train as run_train

    updates: dict[str, Any] = {}
    if method is not None:
        if method.strip().lower() not in ("dora", "lora"):
            raise fail(f"--method must be dora or lora, got {method!r}")
        updates["adapter.use_dora"] = method.strip().lower() == "dora"
    if output_dir is not None:
        updates["run.output_dir"] = str(output_dir)
    try:
        cfg = load_config(TrainConfig, config, set_ or [], updates=updates)
        if print_config:
            typer.echo(to_yaml(cfg), nl=False)
            return
        run_train(cfg, console=Console())
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    app.command("train")(train)
