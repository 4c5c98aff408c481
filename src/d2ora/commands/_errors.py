"""How every ``d2ora`` command reports a mistake the user can fix: one red line, exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from d2ora.atomic import OutputDirError
from d2ora.config_io import ConfigError
from d2ora.data.sources import DataSourceError
from d2ora.dora.attach import AttachError
from d2ora.models import ModelLoadError

# What a user can fix from the command line: shown as one red line, exit code 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataSourceError, ModelLoadError, AttachError, OutputDirError)
EXIT_USAGE = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` in red on stderr; return the Exit to raise."""
    Console(stderr=True).print(f"[red]error: {escape(message)}[/red]", soft_wrap=True)
    return typer.Exit(EXIT_USAGE)
