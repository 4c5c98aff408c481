"""A run's final numbers read off its rows, and a method's over its seeds (mean and sample std):
what the comparison table, compare.csv and compare_seeds.csv show."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from d2ora.report.groups import MethodRuns
from d2ora.report.model import MethodFinal, RunFinal, RunSummary, SummaryInput
from d2ora.report.rows import (
    DISTANCES,
    GENERATIVE_ACCURACY,
    Row,
    consensus_metric,
    distance,
    is_higher_better,
    last_with,
    mean_of,
    metric_name,
    own_split_mean,
    peer_metrics,
    rows_or_final,
    worst,
)
from d2ora.report.stats import Spread, spread


def run_final(summary: SummaryInput, rows: Sequence[Row]) -> RunFinal:
    """Each quantity from the last row that has it (the last rounds may skip evaluation)."""
    summary = RunSummary.coerce(summary)
    rows = rows_or_final(summary, rows)
    metric = metric_name(summary)
    consensus_row = last_with(rows, "consensus_test")
    peer_row = last_with(rows, "peer_test")
    val_row = last_with(rows, "peer_val")
    dist_row = last_with(rows, "consensus_distance")
    last = rows[-1] if rows else {}
    peers = [v for v in peer_metrics(peer_row, metric) if v is not None] if peer_row else []
    peers_generative = [v for v in peer_metrics(peer_row, GENERATIVE_ACCURACY) if v is not None] if peer_row else []
    runtime = summary.runtime_s
    return RunFinal(
        name=summary.name,
        consensus=consensus_metric(consensus_row, metric) if consensus_row else None,
        mean_peer=mean_of(peers),
        worst_peer=worst(peers, is_higher_better(summary)),
        own_split=own_split_mean(val_row, metric) if val_row else None,
        distances={key: distance(dist_row, key) if dist_row else None for key, _ in DISTANCES},
        bytes_sent_total=last.get("bytes_sent_total"),
        samples_seen=last.get("samples_seen"),
        rounds=last.get("round"),
        runtime_s=None if runtime is None else float(runtime),
        consensus_generative=consensus_metric(consensus_row, GENERATIVE_ACCURACY) if consensus_row else None,
        mean_peer_generative=mean_of(peers_generative),
    )


def method_final(group: MethodRuns) -> MethodFinal:
    """:func:`run_final` of every seed, then mean and spread of each quantity over the seeds."""
    finals = tuple(run_final(s, r) for s, r in group.runs)

    def over(get: Callable[[RunFinal], float | None]) -> Spread:
        return spread([get(f) for f in finals])

    return MethodFinal(
        name=group.name, runs=finals,
        consensus=over(lambda f: f.consensus), mean_peer=over(lambda f: f.mean_peer),
        worst_peer=over(lambda f: f.worst_peer), own_split=over(lambda f: f.own_split),
        distances={key: over(lambda f, key=key: f.distances[key]) for key, _ in DISTANCES},
        bytes_sent_total=over(lambda f: f.bytes_sent_total), samples_seen=over(lambda f: f.samples_seen),
        runtime_s=over(lambda f: f.runtime_s),
        consensus_generative=over(lambda f: f.consensus_generative),
        mean_peer_generative=over(lambda f: f.mean_peer_generative),
    )
