"""``d2ora keygen``: a peer's Ed25519 private key file, and its public key for the roster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from d2ora.commands._errors import fail


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Private key file to write (PEM, mode 0600).")],
    passphrase_env: Annotated[
        str | None,
        typer.Option("--passphrase-env", help="Encrypt the key with the passphrase in this environment variable (never on the command line).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file (its identity is lost).")] = False,
) -> None:
    """Write a new Ed25519 private key and print its public key (the line for the roster)."""
    from d2ora.trust.identity import IdentityError, public_key_string, write_private_key

    passphrase = None
    if passphrase_env is not None:
        value = os.environ.get(passphrase_env)
        if not value:
            raise fail(f"environment variable {passphrase_env} is not set or empty")
        passphrase = value.encode()
    try:
        key = write_private_key(out, passphrase, overwrite=force)
    except (IdentityError, OSError) as exc:
        raise fail(str(exc)) from None
    typer.echo(public_key_string(key))


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)
