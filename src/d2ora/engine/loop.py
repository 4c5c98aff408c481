"""The rounds loop of one process: run each round, gather what the monitor needs, publish records.

Every process runs this loop over the peers it hosts. The :class:`Collector` is the only part that
differs between runtimes: in one process it hands the host's values straight to the monitor; under
torchrun it sends them to rank 0, which hosts peer 0 and the consensus monitor. Only the monitor's
process builds :class:`~d2ora.engine.records.RoundRecord` s and tells its listeners (metrics
files, console, TensorBoard); every process checkpoints its own peers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from d2ora.data.tasks import Batch
from d2ora.engine.evaluate import evaluate_each_on_own, evaluate_peers
from d2ora.engine.exchange import Exchange
from d2ora.engine.host import PeerHost
from d2ora.engine.monitor import ConsensusMonitor
from d2ora.engine.records import Evaluation, RoundListener, RoundRecord
from d2ora.engine.round import RoundPlan, run_round


#: The parts of a round's time each process reports (the record keeps the slowest process's).
SECONDS = ("local", "exchange", "mix")


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


def _encode(results: Sequence[dict[str, float] | None], keys: Sequence[str]) -> torch.Tensor:
    """Per-peer metric dicts as (n, 1 + len(keys)) float64: a presence flag, then the values."""
    out = torch.full((len(results), 1 + len(keys)), math.nan, dtype=torch.float64)
    for k, result in enumerate(results):
        if result is not None:
            out[k, 0] = 1.0
            out[k, 1:] = torch.tensor([float(result[key]) for key in keys], dtype=torch.float64)
    return out


def _decode(values: torch.Tensor, keys: Sequence[str], int_keys: frozenset[str]) -> list[dict[str, float] | None]:
    """The inverse of :func:`_encode`; float64 holds every float32 metric and count exactly."""
    return [
        None if row[0] != 1.0 else {key: int(v) if key in int_keys else float(v) for key, v in zip(keys, row[1:].tolist())}
        for row in values
    ]


class RoundLoop:
    """``rounds`` rounds of one process's hosted peers, starting after ``state.round``."""

    def __init__(
        self,
        host: PeerHost,
        exchange: Exchange,
        collector: Collector,
        plan: RoundPlan,
        *,
        rounds: int,
        eval_every: int,
        eval_peers: bool,
        test_batches: Sequence[Batch],
        val_batches: Sequence[list[Batch]],  # per hosted peer
        monitor: ConsensusMonitor | None,
        peers: int,
        listeners: Sequence[RoundListener] = (),
        checkpoint: Callable[[LoopState], None] | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        after_round: Callable[[int], None] | None = None,
    ) -> None:
        if collector.is_monitor != (monitor is not None):
            raise ValueError("the monitor runs in exactly the collector's monitor process")
        self.host, self.exchange, self.collector, self.plan = host, exchange, collector, plan
        self.rounds, self.eval_every, self.eval_peers = rounds, eval_every, eval_peers
        self.test_batches, self.val_batches = list(test_batches), list(val_batches)
        self.monitor, self.peers = monitor, peers
        self.listeners = list(listeners)
        self.checkpoint = checkpoint
        self.on_step = on_step
        self.after_round = after_round  # e.g. the trust layer's ledger blocks, before the checkpoint
        self.metric_keys: list[str] | None = None
        self.int_keys: frozenset[str] = frozenset()

    def _keys(self, sample: dict[str, float]) -> list[str]:
        """The task's metric names in its own order (the same in every process), and which are counts."""
        if self.metric_keys is None:
            self.metric_keys = list(sample)
            self.int_keys = frozenset(k for k, v in sample.items() if isinstance(v, int))
        return self.metric_keys

    def evaluate(self, round_index: int) -> tuple[Evaluation, torch.Tensor] | None:
        """Every hosted peer scored here; in the monitor's process the evaluation of all peers and
        the scored consensus adapter (None elsewhere)."""
        host = self.host
        peer_test = evaluate_peers(host.peer_model, host.task, self.test_batches, host.device) if self.eval_peers else None
        peer_val = evaluate_each_on_own(host.peer_model, host.task, self.val_batches, host.device)
        sample = (peer_test or [r for r in peer_val if r is not None] or [None])[0]
        if sample is None:  # no test scoring and no validation data: take the keys from one evaluation
            sample = evaluate_peers(host.peer_model, host.task, self.test_batches[:1], host.device, peers=[0])[0]
        keys = self._keys(sample)
        columns = [_encode(peer_val, keys)] + ([_encode(peer_test, keys)] if peer_test is not None else [])
        gathered = self.collector.gather_values(torch.cat(columns, dim=1), round_index)
        flat = self.collector.gather_adapters(host.peer_model.flat(), round_index)
        if self.monitor is None:
            return None
        width = 1 + len(keys)
        all_val = _decode(gathered[:, :width], keys, self.int_keys)
        all_test = _decode(gathered[:, width:], keys, self.int_keys) if peer_test is not None else None
        result = self.monitor.evaluate(flat, round_index)
        honest = self.monitor.members if self.monitor.members is not None and len(self.monitor.members) < self.peers else None
        evaluation = Evaluation(metric=host.task.metric, consensus_test=result.test, consensus_distance=result.distances,
                                peer_test=all_test, peer_val=all_val, honest=honest)
        return evaluation, result.adapter

    def _publish(self, record: RoundRecord) -> None:
        for listener in self.listeners:
            listener.on_round(record)

    def run(self, state: LoopState) -> LoopState:
        started = time.perf_counter() - state.elapsed_s
        if state.round == 0:
            scored = self.evaluate(0)
            if scored is not None:
                evaluation, state.consensus = scored
                record = RoundRecord(round=0, samples_seen=0, train_loss=[None] * self.peers, bytes_sent=[0] * self.peers,
                                     bytes_sent_total=0, wall_time_s=0.0, evaluation=evaluation)
                self._publish(record)
        for rnd in range(state.round + 1, self.rounds + 1):
            step_hook = None if self.on_step is None else (lambda losses, _r=rnd: self.on_step(_r, losses))
            done = run_round(self.host, self.exchange, self.plan, rnd, on_step=step_hook)
            if self.after_round is not None:
                self.after_round(rnd)
            hosted = len(done.samples)
            timing = [torch.full((hosted,), done.seconds[k], dtype=torch.float64) for k in SECONDS]
            wire = torch.zeros(hosted, dtype=torch.float64)
            wire[0] = done.wire_bytes  # once per process
            values = torch.stack([done.train_loss.double(), torch.tensor(done.payload_bytes, dtype=torch.float64),
                                  torch.tensor(done.samples, dtype=torch.float64), *timing, wire], dim=1)
            gathered = self.collector.gather_values(values, rnd)
            scored = self.evaluate(rnd) if rnd % self.eval_every == 0 or rnd == self.rounds else None
            evaluation = None
            if scored is not None:
                evaluation, state.consensus = scored
            state.round = rnd
            if gathered is not None:
                sent = [int(v) for v in gathered[:, 1].tolist()]
                state.samples_seen += int(gathered[:, 2].sum().item())
                state.bytes_total += sum(sent)
                state.elapsed_s = time.perf_counter() - started
                seconds = {k: float(gathered[:, 3 + i].max()) for i, k in enumerate(SECONDS)}
                record = RoundRecord(round=rnd, samples_seen=state.samples_seen, train_loss=gathered[:, 0].tolist(),
                                     bytes_sent=sent, bytes_sent_total=state.bytes_total, wall_time_s=state.elapsed_s,
                                     evaluation=evaluation, seconds=seconds, wire_bytes=int(gathered[:, 3 + len(SECONDS)].sum()))
                self._publish(record)
            if self.checkpoint is not None:
                self.checkpoint(state)
        return state
