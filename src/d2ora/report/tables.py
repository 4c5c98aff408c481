"""What the results and comparison tables hold, and their rich renderings for the terminal.

The headers and formatted records built here are shared with the Markdown report, so the
terminal and the files always show the same numbers. Every function here only builds: text
cells, or rich tables that the caller prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from d2ora.report.finals import method_final
from d2ora.report.formatting import (
    DASH,
    PLUS_MINUS,
    fmt_float,
    fmt_mb,
    fmt_metric,
    fmt_percent,
    fmt_sci,
    fmt_spread,
)
from d2ora.report.groups import (
    MethodRuns,
    TargetResult,
    as_groups,
    centralized_group,
    check_groups,
    is_multi_seed,
    n_test,
    target_results,
)
from d2ora.report.model import MethodFinal, RunSummary, SummaryInput
from d2ora.report.rows import (
    DISTANCES,
    GENERATIVE_ACCURACY,
    Row,
    RunInput,
    Summary,
    consensus_metric,
    distance,
    is_evaluated,
    is_higher_better,
    is_percent,
    mean_train_loss,
    metric_label,
    metric_name,
    peer_stats,
)
from d2ora.report.stats import TARGET_GAP_POINTS, binomial_se, spread

NOT_REACHED = "not reached"


def _shows_generative(summary: Summary) -> bool:
    """sft runs show generative accuracy next to their headline metric. By task, not by row content:
    other tasks' tables keep exactly their columns."""
    return summary.task == "sft"


def results_headers(summary: Summary) -> list[str]:
    label = metric_label(summary)
    return [
        "round", "samples seen", "train loss (mean)", f"consensus {label}",
        *(["consensus generative accuracy"] if _shows_generative(summary) else []),
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
        *([fmt_float(consensus_metric(row, GENERATIVE_ACCURACY), 3)] if _shows_generative(summary) else []),
        fmt_metric(summary, mean), fmt_metric(summary, lo), fmt_metric(summary, hi),
        *(fmt_sci(distance(row, key)) for key, _ in DISTANCES),
        fmt_mb(None if total is None else float(total)),
    ]


def results_records(summary: Summary, rows: Sequence[Row]) -> list[list[str]]:
    return [_results_cells(summary, r) for r in rows if is_evaluated(r)]


def _best_indices(values: Sequence[float | None], higher_is_better: bool) -> set[int]:
    """Indices of the best value (all of them on a tie); none when no value is known."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return set()
    best = max(known) if higher_is_better else min(known)
    return {i for i, v in enumerate(values) if v == best}


def _compare_headers(summary: Summary, multi_seed: bool) -> list[str]:
    label = metric_label(summary)
    headers = [
        "run", f"consensus {label}",
        *(["consensus generative accuracy (%)", "mean peer generative accuracy (%)"] if _shows_generative(summary) else []),
        f"mean peer {label}", "worst peer", "mean peer, own split",
        "distance B·A", "distance W'", "MB sent", "runtime (s)",
    ]
    return [*headers, "seeds"] if multi_seed else headers  # last: a single-seed table keeps its columns


def _compare_cells(summary: Summary, final: MethodFinal, multi_seed: bool) -> list[str]:
    def metric(v: float | None) -> str:
        return fmt_metric(summary, v)

    cells = [
        final.name,
        fmt_spread(final.consensus, metric),
        *([fmt_spread(final.consensus_generative, fmt_percent), fmt_spread(final.mean_peer_generative, fmt_percent)]
          if _shows_generative(summary) else []),
        fmt_spread(final.mean_peer, metric),
        fmt_spread(final.worst_peer, metric),
        fmt_spread(final.own_split, metric),
        fmt_spread(final.distances["product"], fmt_sci),
        fmt_spread(final.distances["merged"], fmt_sci),
        fmt_spread(final.bytes_sent_total, fmt_mb),
        fmt_spread(final.runtime_s, lambda v: fmt_float(v, 1)),
    ]
    return [*cells, str(len(final.runs))] if multi_seed else cells


def check_runs(runs: Sequence[RunInput | MethodRuns]) -> Summary:
    """The first run's summary, after checking that the runs (or groups of runs) can be compared at all."""
    groups = as_groups(runs)
    check_groups(groups)
    return groups[0].runs[0][0]


def compare_records(runs: Sequence[RunInput | MethodRuns]) -> tuple[list[str], list[list[str]], set[int]]:
    """Headers, formatted rows (one per method, mean ± std over its seeds) and the indices of the
    methods with the best mean consensus metric."""
    groups = as_groups(runs)
    first = check_runs(groups)
    multi = is_multi_seed(groups)
    finals = [method_final(g) for g in groups]
    best = _best_indices([f.consensus.mean for f in finals], is_higher_better(first))
    return _compare_headers(first, multi), [_compare_cells(first, f, multi) for f in finals], best


def spread_note(runs: Sequence[RunInput | MethodRuns]) -> str | None:
    """What a ``±`` means, for tables of several seeds; None for a single seed (no ± is shown)."""
    groups = as_groups(runs)
    if not is_multi_seed(groups):
        return None
    counts = sorted({len(g.runs) for g in groups})
    seeds = " or ".join(map(str, counts))
    return (f"Mean {PLUS_MINUS} sample standard deviation (ddof = 1) over {seeds} seeds per method; the standard "
            f"error of such a mean is the standard deviation / √(number of seeds).")


