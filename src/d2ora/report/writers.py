"""Writing a report folder: plots first, then the CSVs, the Markdown last, every file atomically.

Plots first, so a report never links to a plot that is half written; each file goes to a
temporary file beside the target and is renamed over it, so a failed rewrite leaves the previous
report whole. The modules that build a report's content (markdown, csv_files, tables, and plots up
to the saved PNG) take typed summaries and return text or figures; files are written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from d2ora import atomic
from d2ora.report.csv_files import compare_csv, compare_seeds_csv
from d2ora.report.groups import MethodRuns, as_groups
from d2ora.report.layout import (
    COMPARE_CSV_NAME,
    COMPARE_NAME,
    COMPARE_PLOTS,
    COMPARE_SEEDS_CSV_NAME,
    PLOTS_DIR,
    REPORT_NAME,
    RUN_PLOTS,
)
from d2ora.report.markdown import compare_markdown, run_markdown
from d2ora.report.model import RunSummary, SummaryInput
from d2ora.report.plots import (
    plot_compare_consensus,
    plot_compare_metric,
    plot_compare_metric_bytes,
    plot_consensus,
    plot_metric,
    plot_train_loss,
)
from d2ora.report.rows import Row, RunInput, rows_or_final
from d2ora.report.tables import check_runs


def write_run_report(out_dir: Path, summary: SummaryInput, rows: Sequence[Row]) -> Path:
    """Write ``out_dir/report.md`` and its plots under ``out_dir/plots/``; return the report's path.
    ``summary`` is a RunSummary, or a plain dict as loaded from summary.json."""
    summary = RunSummary.coerce(summary)
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    rows = rows_or_final(summary, rows)
    plot_metric(summary, rows, plots / RUN_PLOTS[0])
    plot_consensus(summary, rows, plots / RUN_PLOTS[1])
    plot_train_loss(summary, rows, plots / RUN_PLOTS[2])
    return atomic.write_text(out_dir / REPORT_NAME, run_markdown(out_dir, summary, rows))


def write_compare_report(out_dir: Path, runs: Sequence[RunInput | MethodRuns]) -> Path:
    """Write ``compare.md``, ``compare.csv``, ``compare_seeds.csv`` and the comparison plots; return the
    Markdown's path. ``runs`` are single runs, or one :class:`~d2ora.report.groups.MethodRuns` per method
    (its runs over seeds)."""
    groups = as_groups(runs)  # every summary typed once, here
    check_runs(groups)
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    plot_compare_metric(groups, plots / COMPARE_PLOTS[0])
    plot_compare_consensus(groups, plots / COMPARE_PLOTS[1])
    plot_compare_metric_bytes(groups, plots / COMPARE_PLOTS[2])
    atomic.write_text(out_dir / COMPARE_CSV_NAME, compare_csv(groups))
    atomic.write_text(out_dir / COMPARE_SEEDS_CSV_NAME, compare_seeds_csv(groups))
    return atomic.write_text(out_dir / COMPARE_NAME, compare_markdown(out_dir, groups))
