"""``d2ora peer --roster roster.yaml --key peer-3.key``: one organisation's peer over gRPC links.

No torchrun, no central store, no process that gathers every adapter. Each process hosts exactly
one peer, the roster entry whose public key matches its key file, and talks only to its graph
neighbours over :class:`~d2ora.p2p.link.PeerLink` (mutual TLS 1.3 pinned to the roster).

Start-up: load the data and model as every runtime does (the same seeded partition, so peer k
trains on the shard it has in ``d2ora simulate``), listen on the roster entry's ``address``, wait
up to ``network.timeout_s`` for the neighbours (peers start in any order), then send each
neighbour a start-up message (round 0) with the run's result config, the roster digest, the
adapter layout and the run id, and refuse to go on, naming what differs, unless every neighbour's
matches. Rounds: the same :class:`~d2ora.engine.loop.RoundLoop` as every runtime, over
:class:`~d2ora.p2p.exchange.LinkExchange` (a neighbour that misses ``network.round_timeout_s`` is
left out of that round's mix and recorded absent) wrapped by the trust layer: every message is
signed with the peer's key and checked by the receiver, and each peer keeps its ledger.

**Run id without a broadcast.** The envelopes' run nonce is ``SHA-256("d2ora p2p" | result-config
digest | roster digest | --run-id)[:16]``: every peer derives it alone and equal, and the start-up
message compares it. A fresh ``--run-id`` per run is what keeps one run's envelopes from
verifying in another run of the same config and roster (the default, empty, does not).

**Leaving and coming back.** Every peer checkpoints its own state each ``run.checkpoint_every``
rounds (``checkpoints/rank-<peer>``, as under torchrun). A peer that stopped is started again with
``--resume <its output folder>``: it restores its newest checkpoint (round t0; its ledger is rewound
to it) and starts listening. Its neighbours never stopped sending to it, so the first message that
arrives names the run's current round R (the newest one waiting, if several queued up). Round R is
its rejoin round: it trains nothing, and its adapter becomes its in-neighbours'
round-R messages (first gossip step) mixed by the run's rule without its own stale adapter (its
row's weights renormalised over them), the moment reset of a re-basing mixer follows, its
learning-rate schedule moves on to round R's, and it sends that mix as its round-R message (so its
neighbours, waiting for it, go on in step with it instead of a deadline behind). Its ledger's round-R block declares rounds t0+1 ..
R-1 missed (``rejoined``), which ``d2ora ledger verify`` accepts and explains; its metrics have no
rows for rounds t0+1 .. R-1, and round R's row has no train loss (it is scored when due, like any
round: that also keeps it in step, as its neighbours score that round too). From round R+1 it takes part as before. Its optimizer moments, sampler
and drift-correction state are its own from round t0. Its neighbours record it absent for rounds
up to R and list it under ``returned`` in their summaries.

Outputs (``run.output_dir``, one folder per organisation): ``config.yaml``, ``metrics.jsonl/.csv``
(this peer's train loss, its own adapter's scores after mixing, the neighbours absent each round),
``adapters/peer-<k>``, ``ledger/peer-<k>.sqlite``, ``checkpoints/rank-<k>``, ``summary.json`` (with
``absent``, ``departed``, ``returned`` and, for a peer that came back, ``rejoined``) and ``report.md``. "Consensus" in them is this peer's own adapter after mixing: its
estimate of the consensus, scored on the run's test split (each organisation holds a copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape

from d2ora import atomic
from d2ora.config_io import to_yaml
from d2ora.data.tasks import Batch
from d2ora.engine.checkpoint import CheckpointError, Checkpointer, rank_dir
from d2ora.engine.evaluate import evaluate_peers
from d2ora.engine.exchange import Exchange, Routes, wire_itemsize
from d2ora.engine.group import NONCE_BYTES
from d2ora.engine.host import PeerHost
from d2ora.engine.loop import LocalCollector, LoopState, RoundContext, RoundLoop, RunSettings
from d2ora.engine.metrics_log import MetricsLog
from d2ora.engine.monitor import ConsensusResult
from d2ora.engine.records import RoundRecord
from d2ora.p2p.exchange import Absence, LinkExchange
from d2ora.p2p.group import LinkGroup, LinkSetupError
from d2ora.p2p.link import PeerLink
from d2ora.recipes.console_view import ConsoleView
from d2ora.recipes.process_run import CONFIG_FILE, SUMMARY_FILE, describe_setup, gather_peak_memory, run_summary, trust_summary
from d2ora.recipes.session import build_network, open_session, remove_stale_outputs, save_peer_adapters, wire_dtype
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.recipes.trust_run import TrustRun, config_digest, folder_digests
from d2ora.runtime_support import resolve_device, seed_everything
from d2ora.trust.envelope import ENVELOPE_BYTES
from d2ora.trust.identity import IdentityError, Roster, load_private_key, load_roster, public_key_string
from d2ora.trust.blocks import RejoinRecord
from d2ora.trust.ledger import Ledger, Rejection

#: Room for a start-up message (a JSON of the result config, or of the layout) besides the adapter.
HELLO_ROOM = 1 << 20
#: The check name an absent neighbour's message has in the ledger's ``rejected`` list.
ABSENT = "absent"


# ------------------------------------------------------------------------------------ identity
def peer_of_key(roster: Roster, key: Ed25519PrivateKey, key_path: str | os.PathLike[str]) -> int:
    """The roster peer whose public key is ``key``'s; IdentityError naming the key otherwise."""
    mine = public_key_string(key)
    found = [peer for peer, member in sorted(roster.members.items()) if member.key_string == mine]
    if not found:
        raise IdentityError(f"{key_path}: its public key {mine} is not on the roster")
    return found[0]


