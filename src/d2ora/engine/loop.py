"""The rounds loop of one process: run each round, gather what the monitor needs, publish records.

Every process runs this loop over the peers it hosts. The :class:`Collector` is the only part that
differs between runtimes: in one process it hands the host's values straight to the monitor; under
torchrun it sends them to rank 0, which hosts peer 0 and the consensus monitor. Only the monitor's
process builds :class:`~d2ora.engine.records.RoundRecord` s and tells its listeners (metrics
files, console, TensorBoard); every process checkpoints its own peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from d2ora.data.tasks import Batch
from d2ora.engine.evaluate import evaluate_each_on_own, evaluate_peers
from d2ora.engine.exchange import Exchange
from d2ora.engine.host import PeerHost
from d2ora.engine.monitor import ConsensusMonitor
from d2ora.engine.peer_values import MetricColumns, PeerRoundValues
from d2ora.engine.records import Evaluation, RoundListener, RoundRecord
from d2ora.engine.round import HostRound, RoundPlan, run_round


class Collector(Protocol):
    """Brings every host's per-peer values to the monitor's process (None elsewhere)."""

    is_monitor: bool

    def gather_values(self, values: torch.Tensor, round_index: int) -> torch.Tensor | None:
        """(hosted, F) float64 -> (P, F) in the monitor's process."""
        ...

    def gather_adapters(self, flat: torch.Tensor, round_index: int) -> torch.Tensor | None:
        """(hosted, numel) -> (P, numel) in the monitor's process."""
        ...


