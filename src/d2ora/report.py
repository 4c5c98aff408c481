"""Reports of decentralized runs: Markdown, CSV, PNG plots and rich tables from per-round metrics.

Inputs are plain dicts as loaded from JSON: ``rows`` are the lines of ``metrics.jsonl`` (round 0 is
before any training) and ``summary`` is the run's summary dict. Optional per-round fields (peer and
consensus evaluations, validation, consensus distances) may be ``null`` in rows that were not
evaluated; tables list only evaluated rounds and each plot uses only the rows that have its field.

Every file is written atomically (temporary file beside the target, then ``os.replace``), plots
first and the Markdown last, so a report never links to a plot that is half written and a failed
rewrite leaves the previous report whole.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from d2ora import atomic

Row = Mapping[str, Any]
Summary = Mapping[str, Any]
Run = tuple[Summary, Sequence[Row]]

REPORT_NAME = "report.md"
COMPARE_NAME = "compare.md"
COMPARE_CSV_NAME = "compare.csv"
PLOTS_DIR = "plots"
RUN_PLOTS = ("metric.png", "consensus.png", "train_loss.png")
COMPARE_PLOTS = ("compare_metric.png", "compare_consensus.png")

# Above this many peers (or runs) a legend entry per line is noise: one entry stands for all.
LEGEND_MAX = 8
MB = 1e6  # decimal megabytes, as network traffic is usually counted

# The consensus distance on each DoRA factor: key in ``consensus_distance`` -> label.
DISTANCES = (("magnitude", "m"), ("product", "B·A"), ("merged", "W'"))
# Setup keys shown as lines in the compare report when every run shares them.
SETUP_KEYS = (
    "model", "task", "method", "r", "mixer", "peers", "topology", "partition",
    "rounds", "local_steps", "batch_size", "metric",
)
DASH = "-"
DISTANCE_LABEL = "consensus distance (log scale)"


# ---------------------------------------------------------------------------------------------
# Numbers: extraction and formatting
# ---------------------------------------------------------------------------------------------


def _metric(summary: Summary) -> str:
    return str(summary.get("metric") or "accuracy")


def _higher_is_better(summary: Summary) -> bool:
    value = summary.get("higher_is_better")
    return _metric(summary) == "accuracy" if value is None else bool(value)


def _is_percent(summary: Summary) -> bool:
    return _metric(summary) == "accuracy"


def _metric_label(summary: Summary) -> str:
    """The metric with its unit, for headers and axis labels."""
    return f"{_metric(summary)} (%)" if _is_percent(summary) else _metric(summary)


def _metric_scale(summary: Summary) -> float:
    """Accuracy is stored as a fraction but read as a percent."""
    return 100.0 if _is_percent(summary) else 1.0


def fmt_metric(summary: Summary, value: float | None) -> str:
    """Accuracy as a percent with 1 decimal (0.875 -> ``87.5``); other metrics with 2 decimals."""
    if value is None:
        return DASH
    return f"{value * 100:.1f}" if _is_percent(summary) else f"{value:.2f}"


def _fmt_sci(value: float | None) -> str:
    """Three significant digits in scientific notation: ``1.23e-04``."""
    return DASH if value is None else f"{value:.2e}"


def _fmt_float(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _fmt_mb(n_bytes: float | None) -> str:
    return DASH if n_bytes is None else f"{n_bytes / MB:.2f}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _entry_metric(entry: Any, metric: str) -> float | None:
    """One evaluation dict's metric, or None where the entry (or the value) is missing."""
    if not isinstance(entry, Mapping):
        return None
    value = entry.get(metric)
    return None if value is None else float(value)


def _peer_metrics(row: Row, metric: str) -> list[float | None]:
    """Each peer's test metric in ``row`` (empty when the peers were not evaluated)."""
    return [_entry_metric(e, metric) for e in row.get("peer_test") or []]


def _peer_stats(row: Row, metric: str) -> tuple[float, float, float] | None:
    """Mean, min and max of the peers' test metric, or None when no peer was evaluated."""
    values = [v for v in _peer_metrics(row, metric) if v is not None]
    if not values:
        return None
    return sum(values) / len(values), min(values), max(values)


def _worst(values: Sequence[float], higher_is_better: bool) -> float | None:
    if not values:
        return None
    return min(values) if higher_is_better else max(values)


