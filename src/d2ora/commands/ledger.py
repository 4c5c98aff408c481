"""``d2ora ledger verify | show | prove``: check, list and prove what a run's signed ledgers hold."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from d2ora.commands._errors import fail

if TYPE_CHECKING:
    from d2ora.trust.identity import Roster

EXIT_NOT_VERIFIED = 1

ledger_app = typer.Typer(
    help="Check a run's signed per-peer ledgers: verify them, show them, prove an envelope's inclusion.",
    no_args_is_help=True,
)

RunDirArgument = Annotated[Path, typer.Argument(help="The run folder (holding ledger/).", show_default=False)]


def _roster(path: Path | None) -> Roster | None:
    # Imported here, as in every command: the trust modules import torch, which `d2ora --help` should not wait for.
    from d2ora.trust.identity import IdentityError, load_roster

    if path is None:
        return None
    try:
        return load_roster(path)
    except IdentityError as exc:
        raise fail(str(exc)) from None


@ledger_app.command("verify")
def verify(
    run_dir: RunDirArgument,
    roster: Annotated[
        Path | None,
        typer.Option("--roster", help="The roster you trust (YAML/JSON). Default: the run's own ledger/roster.json, "
                     "which only shows the run is consistent with itself.", show_default=False),
    ] = None,
) -> None:
    """Check every ledger's chain and signatures, every envelope, equivocation and the saved files."""
    from d2ora.trust.audit import AuditError, verify_run

    anchor = _roster(roster)
    try:
        report = verify_run(run_dir, anchor)
    except AuditError as exc:
        raise fail(str(exc)) from None
    out = Console(soft_wrap=True, highlight=False)
    note = Console(stderr=True, soft_wrap=True, highlight=False)
    if report.ok:
        out.print(f"[green]{escape(report.summary())}[/green]")
    else:
        for line in report.lines():  # the first line names the ledger file, the peer and the block
            out.print(f"[red]{escape(line)}[/red]")
        out.print(f"[red]{escape(report.summary())}[/red]")
    for line in report.explanations():  # declared gaps (a peer that left and rejoined): legitimate, said why
        out.print(f"gap: {escape(line)}" if line.startswith("peer ") else f"note: {escape(line)}")
    if report.self_anchored:
        note.print("[yellow]note: checked against the run folder's own ledger/roster.json; give --roster with a roster "
                   "you trust to tie the signatures to the peers' real keys[/yellow]")
    if not report.ok:
        raise typer.Exit(EXIT_NOT_VERIFIED)


def _checks(rejections: list) -> str:
    if not rejections:
        return "0"
    counts = Counter(r.check for r in rejections)
    return f"{len(rejections)} (" + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) + ")"


@ledger_app.command("show")
def show(
    run_dir: RunDirArgument,
    peer: Annotated[int | None, typer.Option("--peer", help="Only this peer's ledger.", show_default=False)] = None,
) -> None:
    """Show each peer's ledger blocks and who was rejected for what (it checks nothing: use verify)."""
    from d2ora.trust.ledger import Ledger, LedgerError, ledger_files

    files = ledger_files(run_dir)
    if not files:
        raise fail(f"no ledgers in {Path(run_dir) / 'ledger'}")
    if peer is not None:
        if peer not in files:
            raise fail(f"no ledger for peer {peer} in {Path(run_dir) / 'ledger'} (peers {sorted(files)})")
        files = {peer: files[peer]}
    console = Console(highlight=False)
    by_sender: dict[int, Counter] = {}
    receivers_of: dict[int, set[int]] = {}
    for k, path in files.items():
        try:
            with Ledger.open(path) as ledger:
                table = Table(title=f"peer {k}: {path.name}", title_justify="left")
                for column in ("block", "kind", "round", "accepted", "rejected", "adapter", "hash"):
                    table.add_column(column, justify="right" if column in ("block", "round", "accepted") else "left")
                for b in ledger.blocks():
                    rejections = ledger.rejections(b.index)
                    for r in rejections:
                        by_sender.setdefault(r.sender, Counter())[r.check] += 1
                        receivers_of.setdefault(r.sender, set()).add(k)
                    if b.kind == "round":
                        accepted, adapter = str(b.body.get("accepted", "?")), str(b.body.get("adapter_sha256", ""))[:12]
                    elif b.kind == "final":
                        files_n = len(b.body.get("files", {}) or {})
                        accepted, adapter = "", f"{files_n} files"
                    else:
                        accepted, adapter = "", f"run {str(b.body.get('run_id', ''))[:12]}"
                    table.add_row(str(b.index), str(b.kind), str(b.round), accepted,
                                  _checks(rejections) if b.kind == "round" else "", adapter, str(b.hash)[:12])
                abandoned = ledger.abandoned()
        except LedgerError as exc:
            raise fail(str(exc)) from None
        console.print(table)
        if abandoned:
            console.print(f"  {len(abandoned)} block(s) abandoned by a resume", style="dim")
    if by_sender:
        summary = Table(title="rejections by sender", title_justify="left")
        for column in ("sender", "rejected", "by check", "by receivers"):
            summary.add_column(column)
        for sender, counts in sorted(by_sender.items()):
            summary.add_row(str(sender), str(sum(counts.values())),
                            ", ".join(f"{c} {n}" for c, n in sorted(counts.items())),
                            ", ".join(str(r) for r in sorted(receivers_of[sender])))
        console.print(summary)
    else:
        console.print("no rejections")


@ledger_app.command("prove")
def prove(
    run_dir: RunDirArgument,
    peer: Annotated[int, typer.Option("--peer", help="The sender whose envelopes to prove.", show_default=False)],
    round_: Annotated[int, typer.Option("--round", help="The training round.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the proofs as JSON.")] = False,
) -> None:
    """Print RFC 6962 audit paths proving PEER's round-ROUND envelopes are under its receivers' signed roots."""
    from d2ora.trust.audit import AuditError, inclusion
    from d2ora.trust.ledger import LedgerError

    try:
        proofs = inclusion(run_dir, peer, round_)
    except (AuditError, LedgerError) as exc:
        raise fail(str(exc)) from None
    if not proofs:
        raise fail(f"no ledger in {run_dir} holds an envelope from peer {peer} accepted in round {round_}")
    if as_json:
        typer.echo(json.dumps(proofs, indent=2))
        return
    console = Console(soft_wrap=True, highlight=False)
    for p in proofs:
        console.print(f"peer {p['sender']} -> peer {p['receiver']}, round {p['round']} step {p['step']}: "
                      f"leaf {p['leaf_index']} of {p['tree_size']} in {p['ledger']} block {p['block']} "
                      f"(root {p['merkle_root']})")
        console.print(f"  envelope sha256 {p['leaf']}")
        for i, h in enumerate(p["audit_path"]):
            console.print(f"  path[{i}] {h}")
    console.print(f"{len(proofs)} proof(s), each checked against its block's merkle_root (RFC 6962)", style="green")


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
