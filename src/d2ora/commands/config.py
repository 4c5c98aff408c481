"""``d2ora config migrate``: rewrite a config file of the earlier flat format into sections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from d2ora.commands._errors import USER_ERRORS, fail

config_app = typer.Typer(help="Config files: migrate an old flat file into sections.", no_args_is_help=True)


@config_app.command("migrate")
def migrate(
    path: Annotated[Path, typer.Argument(help="The old flat YAML file.", show_default=False)],
    kind: Annotated[str, typer.Option("--kind", help="Which command the file is for: simulate or train.")] = "simulate",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here (default: print to stdout).", show_default=False)] = None,
) -> None:
    """Print (or write) PATH rewritten into sections, validated; the old file is left as it is."""
    import yaml
    from pydantic import ValidationError

    from d2ora import atomic
    from d2ora.config_io import read_yaml, validation_problems
    from d2ora.recipes.sections import migrate_flat
    from d2ora.recipes.simulate_config import SimulateConfig
    from d2ora.recipes.train import TrainConfig

    classes = {"simulate": SimulateConfig, "train": TrainConfig}
    if kind not in classes:
        raise fail(f"--kind must be simulate or train, got {kind!r}")
    config_cls = classes[kind]
    try:
        sectioned = migrate_flat(config_cls, read_yaml(path))
        config_cls.model_validate(sectioned)  # the result must load; its message names any bad key
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, config_cls))
        raise fail(f"{path}: the migrated config does not validate: {problems}") from None
    except (*USER_ERRORS, ValueError) as exc:
        raise fail(str(exc)) from None
    # Only the keys the file set, in sections: defaults stay implicit, as they were in the old file.
    text = yaml.safe_dump(sectioned, sort_keys=False, allow_unicode=True)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic.write_text(out, text)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
