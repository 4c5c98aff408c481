"""The PNG plots of a report (matplotlib, Agg canvas, no pyplot), each written atomically."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from d2ora import atomic
from d2ora.report.formatting import MB
from d2ora.report.groups import MethodRuns, as_groups
from d2ora.report.layout import LEGEND_MAX
from d2ora.report.rows import (
    DISTANCES,
    Row,
    RunInput,
    Summary,
    consensus_metric,
    distance,
    is_percent,
    item_at,
    mean_train_loss,
    metric_label,
    metric_name,
    metric_scale,
    peer_count,
    peer_metrics,
    peer_stats,
)
from d2ora.report.stats import CurvePoint, mean_curve

DISTANCE_LABEL = "consensus distance (log scale)"


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


def plot_metric(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    metric, scale = metric_name(summary), metric_scale(summary)
    fig, ax = _new_axes(f"{summary.name}: test {metric}",
                        "samples seen (training examples, all peers)", metric_label(summary))
    n_peers = peer_count(summary, rows)
    for p in range(n_peers):
        xs, ys = _series(rows, "samples_seen", lambda r, p=p: item_at(peer_metrics(r, metric), p))
        ax.plot(xs, [y * scale for y in ys], marker="." if len(xs) == 1 else None, **_peer_style(p, n_peers))
    xs, ys = _series(rows, "samples_seen", lambda r: (peer_stats(r, metric) or (None,))[0])
    ax.plot(xs, [y * scale for y in ys], "--", color="tab:red", lw=1.6, marker="o", ms=3, label="mean of peers")
    xs, ys = _series(rows, "samples_seen", lambda r: consensus_metric(r, metric))
    ax.plot(xs, [y * scale for y in ys], color="black", lw=2.6, marker="o", ms=4, label="consensus model")
    if not any(line.get_xdata().size for line in ax.get_lines()):
        _no_data(ax, "no evaluated rounds")
    _legend(ax)
    return _save(fig, path)


def plot_consensus(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    fig, ax = _new_axes(f"{summary.name}: consensus distance of the peers' adapters", "round",
                        DISTANCE_LABEL)
    plotted = False
    for (key, name), style in zip(DISTANCES, ("-o", "-s", "-^")):
        xs, ys = _positive(*_series(rows, "round", lambda r, key=key: distance(r, key)))
        if xs:
            ax.plot(xs, ys, style, ms=3, lw=1.4, label=f"on {name}")
            plotted = True
    if plotted:
        ax.set_yscale("log")
    else:  # a log axis over no data would only warn; say why the plot is empty instead
        _no_data(ax, "no positive distances (a single peer is its own consensus)")
    _legend(ax)
    return _save(fig, path)


def plot_train_loss(summary: Summary, rows: Sequence[Row], path: Path) -> Path:
    fig, ax = _new_axes(f"{summary.name}: training loss",
                        "round", "mean training loss over the round's local steps")
    n_peers = peer_count(summary, rows)
    for p in range(n_peers):
        xs, ys = _series(rows, "round", lambda r, p=p: item_at(r.get("train_loss"), p))
        ax.plot(xs, ys, marker="." if len(xs) == 1 else None, **_peer_style(p, n_peers))
    if n_peers > 1:
        xs, ys = _series(rows, "round", mean_train_loss)
        ax.plot(xs, ys, "--", color="black", lw=1.8, label="mean of peers")
    if not any(line.get_xdata().size for line in ax.get_lines()):
        _no_data(ax, "no training rounds yet")
    _legend(ax)
    return _save(fig, path)


def _band_limits(summary: Summary) -> tuple[float, float]:
    """Where a ± std band may reach: an accuracy cannot leave [0, 1], so the band stops there."""
    return (0.0, 1.0) if is_percent(summary) else (-math.inf, math.inf)


def _method_curve(ax: Any, group: MethodRuns, points: Sequence[CurvePoint], x_scale: float, y_scale: float,
                  color: str) -> None:
    """The mean over seeds as a line, and ± one sample std as a band where two or more seeds have the point."""
    lo, hi = _band_limits(group.runs[0][0])
    xs = [p.x / x_scale for p in points]
    ax.plot(xs, [p.y * y_scale for p in points], marker="o", ms=3, lw=1.6, color=color, label=_curve_label(group))
    band = [(x, p, max(lo, p.y - p.y_std), min(hi, p.y + p.y_std)) for x, p in zip(xs, points) if p.y_std is not None]
    if len(band) > 1:
        ax.fill_between([b[0] for b in band], [b[2] * y_scale for b in band], [b[3] * y_scale for b in band],
                        color=color, alpha=0.18, lw=0)
    elif band:  # a single evaluated point (e.g. one round): an error bar, as a band needs two
        x, p, low, high = band[0]
        ax.errorbar([x], [p.y * y_scale], yerr=[[(p.y - low) * y_scale], [(high - p.y) * y_scale]], color=color,
                    capsize=3, lw=1.0)


def _curve_label(group: MethodRuns, suffix: str = "") -> str:
    n = len(group.runs)
    return f"{group.name}{suffix}" if n == 1 else f"{group.name}{suffix} (mean ± std, {n} seeds)"


def _reference_line(ax: Any, group: MethodRuns, points: Sequence[CurvePoint], y_scale: float, color: str) -> None:
    """A method that sends nothing (local, centralized) would be a vertical line at x = 0: show its final
    mean as a dashed horizontal line instead (± std as a light span), the level the others are measured by."""
    last = points[-1]
    ax.axhline(last.y * y_scale, color=color, ls="--", lw=1.4, label=_curve_label(group, ": sends nothing, final"))
    if last.y_std is not None:
        lo, hi = _band_limits(group.runs[0][0])
        ax.axhspan(max(lo, last.y - last.y_std) * y_scale, min(hi, last.y + last.y_std) * y_scale, color=color,
                   alpha=0.12, lw=0)


def _plot_compare_curves(runs: Sequence[RunInput | MethodRuns], path: Path, x_key: str, xlabel: str,
                         x_scale: float = 1.0, silent_as_reference: bool = False) -> Path:
    groups = as_groups(runs)
    first = groups[0].runs[0][0]
    metric, y_scale = metric_name(first), metric_scale(first)
    fig, ax = _new_axes(f"consensus model: test {metric}", xlabel, metric_label(first))
    for i, group in enumerate(groups):
        points = mean_curve([rows for _, rows in group.runs], x_key, lambda r: consensus_metric(r, metric))
        if silent_as_reference and points and all(p.x == 0 for p in points):
            _reference_line(ax, group, points, y_scale, f"C{i % 10}")
        else:
            _method_curve(ax, group, points, x_scale, y_scale, f"C{i % 10}")
    if not any(len(line.get_xdata()) for line in ax.get_lines()):  # axhline holds a list, not an array
        _no_data(ax, "no evaluated rounds")
    _legend(ax)
    return _save(fig, path)


def plot_compare_metric(runs: Sequence[RunInput | MethodRuns], path: Path) -> Path:
    """Consensus metric against samples seen: per method the mean over seeds, ± one std as a band."""
    return _plot_compare_curves(runs, path, "samples_seen", "samples seen (training examples, all peers)")


def plot_compare_metric_bytes(runs: Sequence[RunInput | MethodRuns], path: Path) -> Path:
    """Consensus metric against MB sent (all peers): what each method pays in traffic for its accuracy.
    Methods that send nothing (local, centralized) are dashed horizontal lines at their final level."""
    return _plot_compare_curves(runs, path, "bytes_sent_total", "MB sent (cumulative, all peers; 10^6 bytes)", x_scale=MB,
                                silent_as_reference=True)


def plot_compare_consensus(runs: Sequence[RunInput | MethodRuns], path: Path) -> Path:
    """B·A consensus distance per method, the mean over seeds (no band: ± std can cross zero on a log axis)."""
    fig, ax = _new_axes("consensus distance on B·A", "round", DISTANCE_LABEL)
    plotted = False
    for group in as_groups(runs):
        points = mean_curve([rows for _, rows in group.runs], "round", lambda r: distance(r, "product"))
        xs, ys = _positive([p.round for p in points], [p.y for p in points])
        label = group.name if len(group.runs) == 1 else f"{group.name} (mean, {len(group.runs)} seeds)"
        # An all-zero run (P = 1) still gets a legend entry, so its absence reads as intended.
        ax.plot(xs, ys, marker="o", ms=3, lw=1.6, label=label if xs else f"{label} (no positive values)")
        plotted = plotted or bool(xs)
    if plotted:
        ax.set_yscale("log")
    else:
        _no_data(ax, "no positive distances")
    _legend(ax)
    return _save(fig, path)