def _consensus_metric(row: Row, metric: str) -> float | None:
    return _entry_metric(row.get("consensus_test"), metric)


def _distance(row: Row, key: str) -> float | None:
    dist = row.get("consensus_distance")
    if not isinstance(dist, Mapping) or dist.get(key) is None:
        return None
    return float(dist[key])


def _mean_train_loss(row: Row) -> float | None:
    return _mean(float(v) for v in row.get("train_loss") or [] if v is not None)


def _is_evaluated(row: Row) -> bool:
    return row.get("consensus_test") is not None or row.get("peer_test") is not None


def _last_with(rows: Sequence[Row], key: str) -> Row | None:
    """The last row whose ``key`` is set: evaluation may skip the final rounds' fields."""
    return next((r for r in reversed(rows) if r.get(key) is not None), None)


def _rows_or_final(summary: Summary, rows: Sequence[Row]) -> Sequence[Row]:
    """The rows, or the summary's final row when no per-round rows were given."""
    if rows:
        return rows
    final = summary.get("final")
    return [final] if isinstance(final, Mapping) else []


def _n_peers(summary: Summary, rows: Sequence[Row]) -> int:
    lengths = [len(r.get(k) or []) for r in rows for k in ("peer_test", "train_loss", "bytes_sent")]
    return max([int(summary.get("peers") or 0), *lengths])


# ---------------------------------------------------------------------------------------------
# Table contents, shared by the rich and the Markdown renderings
# ---------------------------------------------------------------------------------------------


def _results_headers(summary: Summary) -> list[str]:
    label = _metric_label(summary)
    return [
        "round", "samples seen", "train loss (mean)", f"consensus {label}",
        f"mean peer {label}", "peer min", "peer max",
        *(f"distance {name}" for _, name in DISTANCES), "MB sent (cumulative)",
    ]


def _results_cells(summary: Summary, row: Row) -> list[str]:
    stats = _peer_stats(row, _metric(summary))
    mean, lo, hi = stats if stats else (None, None, None)
    total = row.get("bytes_sent_total")
    return [
        str(row.get("round", DASH)),
        f"{int(row.get('samples_seen') or 0):,}",
        _fmt_float(_mean_train_loss(row), 4),
        fmt_metric(summary, _consensus_metric(row, _metric(summary))),
        fmt_metric(summary, mean), fmt_metric(summary, lo), fmt_metric(summary, hi),
        *(_fmt_sci(_distance(row, key)) for key, _ in DISTANCES),
        _fmt_mb(None if total is None else float(total)),
    ]


def _results_records(summary: Summary, rows: Sequence[Row]) -> list[list[str]]:
    return [_results_cells(summary, r) for r in rows if _is_evaluated(r)]


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
    rows = _rows_or_final(summary, rows)
    metric = _metric(summary)
    consensus_row = _last_with(rows, "consensus_test")
    peer_row = _last_with(rows, "peer_test")
    dist_row = _last_with(rows, "consensus_distance")
    last = rows[-1] if rows else {}
    peers = [v for v in _peer_metrics(peer_row, metric) if v is not None] if peer_row else []
    runtime = summary.get("runtime_s")
    return RunFinal(
        name=str(summary.get("name", "run")),
        consensus=_consensus_metric(consensus_row, metric) if consensus_row else None,
        mean_peer=_mean(peers),
        worst_peer=_worst(peers, _higher_is_better(summary)),
        distances={key: _distance(dist_row, key) if dist_row else None for key, _ in DISTANCES},
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
    label = _metric_label(summary)
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
        _fmt_sci(final.distances["product"]),
        _fmt_sci(final.distances["merged"]),
        _fmt_mb(final.bytes_sent_total),
        _fmt_float(final.runtime_s, 1),
    ]


def _check_runs(runs: Sequence[Run]) -> Summary:
    """The first run's summary, after checking that the runs can be compared at all."""
    if not runs:
        raise ValueError("no runs to compare")
    metrics = {_metric(s) for s, _ in runs}
    if len(metrics) > 1:
        raise ValueError(f"runs use different metrics ({', '.join(sorted(metrics))}): not comparable")
    return runs[0][0]


def _compare_records(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], set[int]]:
    """Headers, formatted rows and the indices of the runs with the best consensus metric."""
    first = _check_runs(runs)
    finals = [run_final(s, r) for s, r in runs]
    best = _best_indices([f.consensus for f in finals], _higher_is_better(first))
    return _compare_headers(first), [_compare_cells(first, f) for f in finals], best


