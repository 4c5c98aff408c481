"""Per-round metrics on disk: ``metrics.jsonl`` (one JSON object per round, the full record) and
``metrics.csv`` (the same flattened to columns, one per peer where per-peer), rewritten
atomically after every round so a crash or Ctrl-C keeps every finished round readable."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from d2ora import atomic
from d2ora.engine.records import RoundRecord, clean

JSONL = "metrics.jsonl"
CSV = "metrics.csv"


def flatten(row: dict[str, Any], metric: str) -> dict[str, Any]:
    """One CSV row: scalars as they are, per-peer lists as ``<name>_p<k>`` columns."""
    flat: dict[str, Any] = {
        "round": row["round"],
        "samples_seen": row["samples_seen"],
        "wall_time_s": round(row["wall_time_s"], 3),
        "bytes_sent_total": row["bytes_sent_total"],
    }
    if "wire_bytes" in row:
        flat["wire_bytes"] = row["wire_bytes"]
    for key, value in (row.get("round_seconds") or {}).items():
        flat[f"seconds_{key}"] = round(value, 4)
    for key, value in (row.get("consensus_distance") or {}).items():
        flat[f"consensus_distance_{key}"] = value
    consensus = row.get("consensus_test") or {}
    flat[f"consensus_test_{metric}"] = consensus.get(metric)
    losses = row.get("train_loss") or []
    for k, loss in enumerate(losses):
        flat[f"train_loss_p{k}"] = loss
    for k, result in enumerate(row.get("peer_test") or []):
        flat[f"test_{metric}_p{k}"] = (result or {}).get(metric)
    for k, result in enumerate(row.get("peer_val") or []):
        flat[f"val_{metric}_p{k}"] = (result or {}).get(metric)
    for k, sent in enumerate(row.get("bytes_sent") or []):
        flat[f"bytes_sent_p{k}"] = sent
    return flat


class MetricsLog:
    """Collects round records and keeps both files in step with them (a round listener).

    ``rows`` may start with the rounds of an earlier, interrupted run being resumed."""

    def __init__(self, directory: Path, metric: str, rows: list[dict[str, Any]] | None = None) -> None:
        self.directory = Path(directory)
        self.metric = metric
        self.rows: list[dict[str, Any]] = list(rows or [])

    def on_round(self, record: RoundRecord) -> None:
        self.append(record.to_row())

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(clean(row))
        lines = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic.write_text(self.directory / JSONL, lines)
        atomic.write_text(self.directory / CSV, self._csv())

    def _csv(self) -> str:
        flats = [flatten(r, self.metric) for r in self.rows]
        columns: list[str] = []
        for flat in flats:  # union of columns in first-seen order (later rounds may add evaluations)
            columns.extend(c for c in flat if c not in columns)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(flats)
        return out.getvalue()


def read_rows(directory: Path) -> list[dict[str, Any]]:
    """The round records of a finished (or interrupted) run."""
    text = (Path(directory) / JSONL).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
