"""Per-peer values that cross processes by name: each record or metric is a named column of the one
float64 table a :class:`~d2ora.engine.loop.Collector` gathers (one row per peer, in peer order).

Writers and readers both go through the names, so adding a value cannot shift another one's
column, and the monitor's process reads ``payload_bytes``, not "column 1". float64 holds every
float32 loss or metric and every count below 2⁵³ exactly, so the round trip changes no value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import torch


class ValueTable:
    """Named float64 columns of a per-peer table; a value not given is NaN."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"column names repeat: {list(names)}")
        self.names = tuple(names)
        self.index = {name: i for i, name in enumerate(self.names)}

    def encode(self, rows: Sequence[Mapping[str, float]]) -> torch.Tensor:
        """``(len(rows), columns)`` float64, each row's values in their named columns."""
        out = torch.full((len(rows), len(self.names)), math.nan, dtype=torch.float64)
        for k, row in enumerate(rows):
            for name, value in row.items():
                out[k, self.index[name]] = float(value)
        return out

    def decode(self, table: torch.Tensor) -> list[dict[str, float]]:
        if table.dim() != 2 or table.shape[1] != len(self.names):
            raise ValueError(f"a table of shape {tuple(table.shape)} for {len(self.names)} named columns")
        return [dict(zip(self.names, row)) for row in table.double().tolist()]


@dataclass(frozen=True)
class PeerRoundValues:
    """One hosted peer's numbers of a round, as they travel to the monitor's process."""

    train_loss: float  # mean over the round's local steps
    payload_bytes: int  # bytes of the messages it sent
    samples: int  # examples it trained on
    local_s: float  # its process's time in the local steps, the gossip's exchanges and its mixes
    exchange_s: float
    mix_s: float
    #: Its process's bytes on the wire, on the process's first hosted peer only (0 on the others),
    #: so the column's sum is the job's.
    wire_bytes: int

    TABLE: ClassVar[ValueTable]

    @classmethod
    def encode(cls, rows: Sequence[PeerRoundValues]) -> torch.Tensor:
        return cls.TABLE.encode([dict(zip(cls.TABLE.names, astuple(row))) for row in rows])

    @classmethod
    def decode(cls, table: torch.Tensor) -> list[PeerRoundValues]:
        kinds = {f.name: f.type for f in fields(cls)}
        return [cls(**{name: int(v) if kinds[name] in (int, "int") else v for name, v in row.items()})
                for row in cls.TABLE.decode(table)]


PeerRoundValues.TABLE = ValueTable([f.name for f in fields(PeerRoundValues)])


class MetricColumns:
    """Per-peer metric dicts (None: not scored) of named sections (``val``, ``test``) as one table:
    column ``<section>`` says whether the peer was scored, ``<section>.<metric>`` holds each value and
    ``<section>.<metric>?`` whether the peer's result has that metric at all (sft answers the test
    prompts for generative accuracy but scores its own validation split by perplexity alone), so a
    metric that is NaN stays NaN and a metric that is absent stays absent."""

    def __init__(self, sections: Sequence[str], keys: Sequence[str], int_keys: frozenset[str] = frozenset()) -> None:
        self.sections, self.keys, self.int_keys = tuple(sections), tuple(keys), int_keys
        self.table = ValueTable([name for s in self.sections
                                 for name in (s, *(f"{s}.{k}{mark}" for k in self.keys for mark in ("", "?")))])

    def encode(self, results: Mapping[str, Sequence[Mapping[str, float] | None]]) -> torch.Tensor:
        """``results[section][k]``: peer k's metrics (None: not scored); every section, same peers."""
        peers = {len(v) for v in results.values()}
        if set(results) != set(self.sections) or len(peers) != 1:
            raise ValueError(f"metrics for sections {sorted(results)} of {sorted(peers)} peers; expected {list(self.sections)}")
        rows: list[dict[str, float]] = [{} for _ in range(peers.pop())]
        for section, per_peer in results.items():
            for row, result in zip(rows, per_peer):
                if result is not None:
                    unknown = set(result) - set(self.keys)
                    if unknown:
                        raise ValueError(f"metrics {sorted(unknown)} were not in the first evaluation's {list(self.keys)}")
                    row[section] = 1.0
                    for key in self.keys:
                        if key in result:
                            row[f"{section}.{key}"] = float(result[key])
                            row[f"{section}.{key}?"] = 1.0
        return self.table.encode(rows)

    def decode(self, table: torch.Tensor) -> dict[str, list[dict[str, float] | None]]:
        rows = self.table.decode(table)

        def value(row: Mapping[str, float], section: str, key: str) -> float:
            v = row[f"{section}.{key}"]
            return int(v) if key in self.int_keys else v

        return {
            section: [
                None if row[section] != 1.0 else
                {key: value(row, section, key) for key in self.keys if row[f"{section}.{key}?"] == 1.0}
                for row in rows
            ]
            for section in self.sections
        }
