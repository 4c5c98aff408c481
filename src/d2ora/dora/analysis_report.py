"""Outputs of the weight-decomposition analysis: CSV, JSON summary and the Fig. 2-style scatter PNG.

Each file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ora import atomic
from d2ora.dora.analysis import AnalysisError, AnalysisResult, FitSummary, LayerDelta, MethodSummary

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
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
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
