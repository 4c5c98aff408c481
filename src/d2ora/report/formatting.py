"""How a report writes a number: metric, scientific, fixed-point, megabytes and mean ± std; ``-`` for missing."""

from __future__ import annotations

from collections.abc import Callable

from d2ora.report.rows import Summary, is_percent
from d2ora.report.stats import Spread

MB = 1e6  # decimal megabytes, as network traffic is usually counted
DASH = "-"


def fmt_percent(value: float | None) -> str:
    """A fraction as a percent with 1 decimal: 0.875 -> ``87.5``."""
    return DASH if value is None else f"{value * 100:.1f}"


def fmt_metric(summary: Summary, value: float | None) -> str:
    """Accuracy as a percent (:func:`fmt_percent`); other metrics with 2 decimals."""
    if value is None or is_percent(summary):
        return fmt_percent(value)
    return f"{value:.2f}"


def fmt_sci(value: float | None) -> str:
    """Three significant digits in scientific notation: ``1.23e-04``."""
    return DASH if value is None else f"{value:.2e}"


def fmt_float(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_mb(n_bytes: float | None) -> str:
    return DASH if n_bytes is None else f"{n_bytes / MB:.2f}"


PLUS_MINUS = "±"


def fmt_spread(value: Spread, fmt: Callable[[float | None], str]) -> str:
    """``mean ± std`` in ``fmt`` (the std in the same unit: accuracy points for an accuracy); the mean
    alone when there is no std (one seed), so a single-seed table reads as it always did."""
    if value.std is None:
        return fmt(value.mean)
    return f"{fmt(value.mean)} {PLUS_MINUS} {fmt(value.std)}"
