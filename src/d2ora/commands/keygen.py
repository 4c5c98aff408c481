"""``d2ora keygen``: a peer's Ed25519 private key file and its identity certificate, and its public key for the roster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from d2ora.commands._errors import fail


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Private key file to write (PEM, mode 0600); its certificate goes beside it (peer-3.key -> peer-3.crt).")],
    passphrase_env: Annotated[
        str | None,
        typer.Option("--passphrase-env", help="Encrypt the key with the passphrase in this environment variable (never on the command line).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file (its identity is lost) and its certificate.")] = False,
    cert_only: Annotated[
        bool, typer.Option("--cert-only", help="Keep the existing key in --out and (re)write only its certificate.")
    ] = False,
) -> None:
    """Write a new Ed25519 key and its link certificate, and print the public key for the roster.

    The certificate, written beside the key as <out>.crt, is what peers' gRPC links pin to this identity."""
    from d2ora.p2p.certs import certificate_path, write_identity_certificate
    from d2ora.trust.identity import IdentityError, load_private_key, public_key_string, write_private_key

    passphrase = None
    if passphrase_env is not None:
        value = os.environ.get(passphrase_env)
        if not value:
            raise fail(f"environment variable {passphrase_env} is not set or empty")
        passphrase = value.encode()
    cert = certificate_path(out)
    try:
        if cert_only:
            key = load_private_key(out, passphrase)
        else:
            # Checked before the key is written, so a refusal leaves no key without its certificate.
            if cert.exists() and not force and not out.exists():
                raise IdentityError(f"{cert} already exists (a certificate for another key?); use --force to replace it")
            key = write_private_key(out, passphrase, overwrite=force)
        write_identity_certificate(cert, key)
    except (IdentityError, OSError) as exc:
        raise fail(str(exc)) from None
    typer.echo(public_key_string(key))


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)
