"""A comparison's runs grouped by method: one run per seed, and what is read across a method's seeds
(the test-set size, the rounds until a method comes within a gap of centralized's accuracy).

``d2ora compare --seeds 0,1,2`` hands the report one :class:`MethodRuns` per method; a plain list of
``(summary, rows)`` runs (one seed each, as before seeds existed) is read as one group per run, so
every report function accepts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from d2ora.report.model import RunSummary
from d2ora.report.rows import (
    Run,
    RunInput,
    consensus_examples,
    consensus_metric,
    is_percent,
    last_with,
    metric_name,
    rows_or_final,
)
from d2ora.report.stats import (
    TARGET_GAP_POINTS,
    Reached,
    Spread,
    first_reaching,
    spread,
)

#: summary.json's ``mixer`` of a centralized run: the reference the rounds-to-target columns need.
CENTRALIZED = "centralized"


@dataclass(frozen=True)
class MethodRuns:
    """One compared method's runs, one per seed, with everything else in the config equal."""

    name: str
    runs: tuple[RunInput, ...]  # summaries may be plain dicts until :func:`as_groups` types them
    seeds: tuple[int | None, ...]  # None: not known (a run handed to the report on its own)
    run_dirs: tuple[str, ...]  # each run's folder, relative to the comparison folder


def as_groups(items: Sequence[RunInput | MethodRuns]) -> list[MethodRuns]:
    """Groups as given; a bare run becomes a group of one (its folder assumed ``<name>/``, as compare
    puts single-seed runs). Every summary becomes a :class:`~d2ora.report.model.RunSummary` (a plain
    dict is validated here, once); rows default to the summary's final row, as for a single run."""
    groups = []
    for item in items:
        if not isinstance(item, MethodRuns):
            summary, rows = _typed(item)
            item = MethodRuns(summary.name, ((summary, rows),), (None,), (summary.name,))
        groups.append(MethodRuns(item.name, tuple(map(_typed, item.runs)), item.seeds, item.run_dirs))
    return groups


def _typed(run: RunInput) -> Run:
    summary = RunSummary.coerce(run[0])
    return summary, rows_or_final(summary, run[1])


def check_groups(groups: Sequence[MethodRuns]) -> None:
    """Raise ValueError unless there is something to compare, in one metric."""
    if not groups:
        raise ValueError("no runs to compare")
    empty = [g.name for g in groups if not g.runs]
    if empty:
        raise ValueError(f"no runs for {', '.join(empty)}")
    metrics = {metric_name(s) for g in groups for s, _ in g.runs}
    if len(metrics) > 1:
        raise ValueError(f"runs use different metrics ({', '.join(sorted(metrics))}): not comparable")


def is_multi_seed(groups: Sequence[MethodRuns]) -> bool:
    return any(len(g.runs) > 1 for g in groups)


def final_consensus(run: Run) -> float | None:
    """The run's last evaluated consensus metric (evaluation may have skipped the last rounds)."""
    summary, rows = run
    row = last_with(rows, "consensus_test")
    return consensus_metric(row, metric_name(summary)) if row else None


def n_test(group: MethodRuns) -> int | None:
    """Test examples behind each of the method's consensus accuracies; None when not recorded or when
    the seeds disagree (then no single standard error describes them)."""
    sizes = {consensus_examples(last_with(rows, "consensus_test")) for _, rows in group.runs}
    return sizes.pop() if len(sizes) == 1 else None


# ------------------------------------------------------------------------------------ rounds to target


@dataclass(frozen=True)
class TargetResult:
    """Per seed of one method: its target (centralized's final minus the gap) and where it was reached."""

    name: str
    seeds: tuple[int | None, ...]
    targets: tuple[float | None, ...]
    reached: tuple[Reached | None, ...]

    @property
    def n_reached(self) -> int:
        return sum(r is not None for r in self.reached)

    def rounds(self) -> Spread:
        """Over the seeds that reached the target only: a seed that never did has no round to average."""
        return spread([r.round for r in self.reached if r is not None])

    def bytes_sent(self) -> Spread:
        return spread([r.bytes_sent_total for r in self.reached if r is not None])

    def samples_seen(self) -> Spread:
        return spread([r.samples_seen for r in self.reached if r is not None])


def centralized_group(groups: Sequence[MethodRuns]) -> MethodRuns | None:
    return next((g for g in groups if all(s.mixer == CENTRALIZED for s, _ in g.runs)), None)


def _targets(group: MethodRuns, central: MethodRuns, gap: float) -> list[float | None]:
    """Each seed against centralized at the same seed (same split and partition); where the seeds do not
    line up, against centralized's mean final over its seeds."""
    finals = [final_consensus(run) for run in central.runs]
    if group.seeds == central.seeds:
        return [None if f is None else f - gap for f in finals]
    mean = spread(finals).mean
    return [None if mean is None else mean - gap] * len(group.runs)


def target_results(groups: Sequence[MethodRuns], gap_points: float = TARGET_GAP_POINTS) -> list[TargetResult] | None:
    """Every method's rounds to within ``gap_points`` accuracy points of centralized's final accuracy.

    None when there is no centralized run among the groups, or when the metric is not an accuracy
    (a perplexity has no percentage points to be within).
    """
    groups = as_groups(groups)  # a caller may hand in plain-dict summaries
    central = centralized_group(groups)
    if central is None or not is_percent(groups[0].runs[0][0]):
        return None
    gap = gap_points / 100.0  # accuracy is stored as a fraction
    results = []
    for group in groups:
        targets = _targets(group, central, gap)
        reached = tuple(
            None if t is None else first_reaching(rows, metric_name(s), t)
            for t, (s, rows) in zip(targets, group.runs)
        )
        results.append(TargetResult(group.name, group.seeds, tuple(targets), reached))
    return results
