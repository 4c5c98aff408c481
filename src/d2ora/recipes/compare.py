"""``d2ora compare``: several mixers on the same partition, seeds and model; one table.

Each mixer runs as its own :func:`~d2ora.recipes.simulate.simulate` with everything else equal
(same seed, so the same split, partition, adapter init and batch order). With one seed each run goes
to ``output_dir/<mixer>/``; with several (``seeds``) to ``output_dir/<mixer>/seed-<s>/``, and the
report shows each mixer's mean ± sample standard deviation over the seeds. ``output_dir/compare.md``,
``compare.csv``, ``compare_seeds.csv`` and plots put them side by side.

A (mixer, seed) whose folder already holds a finished run of the same result-relevant config is not
run again, and one with checkpoints of it is resumed, so a long grid continues across sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console

from d2ora.config_io import ConfigError, load_config
from d2ora.engine.checkpoint import CheckpointError, config_differences
from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.simulate import CONFIG_FILE, SUMMARY_FILE, check_resumable, simulate
from d2ora.recipes.simulate_config import CENTRALIZED, MIXER_CHOICES, SimulateConfig
from d2ora.report.model import RunSummary

if TYPE_CHECKING:
    from d2ora.report import MethodRuns

#: What compare runs side by side: every mixer, and the centralized run mode.
METHOD_CHOICES = (*MIXER_CHOICES, CENTRALIZED)

DEFAULT_MIXERS = ("local", "d2ora", "decaf", "dimat", "fedavg", "centralized")

Run = tuple[RunSummary, list[dict[str, Any]]]


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


def parse_seeds(text: str | list[str]) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a non-integer, a negative or repeated seed, or none, is a ValueError."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("no seeds given: pass e.g. --seeds 0,1,2")
    # ASCII digits only: no sign, decimal point or exponent, and no '²' (isdigit, yet int() rejects it).
    bad = [p for p in parts if not (p.isascii() and p.isdigit())]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {', '.join(bad)}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed list repeats a seed: {', '.join(map(str, seeds))}")
    return seeds


def run_dir(root: Path, method: str, seed: int, several_seeds: bool) -> Path:
    """``root/<method>/`` for a single seed (the layout before seeds existed), else ``root/<method>/seed-<s>/``."""
    return root / method / f"seed-{seed}" if several_seeds else root / method


def method_config(config: SimulateConfig, method: str, seed: int, out: Path) -> SimulateConfig:
    """``config`` for one (method, seed) run, validated afresh."""
    mode = {"network.mode": CENTRALIZED} if method == CENTRALIZED else {"network.mode": "decentralized", "network.mixer": method}
    return config.updated({**mode, "run.seed": seed, "run.output_dir": out})


@dataclass(frozen=True)
class Previous:
    """What a run folder holds for a planned run: a finished run of it, a resumable one, or nothing usable."""

    status: Literal["done", "resume", "new"]
    why: str = ""


def previous_run(config: SimulateConfig, out: Path) -> Previous:
    """Whether ``out`` already holds ``config``'s run. Only keys that can change results are compared
    (:meth:`SimulateConfig.result_config`), as ``--resume`` does: eval_batch_size or device may differ."""
    saved_path = out / CONFIG_FILE
    if not saved_path.is_file():
        return Previous("new")
    try:
        saved = load_config(SimulateConfig, saved_path)
    except ConfigError as exc:
        return Previous("new", f"{saved_path} no longer loads ({str(exc).splitlines()[0]}): running afresh")
    differing = config_differences(saved.result_config(), config.result_config())
    if differing:
        return Previous("new", f"{out} holds a run whose config differs in {', '.join(differing)}: running afresh")
    if is_finished(config, out):
        return Previous("done")
    try:
        check_resumable(config, out)
    except CheckpointError:
        return Previous("new")
    return Previous("resume", f"{out} holds an unfinished run of this config: resuming it from its newest checkpoint")


def is_finished(config: SimulateConfig, out: Path) -> bool:
    """A summary.json that belongs to the metrics beside it and covers every round.

    config.yaml is written when a run starts, summary.json when it ends: an interrupted rerun leaves
    the new config beside the old summary. The summary's final row equal to the last metrics row of
    the configured round proves both come from the same, finished run. A summary.json that does not
    validate (SummaryError is a ValueError) is no finished run either: it is run again.
    """
    try:
        summary = RunSummary.read(out / SUMMARY_FILE)
        rows = read_rows(out)
    except (OSError, ValueError):
        return False
    if not rows or rows[-1].get("round") != config.run.rounds:
        return False
    return summary.final == rows[-1]  # both written from the same dict (NaN is stored as null)


def run_one(config: SimulateConfig, label: str, console: Console, skip_done: bool) -> Run:
    """Run (or resume, or skip as done) one (method, seed); its summary and metrics rows."""
    out = Path(config.run.output_dir)
    previous = previous_run(config, out) if skip_done else Previous("new")
    if previous.status == "done":
        console.print(f"{label}: finished earlier in {out} (same config), skipped")
        return RunSummary.read(out / SUMMARY_FILE), read_rows(out)
    console.rule(f"[bold]{label}[/bold]")
    if previous.why:
        console.print(previous.why, markup=False)
    simulate(config, console=console, resume=previous.status == "resume")
    # Read back what the run wrote, as for a skipped run: the report sees the same summary either way.
    return RunSummary.read(out / SUMMARY_FILE), read_rows(out)


def compare(config: SimulateConfig, mixers: list[str], console: Console | None = None, *,
            seeds: list[int] | None = None, skip_done: bool = True) -> list[dict[str, Any]]:
    """Run ``config`` once per mixer and seed (default: the config's own seed); returns the summaries,
    mixer by mixer in the order given and each mixer's seeds in order.

    Seeds run in the outer loop, so an interrupted grid has every mixer at the first seeds.
    ``skip_done=False`` reruns every (mixer, seed) afresh, finished or not.
    """
    from d2ora.report import MethodRuns

    console = console or Console()
    seeds = [config.run.seed] if seeds is None else list(seeds)
    root, several = Path(config.run.output_dir), len(seeds) > 1
    plan = [(seed, method) for seed in seeds for method in mixers]
    runs: dict[tuple[str, int], Run] = {}
    for i, (seed, method) in enumerate(plan, 1):
        run_config = method_config(config, method, seed, run_dir(root, method, seed, several))
        runs[method, seed] = run_one(run_config, f"{method}, seed {seed} ({i}/{len(plan)})", console, skip_done)
    groups = [
        MethodRuns(
            name=runs[method, seeds[0]][0].name,
            runs=tuple(runs[method, s] for s in seeds), seeds=tuple(seeds),
            run_dirs=tuple(run_dir(Path(), method, s, several).as_posix() for s in seeds),
        )
        for method in mixers
    ]
    report_groups(root, groups, console)
    return [runs[method, s][0].to_dict() for method in mixers for s in seeds]


def report_groups(root: Path, groups: list[MethodRuns], console: Console) -> Path:
    """Write the comparison report and print its tables and notes."""
    from d2ora.report import (
        compare_table,
        spread_note,
        standard_error_note,
        target_note,
        target_table,
        write_compare_report,
    )

    path = write_compare_report(root, groups)
    console.print(compare_table(groups))
    for note in (spread_note(groups), standard_error_note(groups)):
        if note:
            console.print(note, markup=False)
    table = target_table(groups)
    console.print(table if table is not None else target_note(groups), markup=False)
    console.print(f"comparison: {path}")
    return path
