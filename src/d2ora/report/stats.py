"""Statistics over seeds: mean and sample standard deviation, the binomial standard error of a test
accuracy, curves averaged over seeds, and the first evaluated round that reaches a target.

Pure functions over numbers and metric rows (plain dicts as loaded from JSON): no files, no
formatting, so each can be checked against a hand computation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from d2ora.report.rows import Row, consensus_metric

#: How close (in accuracy percentage points) a method's consensus must come to centralized's final
#: accuracy to count as "reached": the rounds-to-target columns of ``d2ora compare``.
TARGET_GAP_POINTS = 2.0

# Accuracies are k / n_test fractions and the target a difference of two floats: without this slack
# 0.48 computed as 0.5 - 0.02 could fail to equal an accuracy of 12/25 by one rounding step.
_TIE_SLACK = 1e-9


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof = 1) of the ``count`` known values over seeds.

    ``std`` is None with fewer than two known values: one seed says nothing about the spread.
    """

    mean: float | None
    std: float | None
    count: int  # how many values were known (missing ones, e.g. no peer evaluation, are left out)


def spread(values: Sequence[float | None]) -> Spread:
    """Mean and sample standard deviation (``statistics.stdev``, ddof = 1) of the non-missing values."""
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not known:
        return Spread(None, None, 0)
    std = statistics.stdev(known) if len(known) > 1 else None
    return Spread(statistics.fmean(known), std, len(known))


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent test examples: sqrt(p(1-p)/n)."""
    if n <= 0:
        raise ValueError(f"the test set must hold at least one example, got n = {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"an accuracy is a fraction in [0, 1], got {p}")
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class CurvePoint:
    """One evaluated round averaged over seeds: mean x, mean y and y's sample std (None for one seed)."""

    round: int
    x: float
    y: float
    y_std: float | None


def mean_curve(runs_rows: Sequence[Sequence[Row]], x_key: str, value: Callable[[Row], float | None]) -> list[CurvePoint]:
    """The curve of ``value`` against ``x_key`` averaged over runs, round by round.

    Rounds are matched by number (every seed evaluates the same rounds); a round counts where at least
    one run has the value, and its std only where two or more do.
    """
    by_round: dict[int, list[tuple[float, float]]] = {}
    for rows in runs_rows:
        for row in rows:
            y, x = value(row), row.get(x_key)
            if y is not None and x is not None and row.get("round") is not None:
                by_round.setdefault(int(row["round"]), []).append((float(x), float(y)))
    points = []
    for rnd in sorted(by_round):
        xs, ys = zip(*by_round[rnd])
        s = spread(ys)
        if s.mean is not None:
            points.append(CurvePoint(rnd, statistics.fmean(xs), s.mean, s.std))
    return points


@dataclass(frozen=True)
class Reached:
    """Where a run first reached its target: the evaluated round and the traffic and samples until then."""

    round: int
    bytes_sent_total: int | None
    samples_seen: int | None


def first_reaching(rows: Sequence[Row], metric: str, target: float, higher_is_better: bool = True) -> Reached | None:
    """The first evaluated row whose consensus ``metric`` is at least ``target`` (at most, when lower
    is better); None when no row reaches it. Only rows with a consensus evaluation count: between
    evaluations (``eval_every`` > 1) nothing is known, so the answer is the first evaluated round."""
    for row in rows:
        value = consensus_metric(row, metric)
        if value is None or math.isnan(value):
            continue
        if (value >= target - _TIE_SLACK) if higher_is_better else (value <= target + _TIE_SLACK):
            total, samples = row.get("bytes_sent_total"), row.get("samples_seen")
            return Reached(int(row["round"]), None if total is None else int(total),
                           None if samples is None else int(samples))
    return None
