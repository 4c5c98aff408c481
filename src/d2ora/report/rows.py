"""Reading the numbers out of a run's metric rows and summary.

``rows`` are the lines of ``metrics.jsonl`` (round 0 is before any training), plain dicts as loaded
from JSON, and ``summary`` is the run's :class:`~d2ora.report.model.RunSummary`. Optional per-round
fields (peer and consensus evaluations, validation, consensus distances) may be ``null`` in rows that
were not evaluated: every accessor here returns ``None`` (or an empty list) for what a row does not
have. Tables, Markdown and plots all read through these, so they agree on what a number means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from d2ora.report.model import RunSummary, SummaryInput

Row = Mapping[str, Any]
Summary = RunSummary  # the name the report gave summary.json when it was a plain dict
Run = tuple[RunSummary, Sequence[Row]]
#: A run as the report's public functions take it: the summary may still be a plain dict.
RunInput = tuple[SummaryInput, Sequence[Row]]

# The consensus distance on each DoRA factor: key in ``consensus_distance`` -> label.
DISTANCES = (("magnitude", "m"), ("product", "B·A"), ("merged", "W'"))
#: The key an sft run's evaluations hold its greedy-answer accuracy under (``data.generation`` writes
#: it; spelled out here so that reading reports does not import the model code).
GENERATIVE_ACCURACY = "generative_accuracy"


def metric_name(summary: Summary) -> str:
    return summary.metric or "accuracy"


def is_higher_better(summary: Summary) -> bool:
    value = summary.higher_is_better
    return metric_name(summary) == "accuracy" if value is None else bool(value)


def is_percent(summary: Summary) -> bool:
    return metric_name(summary) == "accuracy"


def metric_label(summary: Summary) -> str:
    """The metric with its unit, for headers and axis labels."""
    return f"{metric_name(summary)} (%)" if is_percent(summary) else metric_name(summary)


def metric_scale(summary: Summary) -> float:
    """Accuracy is stored as a fraction but read as a percent."""
    return 100.0 if is_percent(summary) else 1.0


def mean_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def entry_metric(entry: Any, metric: str) -> float | None:
    """One evaluation dict's metric, or None where the entry (or the value) is missing."""
    if not isinstance(entry, Mapping):
        return None
    value = entry.get(metric)
    return None if value is None else float(value)


def peer_metrics(row: Row, metric: str) -> list[float | None]:
    """Each peer's test metric in ``row`` (empty when the peers were not evaluated)."""
    return [entry_metric(e, metric) for e in row.get("peer_test") or []]


def own_split_mean(row: Row, metric: str) -> float | None:
    """The peers' mean metric on their own held-out splits (``mean_peer_val``; older rows: the mean
    of ``peer_val``), or None when no peer had one."""
    if row.get("mean_peer_val"):
        return entry_metric(row["mean_peer_val"], metric)
    return mean_of(entry_metric(e, metric) for e in row.get("peer_val") or [])


def peer_stats(row: Row, metric: str) -> tuple[float, float, float] | None:
    """Mean, min and max of the peers' test metric, or None when no peer was evaluated."""
    values = [v for v in peer_metrics(row, metric) if v is not None]
    if not values:
        return None
    return sum(values) / len(values), min(values), max(values)


def worst(values: Sequence[float], higher_is_better: bool) -> float | None:
    if not values:
        return None
    return min(values) if higher_is_better else max(values)


def consensus_metric(row: Row, metric: str) -> float | None:
    return entry_metric(row.get("consensus_test"), metric)


def distance(row: Row, key: str) -> float | None:
    dist = row.get("consensus_distance")
    if not isinstance(dist, Mapping) or dist.get(key) is None:
        return None
    return float(dist[key])


def mean_train_loss(row: Row) -> float | None:
    return mean_of(float(v) for v in row.get("train_loss") or [] if v is not None)


def is_evaluated(row: Row) -> bool:
    return row.get("consensus_test") is not None or row.get("peer_test") is not None


def last_with(rows: Sequence[Row], key: str) -> Row | None:
    """The last row whose ``key`` is set: evaluation may skip the final rounds' fields."""
    return next((r for r in reversed(rows) if r.get(key) is not None), None)


def rows_or_final(summary: Summary, rows: Sequence[Row]) -> Sequence[Row]:
    """The rows, or the summary's final row when no per-round rows were given."""
    if rows:
        return rows
    final = summary.final
    return [final] if isinstance(final, Mapping) else []


def peer_count(summary: Summary, rows: Sequence[Row]) -> int:
    lengths = [len(r.get(k) or []) for r in rows for k in ("peer_test", "train_loss", "bytes_sent")]
    return max([summary.peers or 0, *lengths])


def item_at(values: Sequence[Any] | None, i: int) -> Any:
    return values[i] if values is not None and i < len(values) else None


def consensus_examples(row: Row | None) -> int | None:
    """How many test examples the consensus evaluation in ``row`` used (its ``examples`` field)."""
    entry = row.get("consensus_test") if row else None
    count = entry.get("examples") if isinstance(entry, Mapping) else None
    return None if count is None else int(count)
