"""Where a report's files go, and when a listing is compacted; shared by the Markdown and the plots."""

from __future__ import annotations

REPORT_NAME = "report.md"
COMPARE_NAME = "compare.md"
COMPARE_CSV_NAME = "compare.csv"
COMPARE_SEEDS_CSV_NAME = "compare_seeds.csv"
PLOTS_DIR = "plots"
RUN_PLOTS = ("metric.png", "consensus.png", "train_loss.png")
COMPARE_PLOTS = ("compare_metric.png", "compare_consensus.png", "compare_metric_bytes.png")
COMPARE_PLOT_TITLES = ("consensus metric vs samples seen", "B·A consensus distance", "consensus metric vs MB sent")

# Above this many peers (or runs) a legend entry per line is noise: one entry stands for all.
LEGEND_MAX = 8
