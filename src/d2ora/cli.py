"""The ``d2ora`` command: a thin layer over the library; each command lives in d2ora.commands."""

from __future__ import annotations

import typer

from d2ora.commands import analyze, config, keygen, ledger, peer, simulate, train

app = typer.Typer(
    name="d2ora",
    help="Decentralized DoRA fine-tuning: simulate peers or run them as processes, compare mixers, train and analyse adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train.register(app)
simulate.register(app)
peer.register(app)
keygen.register(app)
analyze.register(app)
ledger.register(app)
config.register(app)


if __name__ == "__main__":
    app()
