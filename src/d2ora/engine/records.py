"""The typed record of one round, and the listeners that subscribe to it.

One :class:`RoundRecord` per round (round 0 = before training) feeds the metrics files, the
console, TensorBoard and the checkpoints alike; ``to_row`` is the JSON form in ``metrics.jsonl``
(and what the report and ``d2ora compare`` read back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

Metrics = dict[str, float]


@dataclass
class Evaluation:
    """Scores of one evaluated round, for all P peers."""

    metric: str  # the task's headline metric ("accuracy", "perplexity")
    consensus_test: Metrics
    consensus_distance: dict[str, float | None]  # magnitude (None for LoRA), product, merged
    peer_test: list[Metrics] | None = None  # None when peers are not scored (eval_peers: false)
    peer_val: list[Metrics | None] = field(default_factory=list)  # None: empty validation split
    #: The peers the summary scores (the honest ones when some attack; None: all).
    honest: list[int] | None = None

    @property
    def mean_peer_test(self) -> Metrics | None:
        """Mean, min and max over the honest peers (a Byzantine peer's own model is not a result)."""
        if not self.peer_test:
            return None
        scored = range(len(self.peer_test)) if self.honest is None else self.honest
        values = [self.peer_test[k][self.metric] for k in scored]
        return {self.metric: sum(values) / len(values), "min": min(values), "max": max(values)}

    @property
    def mean_peer_val(self) -> Metrics | None:
        """Mean, min and max over the honest peers of each peer's score on its own held-out split
        (its local distribution: the personalized view). Under label skew this partly rewards
        learning the peer's label prior, so it is reported beside the global test scores, never alone."""
        scored = range(len(self.peer_val)) if self.honest is None else self.honest
        values = [self.peer_val[k][self.metric] for k in scored if k < len(self.peer_val) and self.peer_val[k] is not None]
        if not values:
            return None
        return {self.metric: sum(values) / len(values), "min": min(values), "max": max(values)}

    def to_row(self) -> dict[str, Any]:
        row = {
            "peer_test": self.peer_test,
            "mean_peer_test": self.mean_peer_test,
            "mean_peer_val": self.mean_peer_val,
            "consensus_test": self.consensus_test,
            "peer_val": self.peer_val,
            "consensus_distance": self.consensus_distance,
        }
        if self.honest is not None:
            row["honest_peers"] = self.honest
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], metric: str) -> Evaluation:
        return cls(metric=metric, consensus_test=row["consensus_test"], consensus_distance=row["consensus_distance"],
                   peer_test=row.get("peer_test"), peer_val=row.get("peer_val") or [], honest=row.get("honest_peers"))


@dataclass
class RoundRecord:
    """What happened in one round, for all P peers."""

    round: int
    samples_seen: int
    train_loss: list[float | None]  # per peer, mean over the round's local steps (None at round 0)
    bytes_sent: list[int]  # per peer, payload bytes it sent this round
    bytes_sent_total: int  # all peers, all rounds so far
    wall_time_s: float = 0.0
    evaluation: Evaluation | None = None
    #: The slowest process's seconds in local steps, exchange (sending, receiving, waiting) and mixing.
    seconds: dict[str, float] | None = None
    #: Bytes put on the wire between processes (payload + headers); 0 in one process.
    wire_bytes: int = 0

    @property
    def peers(self) -> int:
        return len(self.train_loss)

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": self.round, "samples_seen": self.samples_seen, "wall_time_s": self.wall_time_s,
            "train_loss": self.train_loss, "bytes_sent": self.bytes_sent, "bytes_sent_total": self.bytes_sent_total,
        }
        if self.seconds is not None:
            row["round_seconds"] = self.seconds
            row["wire_bytes"] = self.wire_bytes
        if self.evaluation is not None:
            row.update(self.evaluation.to_row())
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], metric: str) -> RoundRecord:
        evaluation = Evaluation.from_row(row, metric) if "consensus_test" in row else None
        return cls(round=row["round"], samples_seen=row["samples_seen"], train_loss=row["train_loss"],
                   bytes_sent=row["bytes_sent"], bytes_sent_total=row["bytes_sent_total"],
                   wall_time_s=row.get("wall_time_s", 0.0), evaluation=evaluation,
                   seconds=row.get("round_seconds"), wire_bytes=row.get("wire_bytes", 0))


def clean(value: Any) -> Any:
    """JSON has no NaN / inf: write them as null (a diverged peer must not make a file unreadable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


class RoundListener(Protocol):
    """Subscribes to round records (metrics files, console, TensorBoard, checkpoints, ledger)."""

    def on_round(self, record: RoundRecord) -> None: ...