class LocalCollector:
    """One process hosts every peer: its values are everybody's."""

    is_monitor = True

    def gather_values(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        return values

    def gather_adapters(self, flat: torch.Tensor, round_index: int) -> torch.Tensor:
        return flat


@dataclass
class LoopState:
    """The counters a checkpoint restores besides the peers themselves."""

    round: int = 0  # last finished round (0: only the start has been scored)
    samples_seen: int = 0
    bytes_total: int = 0
    elapsed_s: float = 0.0
    consensus: torch.Tensor | None = None  # the last scored consensus adapter (monitor only)

    def state_dict(self) -> dict[str, Any]:
        """The counters (JSON) and, where scored, the consensus adapter (:mod:`d2ora.engine.state`)."""
        state: dict[str, Any] = {"round": self.round, "samples_seen": self.samples_seen,
                                 "bytes_total": self.bytes_total, "elapsed_s": self.elapsed_s}
        if self.consensus is not None:
            state["consensus"] = self.consensus
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round, self.samples_seen = int(state["round"]), int(state["samples_seen"])
        self.bytes_total, self.elapsed_s = int(state["bytes_total"]), float(state["elapsed_s"])
        consensus = state.get("consensus")
        self.consensus = None if consensus is None else consensus.clone()


@dataclass(frozen=True)
class RunSettings:
    """The loop's numbers, fixed for the run (the recipe reads them from the config)."""

    rounds: int
    eval_every: int
    eval_peers: bool  # score every peer on the test set too (not only the consensus)
    peers: int  # P, over all processes


@dataclass
class RoundContext:
    """Everything one process's rounds loop works with, assembled once by the recipe."""

    host: PeerHost
    exchange: Exchange
    collector: Collector
    plan: RoundPlan
    settings: RunSettings
    test_batches: Sequence[Batch]
    val_batches: Sequence[list[Batch]]  # per hosted peer
    monitor: ConsensusMonitor | None = None  # exactly in the collector's monitor process
    listeners: Sequence[RoundListener] = ()
    checkpoint: Callable[[LoopState], None] | None = None
    on_step: Callable[[int, torch.Tensor], None] | None = None  # (round, losses) after each local step
    after_round: Callable[[int], None] | None = None  # e.g. the trust layer's ledger blocks, before the checkpoint


class RoundLoop:
    """``rounds`` rounds of one process's hosted peers, starting after ``state.round``."""

    def __init__(self, context: RoundContext) -> None:
        if context.collector.is_monitor != (context.monitor is not None):
            raise ValueError("the monitor runs in exactly the collector's monitor process")
        self.context = context
        self.listeners = list(context.listeners)
        #: The task's metric columns, fixed by the first evaluation (the same in every process).
        self.metric_columns: MetricColumns | None = None

    def _columns(self, sample: dict[str, float], sections: list[str]) -> MetricColumns:
        """The task's metric names in its own order (the same in every process), which are counts,
        and the sections scored (``val``; ``test`` with eval_peers): fixed by the first evaluation."""
        if self.metric_columns is None:
            int_keys = frozenset(k for k, v in sample.items() if isinstance(v, int))
            self.metric_columns = MetricColumns(sections, list(sample), int_keys)
        return self.metric_columns

    def evaluate(self, round_index: int) -> tuple[Evaluation, torch.Tensor] | None:
        """Every hosted peer scored here; in the monitor's process the evaluation of all peers and
        the scored consensus adapter (None elsewhere)."""
        ctx = self.context
        host, test_batches = ctx.host, list(ctx.test_batches)
        peer_test = evaluate_peers(host.peer_model, host.task, test_batches, host.device) if ctx.settings.eval_peers else None
        peer_val = evaluate_each_on_own(host.peer_model, host.task, list(ctx.val_batches), host.device)
        sample = (peer_test or [r for r in peer_val if r is not None] or [None])[0]
        if sample is None:  # no test scoring and no validation data: take the keys from one evaluation
            sample = evaluate_peers(host.peer_model, host.task, test_batches[:1], host.device, peers=[0])[0]
        results: dict[str, list[dict[str, float] | None]] = {"val": list(peer_val)}
        if peer_test is not None:
            results["test"] = list(peer_test)
        columns = self._columns(sample, list(results))
        gathered = ctx.collector.gather_values(columns.encode(results), round_index)
        flat = ctx.collector.gather_adapters(host.peer_model.flat(), round_index)
        if ctx.monitor is None:
            return None
        scores = columns.decode(gathered)
        result = ctx.monitor.evaluate(flat, round_index)
        members = ctx.monitor.members
        honest = members if members is not None and len(members) < ctx.settings.peers else None
        evaluation = Evaluation(metric=host.task.metric, consensus_test=result.test, consensus_distance=result.distances,
                                peer_test=scores.get("test"), peer_val=scores["val"], honest=honest)
        return evaluation, result.adapter

    def _publish(self, record: RoundRecord) -> None:
        for listener in self.listeners:
            listener.on_round(record)

    def _gather_round(self, done: HostRound) -> list[PeerRoundValues] | None:
        """Round ``done.round``'s values of every peer, in the monitor's process (None elsewhere)."""
        mine = [
            PeerRoundValues(train_loss=float(done.train_loss[k]), payload_bytes=done.payload_bytes[k], samples=done.samples[k],
                            local_s=done.seconds["local"], exchange_s=done.seconds["exchange"], mix_s=done.seconds["mix"],
                            wire_bytes=done.wire_bytes if k == 0 else 0)  # once per process
            for k in range(len(done.samples))
        ]
        gathered = self.context.collector.gather_values(PeerRoundValues.encode(mine), done.round)
        return None if gathered is None else PeerRoundValues.decode(gathered)

    def _update(self, peers: list[PeerRoundValues], state: LoopState, started: float,
                evaluation: Evaluation | None) -> RoundRecord:
        sent = [p.payload_bytes for p in peers]
        state.samples_seen += sum(p.samples for p in peers)
        state.bytes_total += sum(sent)
        state.elapsed_s = time.perf_counter() - started
        # The slowest process's time for each part.
        seconds = {"local": max(p.local_s for p in peers), "exchange": max(p.exchange_s for p in peers),
                   "mix": max(p.mix_s for p in peers)}
        return RoundRecord(round=state.round, samples_seen=state.samples_seen, train_loss=[p.train_loss for p in peers],
                           bytes_sent=sent, bytes_sent_total=state.bytes_total, wall_time_s=state.elapsed_s,
                           evaluation=evaluation, seconds=seconds, wire_bytes=sum(p.wire_bytes for p in peers))

    def _scored_in(self, rnd: int) -> bool:
        """Every ``eval_every`` rounds and the last one."""
        settings = self.context.settings
        return rnd % settings.eval_every == 0 or rnd == settings.rounds

    def publish_untrained_round(self, state: LoopState, *, payload_bytes: int) -> RoundRecord:
        """Record round ``state.round`` for a process whose peers trained nothing in it (the round a
        peer rejoins in): scored if due, published with no train loss and no samples. One process
        per peer only: nothing is gathered from other processes."""
        settings = self.context.settings
        rnd = state.round
        scored = self.evaluate(rnd) if self._scored_in(rnd) else None
        evaluation = None
        if scored is not None:
            evaluation, state.consensus = scored
        state.bytes_total += payload_bytes
        record = RoundRecord(round=rnd, samples_seen=state.samples_seen, train_loss=[None] * settings.peers,
                             bytes_sent=[payload_bytes] + [0] * (settings.peers - 1), bytes_sent_total=state.bytes_total,
                             wall_time_s=state.elapsed_s, evaluation=evaluation)
        self._publish(record)
        return record

    def run(self, state: LoopState) -> LoopState:
        ctx = self.context
        settings = ctx.settings
        started = time.perf_counter() - state.elapsed_s
        if state.round == 0:
            scored = self.evaluate(0)
            if scored is not None:
                evaluation, state.consensus = scored
                record = RoundRecord(round=0, samples_seen=0, train_loss=[None] * settings.peers,
                                     bytes_sent=[0] * settings.peers, bytes_sent_total=0, wall_time_s=0.0, evaluation=evaluation)
                self._publish(record)
        for rnd in range(state.round + 1, settings.rounds + 1):
            step_hook = None if ctx.on_step is None else (lambda losses, _r=rnd: ctx.on_step(_r, losses))
            done = run_round(ctx.host, ctx.exchange, ctx.plan, rnd, on_step=step_hook)
            if ctx.after_round is not None:
                ctx.after_round(rnd)
            peers = self._gather_round(done)  # before the evaluation's gathers: every process in the same order
            scored = self.evaluate(rnd) if self._scored_in(rnd) else None
            evaluation = None
            if scored is not None:
                evaluation, state.consensus = scored
            state.round = rnd
            if peers is not None:
                self._publish(self._update(peers, state, started, evaluation))
            if ctx.checkpoint is not None:
                ctx.checkpoint(state)
        return state