def standard_error_note(runs: Sequence[RunInput | MethodRuns]) -> str | None:
    """The binomial standard error of one test accuracy on the test set used, so a reader can tell a
    real difference from test-set noise; None for other metrics or an unknown test-set size."""
    groups = as_groups(runs)
    first = check_runs(groups)
    sizes = {n_test(g) for g in groups}
    if not is_percent(first) or len(sizes) != 1 or None in sizes:
        return None
    size = int(sizes.pop())
    p = spread([method_final(g).consensus.mean for g in groups]).mean
    at_p = "" if p is None else f"{binomial_se(p, size) * 100:.1f} points at p = {p * 100:.1f}% (the mean consensus accuracy here), "
    return (f"Test set: {size:,} examples; one test accuracy p on it has binomial standard error √(p(1 − p) / n_test) = "
            f"{at_p}at most {binomial_se(0.5, size) * 100:.1f} points (p = 50%): differences within about two standard "
            "errors may be test-set noise.")


def _target_cells(summary: Summary, result: TargetResult, multi_seed: bool) -> list[str]:
    n, k = len(result.reached), result.n_reached
    cells = [
        result.name,
        fmt_spread(spread(result.targets), lambda v: fmt_metric(summary, v)),
        f"{k} of {n} seeds" if multi_seed else ("yes" if k else NOT_REACHED),
        fmt_spread(result.rounds(), _fmt_rounds) if k else NOT_REACHED,
        fmt_spread(result.bytes_sent(), fmt_mb) if k else NOT_REACHED,
    ]
    if multi_seed:
        cells.append(" / ".join(NOT_REACHED if r is None else str(r.round) for r in result.reached))
    return cells


def _fmt_rounds(value: float | None) -> str:
    # A whole number of rounds reads as one; a mean over seeds gets a decimal.
    return DASH if value is None else (str(int(value)) if float(value).is_integer() else f"{value:.1f}")


def target_records(runs: Sequence[RunInput | MethodRuns],
                   gap_points: float = TARGET_GAP_POINTS) -> tuple[list[str], list[list[str]]] | None:
    """Headers and rows of the rounds-to-target table; None when it cannot be computed
    (see :func:`~d2ora.report.groups.target_results`)."""
    groups = as_groups(runs)
    first = check_runs(groups)
    results = target_results(groups, gap_points)
    if results is None:
        return None
    multi = is_multi_seed(groups)
    headers = ["run", f"target {metric_label(first)}", "reached", "rounds", "MB sent"]
    if multi:
        headers.append("rounds per seed")
    return headers, [_target_cells(first, r, multi) for r in results]


def target_note(runs: Sequence[RunInput | MethodRuns], gap_points: float = TARGET_GAP_POINTS) -> str:
    """Why the rounds-to-target table is there (or is not)."""
    groups = as_groups(runs)
    first = check_runs(groups)
    if not is_percent(first):
        return f"Rounds to target: not computed; the metric is {metric_name(first)}, and percentage points apply to accuracy only."
    if centralized_group(groups) is None:
        return "Rounds to target: not computed; 'centralized' is not among the compared methods."
    return (f"Target: centralized's final consensus {metric_name(first)} at the same seed minus {gap_points:g} points. "
            "Rounds and MB sent until the first evaluated round (every eval_every rounds) whose consensus model reaches it; "
            "with several seeds, mean over the seeds that reached it.")


def _rich_table(title: str, headers: Sequence[str], records: Sequence[Sequence[str | Text]]) -> Table:
    table = Table(title=title, header_style="bold")
    for i, header in enumerate(headers):
        # The first column names the row; the rest are numbers, right-aligned to line up digits.
        table.add_column(header, justify="left" if i == 0 else "right")
    for record in records:
        table.add_row(*record)
    return table


def results_table(summary: SummaryInput, rows: Sequence[Row]) -> Table:
    """One row per evaluated round: samples, train loss, consensus and peer metric, distances, MB."""
    summary = RunSummary.coerce(summary)
    title = f"{summary.name}: {metric_name(summary)} per round"
    return _rich_table(title, results_headers(summary), results_records(summary, rows))


def compare_table(runs: Sequence[RunInput | MethodRuns]) -> Table:
    """One row per method with its final numbers (mean ± std over seeds); the best consensus metric is bold."""
    headers, records, best = compare_records(runs)
    styled: list[list[str | Text]] = []
    for i, record in enumerate(records):
        cells: list[str | Text] = list(record)
        # Text, not "[bold]" markup: a run name with brackets must not be parsed as markup.
        cells[0] = Text(record[0])
        cells[1] = Text(record[1], style="bold" if i in best else "")
        styled.append(cells)
    return _rich_table("comparison of runs (final round)", headers, styled)


def target_table(runs: Sequence[RunInput | MethodRuns], gap_points: float = TARGET_GAP_POINTS) -> Table | None:
    """Rounds and MB until each method is within ``gap_points`` of centralized; None when not computed."""
    table = target_records(runs, gap_points)
    if table is None:
        return None
    headers, records = table
    return _rich_table(f"rounds to within {gap_points:g} points of centralized", headers,
                       [[Text(r[0]), *r[1:]] for r in records])
