"""What the results and comparison tables hold, and their rich renderings for the terminal.

The headers and formatted records built here are shared with the Markdown report, so the
terminal and the files always show the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from d2ora.report.formatting import DASH, fmt_float, fmt_mb, fmt_metric, fmt_sci
from d2ora.report.rows import (
    DISTANCES,
    Row,
    Run,
    Summary,
    consensus_metric,
    distance,
    is_evaluated,
    is_higher_better,
    last_with,
    mean_of,
    mean_train_loss,
    metric_label,
    metric_name,
    peer_metrics,
    peer_stats,
    rows_or_final,
    worst,
)


def results_headers(summary: Summary) -> list[str]:
    label = metric_label(summary)
    return [
        "round", "samples seen", "train loss (mean)", f"consensus {label}",
        f"mean peer {label}", "peer min", "peer max",
        *(f"distance {name}" for _, name in DISTANCES), "MB sent (cumulative)",
    ]


def _results_cells(summary: Summary, row: Row) -> list[str]:
    stats = peer_stats(row, metric_name(summary))
    mean, lo, hi = stats if stats else (None, None, None)
    total = row.get("bytes_sent_total")
    return [
        str(row.get("round", DASH)),
        f"{int(row.get('samples_seen') or 0):,}",
        fmt_float(mean_train_loss(row), 4),
        fmt_metric(summary, consensus_metric(row, metric_name(summary))),
        fmt_metric(summary, mean), fmt_metric(summary, lo), fmt_metric(summary, hi),
        *(fmt_sci(distance(row, key)) for key, _ in DISTANCES),
        fmt_mb(None if total is None else float(total)),
    ]


def results_records(summary: Summary, rows: Sequence[Row]) -> list[list[str]]:
    return [_results_cells(summary, r) for r in rows if is_evaluated(r)]


@dataclass(frozen=True)
class RunFinal:
    """One run's final numbers, as the comparison shows them (raw values, not formatted)."""

    name: str
    consensus: float | None
    mean_peer: float | None
    worst_peer: float | None
    distances: dict[str, float | None]
    bytes_sent_total: int | None
    samples_seen: int | None
    rounds: int | None
    runtime_s: float | None


def run_final(summary: Summary, rows: Sequence[Row]) -> RunFinal:
    """Each quantity from the last row that has it (the last rounds may skip evaluation)."""
    rows = rows_or_final(summary, rows)
    metric = metric_name(summary)
    consensus_row = last_with(rows, "consensus_test")
    peer_row = last_with(rows, "peer_test")
    dist_row = last_with(rows, "consensus_distance")
    last = rows[-1] if rows else {}
    peers = [v for v in peer_metrics(peer_row, metric) if v is not None] if peer_row else []
    runtime = summary.get("runtime_s")
    return RunFinal(
        name=str(summary.get("name", "run")),
        consensus=consensus_metric(consensus_row, metric) if consensus_row else None,
        mean_peer=mean_of(peers),
        worst_peer=worst(peers, is_higher_better(summary)),
        distances={key: distance(dist_row, key) if dist_row else None for key, _ in DISTANCES},
        bytes_sent_total=last.get("bytes_sent_total"),
        samples_seen=last.get("samples_seen"),
        rounds=last.get("round"),
        runtime_s=None if runtime is None else float(runtime),
    )


def _best_indices(values: Sequence[float | None], higher_is_better: bool) -> set[int]:
    """Indices of the best value (all of them on a tie); none when no value is known."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return set()
    best = max(known) if higher_is_better else min(known)
    return {i for i, v in enumerate(values) if v == best}


def _compare_headers(summary: Summary) -> list[str]:
    label = metric_label(summary)
    return [
        "run", f"consensus {label}", f"mean peer {label}", "worst peer",
        "distance B·A", "distance W'", "MB sent", "runtime (s)",
    ]


def _compare_cells(summary: Summary, final: RunFinal) -> list[str]:
    return [
        final.name,
        fmt_metric(summary, final.consensus),
        fmt_metric(summary, final.mean_peer),
        fmt_metric(summary, final.worst_peer),
        fmt_sci(final.distances["product"]),
        fmt_sci(final.distances["merged"]),
        fmt_mb(final.bytes_sent_total),
        fmt_float(final.runtime_s, 1),
    ]


def check_runs(runs: Sequence[Run]) -> Summary:
    """The first run's summary, after checking that the runs can be compared at all."""
    if not runs:
        raise ValueError("no runs to compare")
    metrics = {metric_name(s) for s, _ in runs}
    if len(metrics) > 1:
        raise ValueError(f"runs use different metrics ({', '.join(sorted(metrics))}): not comparable")
    return runs[0][0]


def compare_records(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], set[int]]:
    """Headers, formatted rows and the indices of the runs with the best consensus metric."""
    first = check_runs(runs)
    finals = [run_final(s, r) for s, r in runs]
    best = _best_indices([f.consensus for f in finals], is_higher_better(first))
    return _compare_headers(first), [_compare_cells(first, f) for f in finals], best


def _rich_table(title: str, headers: Sequence[str], records: Sequence[Sequence[str | Text]]) -> Table:
    table = Table(title=title, header_style="bold")
    for i, header in enumerate(headers):
        # The first column names the row; the rest are numbers, right-aligned to line up digits.
        table.add_column(header, justify="left" if i == 0 else "right")
    for record in records:
        table.add_row(*record)
    return table


def results_table(summary: Summary, rows: Sequence[Row]) -> Table:
    """One row per evaluated round: samples, train loss, consensus and peer metric, distances, MB."""
    title = f"{summary.get('name', 'run')}: {metric_name(summary)} per round"
    return _rich_table(title, results_headers(summary), results_records(summary, rows))


def compare_table(runs: Sequence[Run]) -> Table:
    """One row per run with its final numbers; the best consensus metric is bold."""
    headers, records, best = compare_records(runs)
    styled: list[list[str | Text]] = []
    for i, record in enumerate(records):
        cells: list[str | Text] = list(record)
        # Text, not "[bold]" markup: a run name with brackets must not be parsed as markup.
        cells[0] = Text(record[0])
        cells[1] = Text(record[1], style="bold" if i in best else "")
        styled.append(cells)
    return _rich_table("comparison of runs (final round)", headers, styled)
