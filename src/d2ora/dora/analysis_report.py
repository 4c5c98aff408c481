"""What the weight-decomposition analysis concludes: ΔD-on-ΔM fits, and its files.

The fits are least squares of ΔD on ΔM per method, per module type and per checkpoint (the
paper's Fig. 2 slope). The files are a CSV of every point, a JSON summary of the fits and a
Fig. 2-style scatter PNG; each is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2ora import atomic
from d2ora.dora.analysis import LayerDelta
from d2ora.dora.analysis_files import Checkpoint
from d2ora.dora.decomposition import AnalysisError


# ============================================================================================= fitting
@dataclass
class FitSummary:
    """Least-squares fit of ΔD on ΔM over a set of points (``None`` when it is undefined)."""

    points: int
    slope: float | None
    intercept: float | None
    r_value: float | None
    p_value: float | None
    stderr: float | None
    mean_delta_m: float | None
    mean_delta_d: float | None


@dataclass
class MethodSummary:
    method: str
    checkpoints: list[str]
    fit: FitSummary
    by_module_type: dict[str, FitSummary] = field(default_factory=dict)
    by_checkpoint: dict[str, FitSummary] = field(default_factory=dict)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def fit(rows: Sequence[LayerDelta]) -> FitSummary:
    """``scipy.stats.linregress(ΔM, ΔD)``; slope etc. are None for fewer than 2 points or constant ΔM."""
    xs = [r.delta_m for r in rows]
    ys = [r.delta_d for r in rows]
    n = len(rows)
    mean_m = sum(xs) / n if n else None
    mean_d = sum(ys) / n if n else None
    if n < 2 or max(xs) == min(xs):
        return FitSummary(n, None, None, None, None, None, mean_m, mean_d)
    from scipy.stats import linregress

    res = linregress(xs, ys)
    return FitSummary(
        n, _finite(res.slope), _finite(res.intercept), _finite(res.rvalue), _finite(res.pvalue),
        _finite(res.stderr), mean_m, mean_d,
    )


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def summarize(rows: Sequence[LayerDelta]) -> dict[str, MethodSummary]:
    """Per method (in order of appearance): the overall fit and fits per module type and checkpoint."""
    result: dict[str, MethodSummary] = {}
    for method in _ordered([r.method for r in rows]):
        mine = [r for r in rows if r.method == method]
        checkpoints = _ordered([r.checkpoint for r in mine])
        result[method] = MethodSummary(
            method=method,
            checkpoints=checkpoints,
            fit=fit(mine),
            by_module_type={t: fit([r for r in mine if r.module_type == t]) for t in _ordered([r.module_type for r in mine])},
            by_checkpoint={c: fit([r for r in mine if r.checkpoint == c]) for c in checkpoints},
        )
    return result


@dataclass
class AnalysisResult:
    """A whole analysis: its inputs, every point and the fits (what the files are written from)."""

    base: Path
    model_class: str
    checkpoints: list[Checkpoint]
    rows: list[LayerDelta]
    summaries: dict[str, MethodSummary]


# =============================================================================================== files
CSV_COLUMNS = ("method", "checkpoint", "layer", "module_type", "delta_m", "delta_d")
CSV_NAME = "analysis.csv"
JSON_NAME = "analysis.json"
PNG_NAME = "analysis.png"


def write_csv(rows: Sequence[LayerDelta], path: str | Path) -> Path:
    """``method, checkpoint, layer, module_type, delta_m, delta_d``, full float precision."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.method, r.checkpoint, r.layer, r.module_type, repr(r.delta_m), repr(r.delta_d)])
    return atomic.write_text(path, buf.getvalue())


def _fit_dict(f: FitSummary) -> dict[str, Any]:
    return {
        "points": f.points, "slope": f.slope, "intercept": f.intercept, "r_value": f.r_value,
        "p_value": f.p_value, "stderr": f.stderr, "mean_delta_m": f.mean_delta_m, "mean_delta_d": f.mean_delta_d,
    }


def summary_dict(result: AnalysisResult) -> dict[str, Any]:
    """What ``analysis.json`` holds: per-method slopes, r-values and counts, and the inputs."""
    return {
        "base": str(result.base),
        "model_class": result.model_class,
        "checkpoints": [
            {"label": c.label, "path": str(c.path), "method": c.method, "kind": c.kind,
             "layers": sum(1 for r in result.rows if r.checkpoint == c.label and r.method == c.method)}
            for c in result.checkpoints
        ],
        "methods": {
            m: {
                **_fit_dict(s.fit),
                "checkpoints": s.checkpoints,
                "by_module_type": {t: _fit_dict(f) for t, f in s.by_module_type.items()},
                "by_checkpoint": {c: _fit_dict(f) for c, f in s.by_checkpoint.items()},
            }
            for m, s in result.summaries.items()
        },
    }


def write_json(result: AnalysisResult, path: str | Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary_dict(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def write_plot(rows: Sequence[LayerDelta], summaries: dict[str, MethodSummary], path: str | Path) -> Path:
    """Fig. 2-style scatter: ΔD (y) vs ΔM (x), one panel per method, one colour/marker per checkpoint."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summaries)
    ncols = min(len(methods), 3) or 1
    nrows = max(1, math.ceil(len(methods) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, method in zip(axes, methods):
        mine = [r for r in rows if r.method == method]
        # Colour and marker follow the checkpoint's position (epoch 1, 2, ...), alike in every panel.
        for i, ckpt in enumerate(summaries[method].checkpoints):
            pts = [r for r in mine if r.checkpoint == ckpt]
            ax.scatter([r.delta_m for r in pts], [r.delta_d for r in pts], s=28, alpha=0.85,
                       color=f"C{i % 10}", marker=_MARKERS[i % len(_MARKERS)], label=ckpt)
        f = summaries[method].fit
        if f.slope is not None:
            xs = [r.delta_m for r in mine]
            lo, hi = min(xs), max(xs)
            ax.plot([lo, hi], [f.intercept + f.slope * lo, f.intercept + f.slope * hi], "k--", lw=1.2,
                    label=f"fit: k={f.slope:.3g}, r={f.r_value:.2f}")
            ax.set_title(f"{method}  (slope k = {f.slope:.3g}, n = {f.points})")
        else:
            ax.set_title(f"{method}  (slope undefined, n = {f.points})")
        ax.set_xlabel("ΔM (mean |m_FT − m_0|)")
        ax.set_ylabel("ΔD (mean 1 − cos(V, W0))")
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return Path(path)


def write_outputs(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``analysis.csv``, ``analysis.json`` and ``analysis.png`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"output '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(result.rows, out / CSV_NAME),
        "json": write_json(result, out / JSON_NAME),
        "png": write_plot(result.rows, result.summaries, out / PNG_NAME),
    }
