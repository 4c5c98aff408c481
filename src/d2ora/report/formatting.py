"""How a report writes a number: metric, scientific, fixed-point and megabytes; ``-`` for missing."""

from __future__ import annotations

from d2ora.report.rows import Summary, is_percent

MB = 1e6  # decimal megabytes, as network traffic is usually counted
DASH = "-"


def fmt_metric(summary: Summary, value: float | None) -> str:
    """Accuracy as a percent with 1 decimal (0.875 -> ``87.5``); other metrics with 2 decimals."""
    if value is None:
        return DASH
    return f"{value * 100:.1f}" if is_percent(summary) else f"{value:.2f}"


def fmt_sci(value: float | None) -> str:
    """Three significant digits in scientific notation: ``1.23e-04``."""
    return DASH if value is None else f"{value:.2e}"


def fmt_float(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_mb(n_bytes: float | None) -> str:
    return DASH if n_bytes is None else f"{n_bytes / MB:.2f}"
