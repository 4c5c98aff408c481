"""``d2ora peer``: one process of a decentralized run under torchrun.

Every process loads the same config, derives the same seeded partition, and hosts a contiguous
block of peers (:func:`~d2ora.engine.host.peer_block`); rounds run through the same
:class:`~d2ora.engine.loop.RoundLoop` as ``d2ora simulate``, with adapters moving between processes
by torch.distributed point-to-point messages. Process 0 hosts peer 0 and the consensus monitor,
and writes the report, the consensus adapter and the merged model; every process writes its own
peers' adapters and checkpoints into the same run-folder layout as ``simulate``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from d2ora import atomic
from d2ora.distributed.exchange import DistributedCollector, DistributedExchange
from d2ora.distributed.group import DistributedSetupError, Group, note_failure, start, stop
from d2ora.engine.checkpoint import CheckpointError, Checkpointer, rank_dir
from d2ora.engine.exchange import Exchange, Routes
from d2ora.engine.host import peer_block
from d2ora.engine.loop import LoopState
from d2ora.recipes.process_run import describe_setup, run_rounds_and_report
from d2ora.recipes.session import build_network, open_session, wire_dtype
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.recipes.trust_run import LEDGER_DIR, TrustRun, load_identities, stored_nonce
from d2ora.trust.envelope import ENVELOPE_BYTES
from d2ora.runtime_support import seed_everything


def restarted() -> bool:
    """torchrun restarted this job after a failure (``--max-restarts``): continue, do not start over."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def run_peer(config: SimulateConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any] | None:
    """This process's part of the run; process 0 returns summary.json's content, the others None."""
    console = console or Console()
    group = start(config.network.timeout_s, config.run.device)
    group.next_steps = _next_steps(Path(config.run.output_dir), group.rank)
    try:
        result = _run(config, console, group, resume or restarted())
    except BaseException as exc:
        note_failure(group, f"process {group.rank}: {exc}")
        stop(group, failed=True)  # a broken group's teardown must not bury the line above
        raise
    stop(group)
    return result


_ROUND_DIR = re.compile(r"round-(\d+)$")


def _next_steps(output_dir: Path, rank: int) -> Callable[[], str]:
    """What a process that stops because another one died says about going on: looked up when it
    happens (the newest checkpoint is then known), in terms of the commands that continue the run."""

    def steps() -> str:
        folder = rank_dir(output_dir, rank)
        rounds = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := _ROUND_DIR.match(p.name))]
        newest = max(rounds, default=None)
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts > 0:  # torchrun's agent restarts the job as soon as this attempt ends
            kept = f"this process's newest is round {newest}" if newest is not None else "none yet: from the start"
            return f"this attempt stops here; torchrun restarts the job from the newest checkpoint every process holds ({kept})"
        if newest is None:
            return "the run stops here, before its first checkpoint; start it again"
        return (f"the run stops here; its checkpoints up to round {newest} are kept (continue with d2ora peer --resume "
                f"{output_dir} under torchrun, or d2ora launch --resume {output_dir}; torchrun --max-restarts does it by itself)")

    return steps


def _run(config: SimulateConfig, console: Console, group: Group, resume: bool) -> dict[str, Any] | None:
    started = time.perf_counter()
    group.agree("config", config.result_config())
    if config.centralized and group.world_size > 1:
        raise DistributedSetupError("mode centralized trains one peer: run it with one process")
    if config.trust.mode == "simulated":
        raise DistributedSetupError("trust: simulated is for d2ora simulate; processes need real keys: trust: keys with "
                                    "roster and keys_dir (d2ora keygen writes the key files)")
    seed_everything(config.run.seed)
    output_dir = atomic.ensure_writable_dir(config.run.output_dir)
    build_network(config, [1] * config.network.peers)
    rank, world = group.rank, group.world_size
    session = open_session(config, group.device, lambda peers: peer_block(peers, world, rank))
    group.agree("adapter layout (model, targets, rank)", session.host.layout.describe())
    host, network, peers = session.host, session.network, session.peers
    blocks = [peer_block(peers, world, r) for r in range(world)]

    def owner(peer: int) -> int:
        return next(r for r, block in enumerate(blocks) if peer in block)

    def describe(r: int) -> str:
        block = blocks[r]
        hosted = f"peer {block.start}" if len(block) == 1 else f"peers {block.start}..{block.stop - 1}"
        return f"process {r} ({hosted})"

    group.describe = describe
    shown = console if group.is_root else Console(quiet=True)  # one process speaks for the job
    describe_setup(session, shown)
    shown.print(f"{world} processes ({group.backend}); process 0 hosts {describe(0).split('(')[1].rstrip(')')}")
    checkpointer = Checkpointer(rank_dir(output_dir, rank), session.components(), config.result_config(), every=config.run.checkpoint_every,
                                keep=config.run.keep_checkpoints, warn=console.print)
    state, rows = LoopState(), []
    round_to_resume = group.resume_round(checkpointer.latest_valid()) if resume else None
    if round_to_resume is not None:
        restored = checkpointer.restore(round_to_resume)
        state, rows = restored.state, restored.rows
        shown.print(f"resuming after round {round_to_resume}")
    elif resume and not restarted():
        raise CheckpointError(f"nothing to resume: not every process has a valid checkpoint under {output_dir / 'checkpoints'}")
    else:
        shutil.rmtree(checkpointer.directory, ignore_errors=True)
    routes = Routes(network.weights)
    trusted = config.trust.mode != "off"
    exchange: Exchange = DistributedExchange(routes, host.peer_ids, owner, group, session.share.message_numel, host.layout.dtype,
                                             wire_dtype(config), attachment_bytes=ENVELOPE_BYTES if trusted else 0)
    trust = None
    if trusted:
        roster, keys = load_identities(config, host.peer_ids, peers)
        group.agree("roster", {"sha256": roster.sha256})
        nonce = stored_nonce(output_dir, host.peer_ids) if round_to_resume is not None else group.fresh_nonce()
        group.agree("run nonce (ledgers of another run in the folder?)", {"nonce": nonce.hex()})
        trust = TrustRun(config, host, routes, output_dir, roster, keys, nonce, resume_round=round_to_resume,
                         warn=lambda line: console.print(f"[yellow]process {rank}: {escape(line)}[/yellow]"))
        exchange = trust.wrap(exchange, session.share.message_numel)
        checkpointer.add("trust", trust)  # restored too when resuming
    elif round_to_resume is None and group.is_root:
        shutil.rmtree(output_dir / LEDGER_DIR, ignore_errors=True)  # an earlier run's ledgers do not describe this one
    exchange = session.share.wrap(exchange)
    return run_rounds_and_report(
        session, output_dir, exchange=exchange, collector=DistributedCollector(group, blocks, peers, config.run.rounds),
        checkpointer=checkpointer, state=state, rows=rows, resumed=round_to_resume is not None, console=shown,
        started=started, trust=trust, processes=world, backend=group.backend,
    )


def torchrun_command(procs: int, args: list[str], max_restarts: int = 0) -> list[str]:
    """The torchrun command line that starts ``procs`` peers on this machine (loopback rendezvous)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            f"--max-restarts={max_restarts}", "-m", "d2ora", "peer", *args]


__all__ = ["run_peer", "torchrun_command", "restarted"]
