"""``d2ora simulate``: P peers fine-tune one shared frozen model with DoRA and gossip their adapters.

One process hosts all P peers (:mod:`d2ora.recipes.session`) and runs the same rounds loop as
``d2ora peer`` under torchrun (:mod:`d2ora.engine.loop`); adapters travel through an in-memory
exchange. The report folder holds::

    config.yaml              the resolved config (``--config`` on it repeats the run)
    metrics.jsonl / .csv     one record per round (round 0 = before training)
    summary.json, report.md  the results table, setup, per-peer table; plots/*.png
    tensorboard/             event files (``tensorboard --logdir runs/``)
    checkpoints/rank-0/      the newest checkpoints (``--resume`` continues from them)
    adapters/peer-<k>/       every peer's final adapter, PEFT format
    consensus/adapter/       the consensus adapter (the mixer's uniform average of all peers)
    consensus/merged/        the consensus adapter merged into a dense model (loads without d2ora)

``mode: centralized`` trains one peer on the pooled shards with P times the batch for the same
number of steps: the same samples seen in all, the upper bound of every comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from d2ora import atomic
from d2ora.engine.checkpoint import CheckpointError, Checkpointer, check_format, rank_dir, refuse_changed_config
from d2ora.engine.exchange import Exchange, InMemoryExchange, Routes
from d2ora.engine.loop import LocalCollector, LoopState
from d2ora.engine.round import DivergedError
from d2ora.recipes.process_run import CONFIG_FILE, SUMMARY_FILE, describe_setup, run_rounds_and_report
from d2ora.recipes.session import build_network, open_session, wire_dtype
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.engine.group import NONCE_BYTES
from d2ora.recipes.trust_run import LEDGER_DIR, TrustRun, load_identities, stored_nonce
from d2ora.runtime_support import resolve_device, seed_everything

__all__ = ["CONFIG_FILE", "SUMMARY_FILE", "DivergedError", "check_resumable", "simulate"]


def check_resumable(config: SimulateConfig, output_dir: Path, rank: int = 0) -> None:
    """Before anything loads: a resume needs checkpoints of this rank, written with the same
    result-relevant config (checked again, with the tensors, when the checkpoint loads)."""
    directory = rank_dir(output_dir, rank)
    newest = sorted(directory.glob("round-*/state.json")) if directory.is_dir() else []
    if not newest:
        raise CheckpointError(f"nothing to resume in {output_dir}: no checkpoints under {directory}")
    if config.trust.mode == "simulated":
        raise CheckpointError("trust: simulated signs with throwaway keys that are never stored, so its ledgers cannot be "
                              "continued: rerun it, or use trust: keys with key files (d2ora keygen)")
    try:
        meta = json.loads(newest[-1].read_text(encoding="utf-8"))
        saved = meta.get("config") or {}
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the loader falls back to an older checkpoint or says what is wrong
    if isinstance(meta.get("format"), int):  # another d2ora's format: say so, not how its config differs
        check_format(meta, newest[-1].parent)
    refuse_changed_config(saved, config.result_config(), newest[-1].parent)


def simulate(config: SimulateConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one configured simulation (or resume it from its newest checkpoint); returns summary.json's content."""
    console = console or Console()
    started = time.perf_counter()
    seed_everything(config.run.seed)
    device = resolve_device(config.run.device)
    output_dir = atomic.ensure_writable_dir(config.run.output_dir)
    # Validate the graph before any data or model loads: a bad topology fails in a second.
    build_network(config, [1] * config.network.peers)
    if resume:
        check_resumable(config, output_dir)

    session = open_session(config, device, lambda peers: range(peers))
    describe_setup(session, console)
    host, network = session.host, session.network
    checkpointer = Checkpointer(rank_dir(output_dir, 0), session.components(), config.result_config(), every=config.run.checkpoint_every,
                                keep=config.run.keep_checkpoints, warn=console.print)
    state, rows = LoopState(), []
    if resume:
        latest = checkpointer.latest_valid()
        if latest is None:
            raise CheckpointError(f"no valid checkpoint to resume in {checkpointer.directory}")
        restored = checkpointer.restore(latest)
        state, rows = restored.state, restored.rows
        console.print(f"resuming after round {latest} from {restored.path}")
    else:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # an earlier run's must not be resumed into this one
    routes = Routes(network.weights)
    exchange: Exchange = InMemoryExchange(routes, host.peer_ids, wire_dtype(config))
    trust = None
    if config.trust.mode != "off":
        roster, keys = load_identities(config, host.peer_ids, session.peers)
        nonce = stored_nonce(output_dir, host.peer_ids) if resume else os.urandom(NONCE_BYTES)
        trust = TrustRun(config, host, routes, output_dir, roster, keys, nonce, resume_round=state.round if resume else None,
                         warn=lambda line: console.print(f"[yellow]{escape(line)}[/yellow]"))
        exchange = trust.wrap(exchange, session.share.message_numel)
        checkpointer.add("trust", trust)  # restored too when resuming
    elif not resume:
        shutil.rmtree(output_dir / LEDGER_DIR, ignore_errors=True)  # an earlier run's ledgers do not describe this one
    exchange = session.share.wrap(exchange)
    return run_rounds_and_report(
        session, output_dir, exchange=exchange, collector=LocalCollector(), checkpointer=checkpointer, state=state,
        rows=rows, resumed=resume, console=console, started=started, trust=trust,
    )
