"""``d2ora compare``: several mixers on the same partition, seeds and model; one table.

Each mixer runs as its own :func:`~d2ora.recipes.simulate.simulate` with everything else equal
(same seed, so the same split, partition, adapter init and batch order), into
``output_dir/<mixer>/``; ``output_dir/compare.md`` / ``compare.csv`` and plots put them side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.simulate import simulate
from d2ora.recipes.simulate_config import CENTRALIZED, MIXER_CHOICES, SimulateConfig

#: What compare runs side by side: every mixer, and the centralized run mode.
METHOD_CHOICES = (*MIXER_CHOICES, CENTRALIZED)

DEFAULT_MIXERS = ("local", "d2ora", "decaf", "dimat", "fedavg", "centralized")


def parse_mixers(text: str | list[str]) -> list[str]:
    """``"local,d2ora"`` -> ``["local", "d2ora"]``; unknown or repeated names are a ValueError."""
    names = [n.strip().lower().replace("-", "_") for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in METHOD_CHOICES]
    if unknown:
        raise ValueError(f"unknown mixer(s) {', '.join(unknown)}; choose from {', '.join(METHOD_CHOICES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"mixer list repeats a name: {', '.join(names)}")
    if not names:
        raise ValueError("no mixers given")
    return names


def compare(config: SimulateConfig, mixers: list[str], console: Console | None = None) -> list[dict[str, Any]]:
    """Run ``config`` once per mixer; returns the summaries in the order given."""
    from d2ora.report import compare_table, write_compare_report

    console = console or Console()
    root = Path(config.output_dir)
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for i, mixer in enumerate(mixers, 1):
        console.rule(f"[bold]{mixer}[/bold] ({i}/{len(mixers)})")
        mode = {"mode": CENTRALIZED} if mixer == CENTRALIZED else {"mode": "decentralized", "mixer": mixer}
        run_config = config.model_copy(update={**mode, "output_dir": root / mixer})
        summary = simulate(SimulateConfig.model_validate(run_config.model_dump()), console=console)
        runs.append((summary, read_rows(root / mixer)))
    path = write_compare_report(root, runs)
    console.print(compare_table(runs))
    console.print(f"comparison: {path}")
    return [summary for summary, _ in runs]
