"""The CSV files of a comparison: ``compare.csv`` (one row per method, means and stds over seeds)
and ``compare_seeds.csv`` (one row per method and seed, the numbers behind the means).

Text only, from typed summaries and metric rows; :mod:`d2ora.report.writers` writes the files.
Numbers keep their full precision (``repr``) and a missing value is an empty cell.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from d2ora.report.finals import method_final
from d2ora.report.groups import (
    MethodRuns,
    TargetResult,
    as_groups,
    n_test,
    target_results,
)
from d2ora.report.model import MethodFinal
from d2ora.report.rows import (
    RunInput,
    consensus_examples,
    is_higher_better,
    is_percent,
    last_with,
    metric_name,
)
from d2ora.report.stats import binomial_se, spread
from d2ora.report.tables import check_runs

CSV_COLUMNS = (
    "name", "mixer", "method", "r", "model", "task", "peers", "topology", "partition", "rounds",
    "local_steps", "batch_size", "metric", "higher_is_better", "consensus_metric", "mean_peer_metric",
    "worst_peer_metric", "distance_magnitude", "distance_product", "distance_merged",
    "bytes_sent_total", "samples_seen", "runtime_s",
    # Added with seeds (appended, so readers of the older columns keep working): the numbers above are
    # means over the seeds; *_std the sample standard deviations (ddof = 1), empty for one seed.
    "n_seeds", "seeds", "consensus_metric_std", "mean_peer_metric_std", "worst_peer_metric_std",
    "distance_product_std", "distance_merged_std", "bytes_sent_total_std", "runtime_s_std",
    "n_test", "consensus_binomial_se", "target_metric", "target_reached_seeds",
    "rounds_to_target", "rounds_to_target_std", "bytes_to_target", "samples_to_target",
    # Each peer on its own held-out split (personalization); beside, never instead of, the global test.
    "own_split_metric", "own_split_metric_std",
    # An sft run's greedy-answer accuracy (fraction), beside its perplexity; empty for other tasks.
    "consensus_generative_accuracy", "consensus_generative_accuracy_std",
    "mean_peer_generative_accuracy", "mean_peer_generative_accuracy_std",
)

#: compare.csv's columns that are the method's first run's summary.json values, as they are there.
SUMMARY_CSV_COLUMNS = (
    "mixer", "method", "r", "model", "task", "peers", "topology", "partition", "rounds", "local_steps",
    "batch_size", "metric",
)

#: compare_seeds.csv: one row per (method, seed), the numbers the means and stds come from.
SEED_CSV_COLUMNS = (
    "name", "seed", "run_dir", "metric", "consensus_metric", "mean_peer_metric", "worst_peer_metric",
    "distance_product", "distance_merged", "bytes_sent_total", "samples_seen", "rounds", "runtime_s", "n_test",
    "target_metric", "rounds_to_target", "bytes_to_target", "samples_to_target", "own_split_metric",
    "consensus_generative_accuracy", "mean_peer_generative_accuracy",
)


def _csv_value(value: Any) -> str:
    # repr keeps a float's full precision; an empty cell, not "None", marks a missing value.
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _csv_text(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_value(record.get(k)) for k in columns})
    return buf.getvalue()


def _se(group: MethodRuns, final: MethodFinal) -> float | None:
    """The binomial standard error at the method's mean consensus accuracy (accuracy runs only)."""
    size, p = n_test(group), final.consensus.mean
    if size is None or p is None or not is_percent(group.runs[0][0]):
        return None
    return binomial_se(p, size)


def _target_fields(target: TargetResult | None) -> dict[str, Any]:
    if target is None:
        return {}
    rounds = target.rounds()
    return {
        "target_metric": spread(target.targets).mean, "target_reached_seeds": target.n_reached,
        "rounds_to_target": rounds.mean, "rounds_to_target_std": rounds.std,
        "bytes_to_target": target.bytes_sent().mean, "samples_to_target": target.samples_seen().mean,
    }


