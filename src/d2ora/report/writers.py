"""Writing a report folder: plots first and the Markdown last, every file atomically.

Plots first, so a report never links to a plot that is half written; each file goes to a
temporary file beside the target and is renamed over it, so a failed rewrite leaves the previous
report whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from d2ora import atomic
from d2ora.report.layout import COMPARE_CSV_NAME, COMPARE_NAME, COMPARE_PLOTS, PLOTS_DIR, REPORT_NAME, RUN_PLOTS
from d2ora.report.markdown import compare_csv, compare_markdown, run_markdown
from d2ora.report.plots import (
    plot_compare_consensus,
    plot_compare_metric,
    plot_consensus,
    plot_metric,
    plot_train_loss,
)
from d2ora.report.rows import Row, Run, Summary, rows_or_final
from d2ora.report.tables import check_runs


def write_run_report(out_dir: Path, summary: Summary, rows: Sequence[Row]) -> Path:
    """Write ``out_dir/report.md`` and its plots under ``out_dir/plots/``; return the report's path."""
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    rows = rows_or_final(summary, rows)
    plot_metric(summary, rows, plots / RUN_PLOTS[0])
    plot_consensus(summary, rows, plots / RUN_PLOTS[1])
    plot_train_loss(summary, rows, plots / RUN_PLOTS[2])
    return atomic.write_text(out_dir / REPORT_NAME, run_markdown(out_dir, summary, rows))


def write_compare_report(out_dir: Path, runs: Sequence[Run]) -> Path:
    """Write ``compare.md``, ``compare.csv`` and the two comparison plots; return the Markdown's path."""
    check_runs(runs)
    runs = [(s, rows_or_final(s, r)) for s, r in runs]
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    plot_compare_metric(runs, plots / COMPARE_PLOTS[0])
    plot_compare_consensus(runs, plots / COMPARE_PLOTS[1])
    atomic.write_text(out_dir / COMPARE_CSV_NAME, compare_csv(runs))
    return atomic.write_text(out_dir / COMPARE_NAME, compare_markdown(out_dir, runs))
