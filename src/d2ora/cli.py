"""The ``d2ora`` command: a thin layer over the library; each command lives in d2ora.commands."""

from __future__ import annotations

import typer

from d2ora.commands import analyze, train

app = typer.Typer(
    name="d2ora",
    help="Decentralized DoRA fine-tuning: train, analyse and (soon) simulate peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train.register(app)
analyze.register(app)


if __name__ == "__main__":
    app()