def _method_record(group: MethodRuns, final: MethodFinal, target: TargetResult | None) -> dict[str, Any]:
    summary = group.runs[0][0]
    record: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    record.update({key: getattr(summary, key) for key in SUMMARY_CSV_COLUMNS})
    record.update(
        name=group.name, higher_is_better=is_higher_better(summary),
        consensus_metric=final.consensus.mean, mean_peer_metric=final.mean_peer.mean,
        worst_peer_metric=final.worst_peer.mean,
        **{f"distance_{k}": v.mean for k, v in final.distances.items()},
        bytes_sent_total=_whole(final.bytes_sent_total.mean), samples_seen=_whole(final.samples_seen.mean),
        runtime_s=final.runtime_s.mean,
        n_seeds=len(group.runs), seeds=";".join("" if s is None else str(s) for s in group.seeds),
        consensus_metric_std=final.consensus.std, mean_peer_metric_std=final.mean_peer.std,
        worst_peer_metric_std=final.worst_peer.std, distance_product_std=final.distances["product"].std,
        distance_merged_std=final.distances["merged"].std, bytes_sent_total_std=final.bytes_sent_total.std,
        runtime_s_std=final.runtime_s.std, n_test=n_test(group), consensus_binomial_se=_se(group, final),
        own_split_metric=final.own_split.mean, own_split_metric_std=final.own_split.std,
        consensus_generative_accuracy=final.consensus_generative.mean,
        consensus_generative_accuracy_std=final.consensus_generative.std,
        mean_peer_generative_accuracy=final.mean_peer_generative.mean,
        mean_peer_generative_accuracy_std=final.mean_peer_generative.std,
        **_target_fields(target),
    )
    return record


def _whole(value: float | None) -> int | float | None:
    # Byte and sample counts equal over seeds stay whole numbers in the CSV, as before seeds existed.
    return int(value) if value is not None and float(value).is_integer() else value


def compare_csv(runs: Sequence[RunInput | MethodRuns]) -> str:
    """One row per method: means over its seeds (the value itself for one seed) and the stds."""
    groups = as_groups(runs)
    check_runs(groups)
    targets = target_results(groups) or [None] * len(groups)
    records = [_method_record(g, method_final(g), t) for g, t in zip(groups, targets)]
    return _csv_text(CSV_COLUMNS, records)


def compare_seeds_csv(runs: Sequence[RunInput | MethodRuns]) -> str:
    """One row per (method, seed): the per-seed numbers behind compare.csv's means."""
    groups = as_groups(runs)
    check_runs(groups)
    targets = target_results(groups) or [None] * len(groups)
    records = []
    for group, target in zip(groups, targets):
        for i, ((summary, rows), final) in enumerate(zip(group.runs, method_final(group).runs)):
            reached = target.reached[i] if target else None
            records.append({
                "name": group.name, "seed": group.seeds[i], "run_dir": group.run_dirs[i], "metric": metric_name(summary),
                "consensus_metric": final.consensus, "mean_peer_metric": final.mean_peer, "worst_peer_metric": final.worst_peer,
                "distance_product": final.distances["product"], "distance_merged": final.distances["merged"],
                "bytes_sent_total": final.bytes_sent_total, "samples_seen": final.samples_seen, "rounds": final.rounds,
                "runtime_s": final.runtime_s, "n_test": consensus_examples(last_with(rows, "consensus_test")),
                "target_metric": target.targets[i] if target else None,
                "rounds_to_target": reached.round if reached else None,
                "bytes_to_target": reached.bytes_sent_total if reached else None,
                "samples_to_target": reached.samples_seen if reached else None,
                "own_split_metric": final.own_split,
                "consensus_generative_accuracy": final.consensus_generative,
                "mean_peer_generative_accuracy": final.mean_peer_generative,
            })
    return _csv_text(SEED_CSV_COLUMNS, records)