# ---------------------------------------------------------------------------------------------
# rich tables
# ---------------------------------------------------------------------------------------------


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
    title = f"{summary.get('name', 'run')}: {_metric(summary)} per round"
    return _rich_table(title, _results_headers(summary), _results_records(summary, rows))


def compare_table(runs: Sequence[Run]) -> Table:
    """One row per run with its final numbers; the best consensus metric is bold."""
    headers, records, best = _compare_records(runs)
    styled: list[list[str | Text]] = []
    for i, record in enumerate(records):
        cells: list[str | Text] = list(record)
        # Text, not "[bold]" markup: a run name with brackets must not be parsed as markup.
        cells[0] = Text(record[0])
        cells[1] = Text(record[1], style="bold" if i in best else "")
        styled.append(cells)
    return _rich_table("comparison of runs (final round)", headers, styled)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    # A "|" would end the cell and a newline the row: escape the one, flatten the other.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A GitHub-flavoured Markdown table; columns from ``numeric_from`` on are right-aligned.

    Hand-written on purpose: the standard library has no Markdown table writer, and pulling in
    pandas + tabulate (``DataFrame.to_markdown``) for a few pipes and dashes is overkill.
    """
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines) + "\n"


def _setup_lines(summary: Summary) -> list[str]:
    order = "higher" if _higher_is_better(summary) else "lower"
    lines = [
        f"- model: {summary.get('model', DASH)}",
        f"- task: {summary.get('task', DASH)}",
        f"- method: {summary.get('method', DASH)}, r = {summary.get('r', DASH)}",
        f"- mixer: {summary.get('mixer', DASH)}",
        f"- peers: {summary.get('peers', DASH)}",
        f"- topology: {summary.get('topology', DASH)}",
        f"- partition: {summary.get('partition', DASH)}",
        f"- rounds: {summary.get('rounds', DASH)} x {summary.get('local_steps', DASH)} local steps",
        f"- batch size: {summary.get('batch_size', DASH)}",
        f"- metric: {_metric(summary)} ({order} is better)",
    ]
    if summary.get("runtime_s") is not None:
        lines.append(f"- runtime: {float(summary['runtime_s']):.1f} s")
    return lines


def _label_count_section(summary: Summary) -> list[str]:
    counts = summary.get("label_counts")
    if not counts:
        return []
    names = summary.get("label_names") or [f"label {c}" for c in range(len(counts[0]))]
    headers = ["peer", *map(str, names), "total"]
    body = [[f"peer {p}", *map(str, row), str(sum(row))] for p, row in enumerate(counts)]
    return ["## Label counts per peer", "", _md_table(headers, body)]


def _peer_bytes_totals(rows: Sequence[Row], n_peers: int) -> list[int]:
    """Bytes each peer sent over the whole run (``bytes_sent`` is per round)."""
    totals = [0] * n_peers
    for row in rows:
        for p, n in enumerate(row.get("bytes_sent") or []):
            totals[p] += int(n or 0)
    return totals


def _at(values: Sequence[Any] | None, i: int) -> Any:
    return values[i] if values is not None and i < len(values) else None


def _final_peer_section(summary: Summary, rows: Sequence[Row]) -> list[str]:
    if not rows:
        return []
    metric, label = _metric(summary), _metric_label(summary)
    last, test_row, val_row = rows[-1], _last_with(rows, "peer_test"), _last_with(rows, "peer_val")
    n_peers = _n_peers(summary, rows)
    totals = _peer_bytes_totals(rows, n_peers)
    body = []
    for p in range(n_peers):
        loss = _at(last.get("train_loss"), p)
        test = _entry_metric(_at(test_row.get("peer_test"), p), metric) if test_row else None
        val = _entry_metric(_at(val_row.get("peer_val"), p), metric) if val_row else None
        body.append([
            f"peer {p}", _fmt_float(None if loss is None else float(loss), 4),
            fmt_metric(summary, test), fmt_metric(summary, val), _fmt_mb(totals[p]),
        ])
    headers = ["peer", "train loss", f"test {label}", f"val {label}", "MB sent (total)"]
    return [f"## Final per-peer results ({_rounds_note(last, test_row, val_row)})", "", _md_table(headers, body)]


def _rounds_note(last: Row, test_row: Row | None, val_row: Row | None) -> str:
    """Which round each column comes from: evaluation may have skipped the last rounds."""
    sources = [(w, r.get("round")) for w, r in (("train loss", last), ("test", test_row), ("val", val_row)) if r]
    if len({rnd for _, rnd in sources}) == 1:
        return f"round {sources[0][1]}"
    return ", ".join(f"{what} from round {rnd}" for what, rnd in sources)


def _link_list(paths: Sequence[str], what: str) -> list[str]:
    if not paths:
        return []
    if len(paths) <= LEGEND_MAX:
        return [f"- {what}: " + ", ".join(f"[{p}]({p})" for p in paths)]
    # Sixty-four adapter links would bury the rest of the list: show the ends and the count.
    return [f"- {what} ({len(paths)}): [{paths[0]}]({paths[0]}) ... [{paths[-1]}]({paths[-1]})"]


def _files_section(out_dir: Path, summary: Summary) -> list[str]:
    lines = [f"- {name}: [{name}]({name})" for name in ("summary.json", "metrics.jsonl")
             if (out_dir / name).exists()]
    lines += _link_list([str(p) for p in summary.get("adapters") or []], "peer adapters")
    for key, what in (("consensus_adapter", "consensus adapter"), ("merged_model", "merged model")):
        if summary.get(key):
            lines.append(f"- {what}: [{summary[key]}]({summary[key]})")
    return ["## Files", "", *lines, ""] if lines else []


def _plots_section(names: Sequence[str], titles: Sequence[str]) -> list[str]:
    # A blank line between images: adjacent ones would share a paragraph and sit side by side.
    lines = [line for n, t in zip(names, titles) for line in (f"![{t}]({PLOTS_DIR}/{n})", "")]
    return ["## Plots", "", *lines]


def _run_markdown(out_dir: Path, summary: Summary, rows: Sequence[Row]) -> str:
    name = summary.get("name", "run")
    records = _results_records(summary, rows)
    results = _md_table(_results_headers(summary), records) if records else "No evaluated rounds.\n"
    parts = [
        f"# Run report: {name}", "", *_setup_lines(summary), "",
        *_label_count_section(summary),
        "## Results per evaluated round", "",
        "Distances are consensus distances (scientific notation); MB are 10^6 bytes.", "",
        results,
        *_final_peer_section(summary, rows),
        *_plots_section(RUN_PLOTS, ("metric vs samples seen", "consensus distance", "train loss")),
        *_files_section(out_dir, summary),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"


def _compare_setup(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """Setup lines every run shares, and the keys whose values differ between runs."""
    common, differing = [], []
    for key in SETUP_KEYS:
        values = {str(s.get(key, DASH)) for s, _ in runs}
        (common if len(values) == 1 else differing).append(key)
    lines = [f"- {key}: {runs[0][0].get(key, DASH)}" for key in common]
    return lines, differing


def _compare_markdown(out_dir: Path, runs: Sequence[Run]) -> str:
    headers, records, best = _compare_records(runs)
    for i in best:
        records[i][1] = f"**{records[i][1]}**"
    common, differing = _compare_setup(runs)
    parts = ["# Comparison of runs", "", "Common setup:", "", *common, ""]
    if differing:
        body = [[s.get("name", DASH), *(s.get(k, DASH) for k in differing)] for s, _ in runs]
        parts += ["Differences:", "", _md_table(["run", *differing], body, numeric_from=len(differing) + 1)]
    order = "higher" if _higher_is_better(runs[0][0]) else "lower"
    parts += [
        "## Final results", "",
        f"Best consensus {_metric(runs[0][0])} in bold ({order} is better).", "",
        _md_table(headers, records),
        *_plots_section(COMPARE_PLOTS, ("consensus metric vs samples seen", "B·A consensus distance")),
        "## Files", "", f"- all numbers, full precision: [{COMPARE_CSV_NAME}]({COMPARE_CSV_NAME})",
        *_run_report_links(out_dir, runs),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"


def _run_report_links(out_dir: Path, runs: Sequence[Run]) -> list[str]:
    """Links to each run's own report where it lies in ``out_dir/<name>/`` (as ``d2ora compare`` puts it)."""
    names = [str(s.get("name", "")) for s, _ in runs]
    return [f"- {n}: [{n}/{REPORT_NAME}]({n}/{REPORT_NAME})" for n in names
            if n and (out_dir / n / REPORT_NAME).is_file()]


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "name", "mixer", "method", "r", "model", "task", "peers", "topology", "partition", "rounds",
    "local_steps", "batch_size", "metric", "higher_is_better", "consensus_metric", "mean_peer_metric",
    "worst_peer_metric", "distance_magnitude", "distance_product", "distance_merged",
    "bytes_sent_total", "samples_seen", "runtime_s",
)


