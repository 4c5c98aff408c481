"""The text files of a report: ``report.md`` for one run, ``compare.md`` and ``compare.csv`` for several.

These functions build the text only; :mod:`d2ora.report.writers` writes it (atomically, after the
plots it links to).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ora.report.formatting import DASH, fmt_float, fmt_mb, fmt_metric
from d2ora.report.layout import COMPARE_CSV_NAME, COMPARE_PLOTS, LEGEND_MAX, PLOTS_DIR, REPORT_NAME, RUN_PLOTS
from d2ora.report.rows import (
    Row,
    Run,
    Summary,
    entry_metric,
    is_higher_better,
    item_at,
    last_with,
    metric_label,
    metric_name,
    peer_count,
)
from d2ora.report.tables import check_runs, compare_records, results_headers, results_records, run_final

# Setup keys shown as lines in the compare report when every run shares them.
SETUP_KEYS = (
    "model", "task", "method", "r", "mixer", "peers", "topology", "partition",
    "rounds", "local_steps", "batch_size", "metric",
)


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
    order = "higher" if is_higher_better(summary) else "lower"
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
        f"- metric: {metric_name(summary)} ({order} is better)",
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


def _final_peer_section(summary: Summary, rows: Sequence[Row]) -> list[str]:
    if not rows:
        return []
    metric, label = metric_name(summary), metric_label(summary)
    last, test_row, val_row = rows[-1], last_with(rows, "peer_test"), last_with(rows, "peer_val")
    n_peers = peer_count(summary, rows)
    totals = _peer_bytes_totals(rows, n_peers)
    body = []
    for p in range(n_peers):
        loss = item_at(last.get("train_loss"), p)
        test = entry_metric(item_at(test_row.get("peer_test"), p), metric) if test_row else None
        val = entry_metric(item_at(val_row.get("peer_val"), p), metric) if val_row else None
        body.append([
            f"peer {p}", fmt_float(None if loss is None else float(loss), 4),
            fmt_metric(summary, test), fmt_metric(summary, val), fmt_mb(totals[p]),
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


def run_markdown(out_dir: Path, summary: Summary, rows: Sequence[Row]) -> str:
    name = summary.get("name", "run")
    records = results_records(summary, rows)
    results = _md_table(results_headers(summary), records) if records else "No evaluated rounds.\n"
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


def compare_markdown(out_dir: Path, runs: Sequence[Run]) -> str:
    headers, records, best = compare_records(runs)
    for i in best:
        records[i][1] = f"**{records[i][1]}**"
    common, differing = _compare_setup(runs)
    parts = ["# Comparison of runs", "", "Common setup:", "", *common, ""]
    if differing:
        body = [[s.get("name", DASH), *(s.get(k, DASH) for k in differing)] for s, _ in runs]
        parts += ["Differences:", "", _md_table(["run", *differing], body, numeric_from=len(differing) + 1)]
    order = "higher" if is_higher_better(runs[0][0]) else "lower"
    parts += [
        "## Final results", "",
        f"Best consensus {metric_name(runs[0][0])} in bold ({order} is better).", "",
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


def compare_csv(runs: Sequence[Run]) -> str:
    check_runs(runs)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for summary, rows in runs:
        final = run_final(summary, rows)
        record = {key: summary.get(key) for key in CSV_COLUMNS}
        record.update(
            higher_is_better=is_higher_better(summary), consensus_metric=final.consensus,
            mean_peer_metric=final.mean_peer, worst_peer_metric=final.worst_peer,
            **{f"distance_{k}": v for k, v in final.distances.items()},
            bytes_sent_total=final.bytes_sent_total, samples_seen=final.samples_seen,
            runtime_s=final.runtime_s,
        )
        writer.writerow({k: _csv_value(v) for k, v in record.items()})
    return buf.getvalue()