def run_nonce(config: SimulateConfig, roster: Roster, run_id: str) -> bytes:
    """The envelopes' run nonce, derived alike by every peer (no broadcast): see the module doc."""
    text = "\n".join(["d2ora p2p", config_digest(config), roster.sha256, run_id])
    return hashlib.sha256(text.encode()).digest()[:NONCE_BYTES]


# --------------------------------------------------------------------------- the loop's helpers
class OwnAdapterMonitor:
    """The loop's monitor in a process that sees only its own peer: it scores that peer's adapter
    after mixing (its estimate of the consensus) on the test split; no distances (they need everyone)."""

    members = None

    def __init__(self, host: PeerHost, test_batches: Sequence[Batch]) -> None:
        self.host, self.test_batches = host, list(test_batches)

    def evaluate(self, all_flat: torch.Tensor, round_index: int) -> ConsensusResult:
        host = self.host
        test = evaluate_peers(host.peer_model, host.task, self.test_batches, host.device, peers=[0])[0]
        return ConsensusResult(adapter=all_flat[0].clone(), test=test,
                               distances={"magnitude": None, "product": None, "merged": None})


class LinkMetricsLog(MetricsLog):
    """metrics.jsonl as every run writes it, plus ``absent``: the neighbours' messages this peer
    mixed without in the round, with the reason."""

    def __init__(self, directory: Path, metric: str, absences_in: Callable[[int], list[Absence]],
                 rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(directory, metric, rows)
        self.absences_in = absences_in

    def on_round(self, record: RoundRecord) -> None:
        self.append({**record.to_row(), "absent": [a.to_dict() for a in self.absences_in(record.round)]})


class LinkConsoleView(ConsoleView):
    """The progress bar as every run shows it; one line per round: this peer's own score (no consensus
    distance: it needs every adapter) and the neighbours it mixed without."""

    def __init__(self, console: Console, metric: str, rounds: int, local_steps: int,
                 absences_in: Callable[[int], list[Absence]]) -> None:
        super().__init__(console, metric, rounds, local_steps)
        self.absences_in = absences_in

    def on_round(self, record: RoundRecord) -> None:
        parts = [f"round {record.round}"]
        if record.evaluation is not None:
            value = record.evaluation.consensus_test[self.metric]
            parts.append(f"own adapter {self.metric} " + (f"{100 * value:.1f}%" if self.metric == "accuracy" else f"{value:.4g}"))
        absent = sorted({a.peer for a in self.absences_in(record.round)})
        if absent:
            parts.append(f"mixed without peer(s) {absent}")
        if len(parts) > 1:
            self.progress.console.print(": ".join(parts[:2]) + "".join(", " + p for p in parts[2:]))


class AbsenceRecordingLedger:
    """A peer's ledger whose round blocks also list each absent neighbour's message, as a rejected
    record with check ``absent`` and the reason (the ledger takes any check name; no envelope)."""

    def __init__(self, ledger: Ledger, absences_in: Callable[[int], list[Absence]]) -> None:
        self._ledger, self._absences_in = ledger, absences_in

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def append_round(self, round: int, accepted: Sequence[bytes], rejected: Sequence[Rejection],
                     sent: Sequence[tuple[int, bytes]], adapter_sha256: str, **extra: Any) -> Any:
        absent = [Rejection(sender=a.peer, step=a.slot, check=ABSENT, detail=a.reason) for a in self._absences_in(round)]
        return self._ledger.append_round(round, accepted, [*rejected, *absent], sent, adapter_sha256, **extra)


# ------------------------------------------------------------------------------------------ run
def run_link_peer(config: SimulateConfig, roster_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
                  console: Console | None = None, run_id: str = "", passphrase_env: str | None = None,
                  listen: str | None = None, resume: bool = False) -> dict[str, Any]:
    """This organisation's peer of the run; returns its summary.json's content. ``resume``: this
    peer comes back to a run in progress from its newest checkpoint (see the module doc)."""
    console = console or Console()
    started = time.perf_counter()
    roster = load_roster(roster_path)
    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if value is None:
            raise IdentityError(f"--passphrase-env names {passphrase_env}, which is not set")
        passphrase = value.encode()
    key = load_private_key(key_path, passphrase)
    peer = peer_of_key(roster, key, key_path)
    if config.centralized:
        raise LinkSetupError("mode centralized trains one peer on pooled data: there is nothing to link")
    roster.check_covers(config.network.peers)
    address = listen or roster.members[peer].address
    if address is None:
        raise LinkSetupError(f"roster peer {peer} has no address: add address: \"host:port\" (where it listens) to its entry")
    seed_everything(config.run.seed)
    device = resolve_device(config.run.device)
    output_dir = atomic.ensure_writable_dir(config.run.output_dir)
    build_network(config, [1] * config.network.peers)  # a bad topology fails before anything loads
    session = open_session(config, device, lambda peers: range(peer, peer + 1))
    describe_setup(session, console)
    host, network = session.host, session.network
    routes = Routes(network.weights)
    round_timeout = config.network.round_timeout_s or config.network.timeout_s
    message_bytes = session.share.message_numel * wire_itemsize(host.layout.dtype, wire_dtype(config))
    link = PeerLink(peer, key, roster, routes.out_neighbours(peer), in_neighbours=routes.in_neighbours(peer), listen=address,
                    max_payload=message_bytes + ENVELOPE_BYTES + HELLO_ROOM, send_timeout_s=config.network.timeout_s)
    group = LinkGroup(link, routes.in_neighbours(peer), config.network.timeout_s, run_nonce(config, roster, run_id))
    checkpointer = Checkpointer(rank_dir(output_dir, peer), session.components(), config.result_config(),
                                every=config.run.checkpoint_every, keep=config.run.keep_checkpoints, warn=console.print)
    restored = None
    if resume:
        last = group.resume_round(checkpointer.latest_valid())
        if last is None:
            raise CheckpointError(f"nothing to resume: peer {peer} has no valid checkpoint under {checkpointer.directory}")
        if last >= config.run.rounds:
            raise CheckpointError(f"nothing to resume: peer {peer}'s newest checkpoint is of round {last}, the run's last; "
                                  f"its outputs are in {output_dir}")
        restored = checkpointer.restore(last)
        console.print(f"peer {peer} restored its round-{last} checkpoint")
    else:
        shutil.rmtree(checkpointer.directory, ignore_errors=True)  # an earlier run's checkpoints are not this run's
    try:
        link.start()
        console.print(f"peer {peer} listens on {address}; neighbours {link.neighbours}")
        if restored is None:
            link.connect(config.network.timeout_s, strict=True)
            group.agree("config", config.result_config())
            group.agree("roster", {"sha256": roster.sha256})
            group.agree("adapter layout", host.layout.describe())
            group.agree("run id", {"run_id": run_id})
        else:  # the neighbours agreed at the start and are mid-run; a different config shows in their envelopes' run id
            unreachable = link.connect(config.network.timeout_s)
            if unreachable:
                console.print(f"[yellow]peer {peer}: neighbour(s) {unreachable} not reachable yet[/yellow]")
        return _run(session, output_dir, link, routes, roster, key, group.fresh_nonce(), round_timeout,
                    console, started, checkpointer, restored)
    finally:
        link.close()


def rejoin(session: Any, exchange: Exchange, links: LinkExchange, trust: TrustRun, state: LoopState, deadline_s: float,
           console: Console) -> dict[str, Any]:
    """Take part again after a checkpoint of round ``state.round``: the rejoin round of the module
    doc, recorded in the ledger; ``state`` moves to it. Returns what summary.json says of it."""
    config, host, plan = session.config, session.host, session.plan
    peer, last = links.peer, state.round
    console.print(f"peer {peer} waits up to {deadline_s:g} s for its neighbours' messages of a round after {last}")
    current = links.newest_round(last, deadline_s)
    if current is None:
        raise LinkSetupError(f"peer {peer}: no neighbour sent a message of a round after {last} within {deadline_s:g} s "
                             "(network.timeout_s): the run has ended or its peers are not running")
    if current > config.run.rounds:
        raise LinkSetupError(f"peer {peer}: its neighbours are at round {current}, past the run's {config.run.rounds}")
    assert trust.exchange is not None
    links.listen_only = current
    try:
        own = host.peer_model.flat()
        inbox = exchange.exchange(own, current, 0)
    finally:
        links.listen_only = None
    heard = trust.exchange.take_round()  # what it accepted and rejected (its own stale adapter was signed, not sent)
    senders = sorted(j for j, _ in inbox.messages)
    if not senders:
        raise LinkSetupError(f"peer {peer}: no neighbour's round-{current} message was accepted (absent or rejected: "
                             f"see {trust.output_dir / 'ledger'}); a different config, roster or --run-id shows as "
                             "rejected run ids")
    host.peer_model.load_flat(plan.mixing.mix(own, inbox, (current, 0), without_own=True))
    if plan.mixing.mixer.factors_replaced:
        host.trainer.reset_factor_moments()
    host.trainer.skip_steps((current - last) * plan.local_steps)  # the schedule of the rounds it missed and this one
    # It sends the mix it took: its neighbours, who wait for its round-`current` message, get it
    # within their deadline and go on in step with it (silent, it would run a deadline ahead of them).
    links.send_only = current
    try:
        sent_inbox = exchange.exchange(host.peer_model.flat(), current, 0)
    finally:
        links.send_only = None
    said = trust.exchange.take_round()
    heard.sent, heard.seconds["sign"] = said.sent, heard.seconds["sign"] + said.seconds["sign"]
    detail = (f"restarted from its round-{last} checkpoint, took its neighbours' round-{current} mix "
              f"(from peer(s) {senders}) without training in round {current}, and sent it on")
    trust.after_round(current, rejoined=RejoinRecord(last + 1, current - 1, detail), record=heard)
    state.round = current
    missed = list(range(last + 1, current))
    console.print(f"peer {peer} rejoined in round {current}" + (f", missed round(s) {missed}" if missed else "")
                  + f": took peer(s) {senders}' mix")
    return {"resumed_from_round": last, "rejoined_round": current, "missed_rounds": missed, "mixed_from": senders,
            "payload_bytes": sent_inbox.payload_bytes.get(peer, 0)}


def _run(session: Any, output_dir: Path, link: PeerLink, routes: Routes, roster: Roster, key: Ed25519PrivateKey,
         nonce: bytes, round_timeout: float, console: Console, started: float, checkpointer: Checkpointer,
         restored: Any) -> dict[str, Any]:
    config, host = session.config, session.host
    peer = link.peer
    links = LinkExchange(routes, link, host.layout.dtype, wire_dtype(config), round_timeout_s=round_timeout,
                         attachment_bytes=ENVELOPE_BYTES)
    state = LoopState() if restored is None else restored.state
    trust = TrustRun(config, host, routes, output_dir, roster, {peer: key}, nonce,
                     resume_round=None if restored is None else state.round,
                     warn=lambda line: console.print(f"[yellow]peer {peer}: {escape(line)}[/yellow]"))
    checkpointer.add("trust", trust)  # restored too when resuming
    trust.ledgers = {p: AbsenceRecordingLedger(ledger, links.absences_in) for p, ledger in trust.ledgers.items()}  # type: ignore[misc]
    exchange: Exchange = session.share.wrap(trust.wrap(links, session.share.message_numel))
    metric = session.data.task.metric
    atomic.write_text(output_dir / CONFIG_FILE, to_yaml(config))
    log = LinkMetricsLog(output_dir, metric, links.absences_in, None if restored is None else restored.rows)
    view = LinkConsoleView(console, metric, config.run.rounds, config.run.local_steps, links.absences_in)

    def checkpoint(loop_state: LoopState) -> None:
        if checkpointer.due(loop_state.round, config.run.rounds):
            checkpointer.save(loop_state, log.rows)

    settings = RunSettings(rounds=config.run.rounds, eval_every=config.run.eval_every, eval_peers=config.run.eval_peers, peers=1)
    loop = RoundLoop(RoundContext(
        host=host, exchange=exchange, collector=LocalCollector(), plan=session.plan, settings=settings,
        test_batches=session.test_batches, val_batches=session.val_batches,
        monitor=OwnAdapterMonitor(host, session.test_batches),  # type: ignore[arg-type]
        listeners=[log, view], checkpoint=checkpoint, on_step=view.on_step, after_round=trust.after_round,
    ))
    rejoined = None
    with view:
        if restored is not None:
            rejoined = rejoin(session, exchange, links, trust, state, config.network.timeout_s, console)
            # Its rejoin round is scored and logged like any round (evaluating it also keeps the
            # peer in step: its neighbours evaluate that round before they train the next one).
            loop.publish_untrained_round(state, payload_bytes=rejoined.pop("payload_bytes"))
            checkpointer.save(state, log.rows)
        loop.run(state)
    # The last round's messages must reach the neighbours before the link closes (closing cancels them).
    links.flush(round_timeout)
    for absence in links.absences:
        console.print(f"[yellow]peer {peer}: round {absence.round} slot {absence.slot}: mixed without peer "
                      f"{absence.peer} ({escape(absence.reason)})[/yellow]")
    remove_stale_outputs(config, output_dir, session.peers)
    save_peer_adapters(session, output_dir)
    trust.finish()
    trust.close()
    shutil.rmtree(output_dir / "consensus", ignore_errors=True)  # no consensus adapter here: no one holds every adapter
    peaks = gather_peak_memory(LocalCollector(), host.device, 1, config.run.rounds + 2)
    departed = list(links.departed(config.run.rounds))
    extra: dict[str, Any] = {
        "transport": "grpc-mtls", "peer": peer, "neighbours": routes.in_neighbours(peer), "run_nonce": nonce.hex(),
        "round_timeout_s": round_timeout, "absent": [a.to_dict() for a in links.absences], "departed": departed,
        "returned": list(links.returned()), **({} if rejoined is None else {"rejoined": rejoined}),
        "trust": trust_summary(trust, trust.rejections, mode="keys"),
        **(peaks or {}),
        "adapter_files": folder_digests(output_dir, [f"adapters/peer-{peer}"]),
    }
    adapters = [f"adapters/peer-{peer}"] if config.run.save_adapters else []
    summary = run_summary(session, log.rows, time.perf_counter() - started,
                          {"adapters": adapters, "consensus_adapter": None, "merged_model": None}, **extra)
    summary.write(output_dir / SUMMARY_FILE)
    for gone in departed:
        console.print(f"[yellow]peer {peer}: neighbour {gone['peer']} left after round {gone['last_heard_round']}[/yellow]")
    for back in extra["returned"]:
        console.print(f"[yellow]peer {peer}: neighbour {back['peer']} was absent in rounds {back['absent_from_round']}-"
                      f"{back['absent_to_round']} and came back in round {back['back_in_round']}[/yellow]")
    from d2ora.report import write_run_report

    report = write_run_report(output_dir, summary, log.rows)
    console.print(f"report: {report} ({summary.runtime_s:.0f} s)")
    return summary.to_dict()


__all__ = ["LinkSetupError", "peer_of_key", "run_link_peer", "run_nonce"]
