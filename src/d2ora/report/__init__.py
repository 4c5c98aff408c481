"""Reports of decentralized runs: Markdown, CSV, PNG plots and rich tables from per-round metrics.

Inputs: ``rows`` are the lines of ``metrics.jsonl`` as loaded from JSON (round 0 is before any
training) and ``summary`` is the run's summary.json as a :class:`~d2ora.report.model.RunSummary`
(the public functions also take the plain dict, and type it). Optional per-round fields (peer and
consensus evaluations, validation, consensus distances) may be ``null`` in rows that were not
evaluated; tables list only evaluated rounds and each plot uses only the rows that have its field.

Modules, one job each: :mod:`~d2ora.report.model` is summary.json as typed classes (read, written
and validated there) and the final numbers of a run and a method, :mod:`~d2ora.report.rows` reads
numbers out of rows and summaries, :mod:`~d2ora.report.finals` a run's and a method's final numbers,
:mod:`~d2ora.report.stats` computes over them (mean ± sample std over seeds, binomial standard
error, rounds to a target), :mod:`~d2ora.report.groups` groups a comparison's runs by method (one
per seed), :mod:`~d2ora.report.formatting` writes them, :mod:`~d2ora.report.tables` builds the
tables (and their rich renderings), :mod:`~d2ora.report.markdown` the Markdown,
:mod:`~d2ora.report.csv_files` the CSVs, :mod:`~d2ora.report.plots` the PNGs, and
:mod:`~d2ora.report.writers` writes a report folder (plots first, Markdown last, every file
atomically).
"""

from d2ora.report.csv_files import CSV_COLUMNS, SEED_CSV_COLUMNS
from d2ora.report.finals import run_final
from d2ora.report.formatting import fmt_metric
from d2ora.report.groups import MethodRuns
from d2ora.report.layout import (
    COMPARE_CSV_NAME,
    COMPARE_NAME,
    COMPARE_PLOTS,
    COMPARE_SEEDS_CSV_NAME,
    PLOTS_DIR,
    REPORT_NAME,
    RUN_PLOTS,
)
from d2ora.report.model import RunFinal, RunSummary, SummaryError, TrustSummary
from d2ora.report.rows import Row, Run, Summary
from d2ora.report.stats import TARGET_GAP_POINTS
from d2ora.report.tables import (
    compare_table,
    results_table,
    spread_note,
    standard_error_note,
    target_note,
    target_table,
)
from d2ora.report.writers import write_compare_report, write_run_report

__all__ = [
    "COMPARE_CSV_NAME",
    "COMPARE_NAME",
    "COMPARE_PLOTS",
    "COMPARE_SEEDS_CSV_NAME",
    "CSV_COLUMNS",
    "PLOTS_DIR",
    "REPORT_NAME",
    "RUN_PLOTS",
    "SEED_CSV_COLUMNS",
    "TARGET_GAP_POINTS",
    "MethodRuns",
    "Row",
    "Run",
    "RunFinal",
    "RunSummary",
    "Summary",
    "SummaryError",
    "TrustSummary",
    "compare_table",
    "fmt_metric",
    "results_table",
    "run_final",
    "spread_note",
    "standard_error_note",
    "target_note",
    "target_table",
    "write_compare_report",
    "write_run_report",
]
