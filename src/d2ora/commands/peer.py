"""``d2ora peer`` (one process of a torchrun job) and ``d2ora launch`` (torchrun on this machine)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer

from d2ora.commands._errors import fail
from d2ora.commands.simulate import (
    ConfigOption,
    OutputOption,
    ResumeOption,
    SetOption,
    console_for_logs,
    load_run_config,
    user_errors,
)


# Typer's rich help keeps single line breaks after the first paragraph, so each paragraph of the
# docstring is one source line (the terminal wraps it); the first is the summary in `d2ora --help`.
def peer(
    config: ConfigOption = None,
    set_: SetOption = None,
    output_dir: OutputOption = None,
    resume: ResumeOption = None,
    roster: Annotated[Path | None, typer.Option("--roster", help="Run this organisation's peer over gRPC links (mutual TLS) instead of torchrun: the roster file (public keys, address: host:port, certificate).", show_default=False)] = None,
    key: Annotated[Path | None, typer.Option("--key", help="With --roster: this peer's private key (d2ora keygen); the peer is the roster entry with its public key.", show_default=False)] = None,
    run_id: Annotated[str, typer.Option("--run-id", help="With --roster: a name for this run, the same on every peer (it goes into the signed envelopes' run nonce: a fresh one per run keeps runs apart).")] = "",
    passphrase_env: Annotated[str | None, typer.Option("--passphrase-env", help="With --roster: the environment variable holding --key's passphrase.", show_default=False)] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="With --roster: host:port to listen on (default: this peer's roster address).", show_default=False)] = None,
) -> None:
    """Run one process of a decentralized run: torchrun starts it, or each organisation its own.

    On every node, for example:

        torchrun --nnodes N --nproc-per-node K --rdzv-backend c10d \\
            --rdzv-endpoint HOST:PORT -m d2ora peer --config run.yaml

    Each process hosts a contiguous block of the peers; every process must get the same config. Under torchrun --max-restarts, a restarted job continues from the newest checkpoint all processes hold.

    Between organisations, each runs its one peer: d2ora peer --config run.yaml --roster roster.yaml --key peer-3.key. Peers start in any order, wait up to network.timeout_s for their neighbours, refuse a neighbour whose config, roster or adapter layout differs, sign every message, and mix without a neighbour that misses network.round_timeout_s (recorded in metrics, summary and ledger). A peer that stopped comes back with --resume <its output folder> (same --roster, --key and --run-id): it restores its newest checkpoint, takes its neighbours' current mix and goes on; its ledger records the rounds it missed.
    """
    updates: dict[str, Any] = {} if output_dir is None else {"run.output_dir": str(output_dir)}
    if roster is not None or key is not None:
        if roster is None or key is None:
            raise fail("--roster and --key go together: the roster of the run and this peer's key")
        from d2ora.p2p.inbox import LinkError
        from d2ora.recipes.p2p_peer import LinkSetupError, run_link_peer

        try:
            run_link_peer(load_run_config(config, set_, updates, resume), roster, key, console=console_for_logs(), run_id=run_id,
                          passphrase_env=passphrase_env, listen=listen, resume=resume is not None)
        except (*user_errors(), LinkError, LinkSetupError) as exc:
            raise fail(str(exc)) from None
        return
    from d2ora.recipes.peer import run_peer

    try:
        run_peer(load_run_config(config, set_, updates, resume), console=console_for_logs(), resume=resume is not None)
    except user_errors() as exc:
        raise fail(str(exc)) from None


def launch(
    procs: Annotated[int, typer.Option("--procs", "-n", min=1, help="Processes to start on this machine (the peers are split among them).")] = 2,
    config: ConfigOption = None,
    set_: SetOption = None,
    output_dir: OutputOption = None,
    resume: ResumeOption = None,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="torchrun restarts after a failure (each resumes from the newest checkpoint).")] = 0,
) -> None:
    """Start d2ora peer processes on this machine with torchrun (--procs of them, loopback rendezvous)."""
    from d2ora.recipes.peer import torchrun_command

    args: list[str] = []
    if config is not None:
        args += ["--config", str(config)]
    for item in set_ or []:
        args += ["--set", item]
    if output_dir is not None:
        args += ["--output-dir", str(output_dir)]
    if resume is not None:
        args += ["--resume", str(resume)]
    try:
        load_run_config(config, set_, {} if output_dir is None else {"run.output_dir": str(output_dir)}, resume)  # fail fast, before torchrun
    except user_errors() as exc:
        raise fail(str(exc)) from None
    command = torchrun_command(procs, args, max_restarts)
    console_for_logs().print(" ".join(command), style="dim", soft_wrap=True)
    code = subprocess.call(command)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("peer")(peer)
    app.command("launch")(launch)