def _csv_value(value: Any) -> str:
    # repr keeps a float's full precision; an empty cell, not "None", marks a missing value.
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _compare_csv(runs: Sequence[Run]) -> str:
    _check_runs(runs)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for summary, rows in runs:
        final = run_final(summary, rows)
        record = {key: summary.get(key) for key in CSV_COLUMNS}
        record.update(
            higher_is_better=_higher_is_better(summary), consensus_metric=final.consensus,
            mean_peer_metric=final.mean_peer, worst_peer_metric=final.worst_peer,
            **{f"distance_{k}": v for k, v in final.distances.items()},
            bytes_sent_total=final.bytes_sent_total, samples_seen=final.samples_seen,
            runtime_s=final.runtime_s,
        )
        writer.writerow({k: _csv_value(v) for k, v in record.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A figure on the Agg canvas, built without pyplot.

    pyplot keeps every figure in a global registry until ``plt.close``; a bare ``Figure`` is
    never registered, so it is freed like any object and long runs cannot leak figures. It also
    leaves the process's pyplot backend alone (a notebook calling this keeps its own).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xlabel == "round":  # rounds are whole numbers: no 2.25 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _legend(ax: Any) -> None:
    """Outside the axes on the right, so lines are never hidden; nothing when nothing is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _save(fig: Any, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # format given: the temp name ends in .tmp
    fig.clear()  # drop the artists now rather than at the next garbage collection
    return path


def _positive(xs: Sequence[Any], ys: Sequence[float | None]) -> tuple[list[Any], list[float]]:
    """The points a log axis can show: zero (P = 1), negative, NaN and missing values are dropped, and
    so are values below 1e-16 of the series' largest (float64 rounding of a true zero, e.g. the merged
    weights of identical peers, would otherwise stretch the axis over 25 decades)."""
    finite = [y for y in ys if y is not None and math.isfinite(y) and y > 0]
    floor = 1e-16 * max(finite, default=0.0)
    kept = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and y > floor]
    return [x for x, _ in kept], [y for _, y in kept]


def _peer_style(p: int, n_peers: int) -> dict[str, Any]:
    """Thin per-peer lines; with many peers one grey family and a single legend entry."""
    if n_peers <= LEGEND_MAX:
        return {"color": f"C{p % 10}", "lw": 0.9, "alpha": 0.7, "label": f"peer {p}"}
    return {"color": "0.55", "lw": 0.6, "alpha": 0.5, "label": f"peers ({n_peers})" if p == 0 else None}


def _series(rows: Sequence[Row], x_key: str, value: Callable[[Row], float | None]) -> tuple[list, list]:
    """(x, y) over the rows where ``value`` is known."""
    pts = [(r.get(x_key), v) for r in rows if (v := value(r)) is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def _plot_metric(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    metric, scale = _metric(summary), _metric_scale(summary)
    fig, ax = _new_axes(f"{summary.get('name', 'run')}: test {metric}",
                        "samples seen (training examples, all peers)", _metric_label(summary))
    n_peers = _n_peers(summary, rows)
    for p in range(n_peers):
        xs, ys = _series(rows, "samples_seen", lambda r, p=p: _at(_peer_metrics(r, metric), p))
        ax.plot(xs, [y * scale for y in ys], marker="." if len(xs) == 1 else None, **_peer_style(p, n_peers))
    xs, ys = _series(rows, "samples_seen", lambda r: (_peer_stats(r, metric) or (None,))[0])
    ax.plot(xs, [y * scale for y in ys], "--", color="tab:red", lw=1.6, marker="o", ms=3, label="mean of peers")
    xs, ys = _series(rows, "samples_seen", lambda r: _consensus_metric(r, metric))
    ax.plot(xs, [y * scale for y in ys], color="black", lw=2.6, marker="o", ms=4, label="consensus model")
    if not any(line.get_xdata().size for line in ax.get_lines()):
        _no_data(ax, "no evaluated rounds")
    _legend(ax)
    return _save(fig, path)


def _plot_consensus(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    fig, ax = _new_axes(f"{summary.get('name', 'run')}: consensus distance of the peers' adapters", "round",
                        DISTANCE_LABEL)
    plotted = False
    for (key, name), style in zip(DISTANCES, ("-o", "-s", "-^")):
        xs, ys = _positive(*_series(rows, "round", lambda r, key=key: _distance(r, key)))
        if xs:
            ax.plot(xs, ys, style, ms=3, lw=1.4, label=f"on {name}")
            plotted = True
    if plotted:
        ax.set_yscale("log")
    else:  # a log axis over no data would only warn; say why the plot is empty instead
        _no_data(ax, "no positive distances (a single peer is its own consensus)")
    _legend(ax)
    return _save(fig, path)


def _plot_train_loss(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    fig, ax = _new_axes(f"{summary.get('name', 'run')}: training loss",
                        "round", "mean training loss over the round's local steps")
    n_peers = _n_peers(summary, rows)
    for p in range(n_peers):
        xs, ys = _series(rows, "round", lambda r, p=p: _at(r.get("train_loss"), p))
        ax.plot(xs, ys, marker="." if len(xs) == 1 else None, **_peer_style(p, n_peers))
    if n_peers > 1:
        xs, ys = _series(rows, "round", _mean_train_loss)
        ax.plot(xs, ys, "--", color="black", lw=1.8, label="mean of peers")
    if not any(line.get_xdata().size for line in ax.get_lines()):
        _no_data(ax, "no training rounds yet")
    _legend(ax)
    return _save(fig, path)


def _plot_compare_metric(runs: Sequence[Run], path: Path) -> Path:
    first = runs[0][0]
    fig, ax = _new_axes(f"consensus model: test {_metric(first)}",
                        "samples seen (training examples, all peers)", _metric_label(first))
    scale = _metric_scale(first)
    for summary, rows in runs:
        xs, ys = _series(rows, "samples_seen", lambda r: _consensus_metric(r, _metric(first)))
        ax.plot(xs, [y * scale for y in ys], marker="o", ms=3, lw=1.6, label=str(summary.get("name")))
    _legend(ax)
    return _save(fig, path)


def _plot_compare_consensus(runs: Sequence[Run], path: Path) -> Path:
    fig, ax = _new_axes("consensus distance on B·A", "round", DISTANCE_LABEL)
    plotted = False
    for summary, rows in runs:
        xs, ys = _positive(*_series(rows, "round", lambda r: _distance(r, "product")))
        label = str(summary.get("name"))
        # An all-zero run (P = 1) still gets a legend entry, so its absence reads as intended.
        ax.plot(xs, ys, marker="o", ms=3, lw=1.6, label=label if xs else f"{label} (no positive values)")
        plotted = plotted or bool(xs)
    if plotted:
        ax.set_yscale("log")
    else:
        _no_data(ax, "no positive distances")
    _legend(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Public writers
# ---------------------------------------------------------------------------------------------


def write_run_report(out_dir: Path, summary: Summary, rows: Sequence[Row]) -> Path:
    """Write ``out_dir/report.md`` and its plots under ``out_dir/plots/``; return the report's path."""
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    rows = _rows_or_final(summary, rows)
    _plot_metric(summary, rows, plots / RUN_PLOTS[0])
    _plot_consensus(summary, rows, plots / RUN_PLOTS[1])
    _plot_train_loss(summary, rows, plots / RUN_PLOTS[2])
    return atomic.write_text(out_dir / REPORT_NAME, _run_markdown(out_dir, summary, rows))


def write_compare_report(out_dir: Path, runs: Sequence[Run]) -> Path:
    """Write ``compare.md``, ``compare.csv`` and the two comparison plots; return the Markdown's path."""
    _check_runs(runs)
    runs = [(s, _rows_or_final(s, r)) for s, r in runs]
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    _plot_compare_metric(runs, plots / COMPARE_PLOTS[0])
    _plot_compare_consensus(runs, plots / COMPARE_PLOTS[1])
    atomic.write_text(out_dir / COMPARE_CSV_NAME, _compare_csv(runs))
    return atomic.write_text(out_dir / COMPARE_NAME, _compare_markdown(out_dir, runs))
