"""The text files of a report: ``report.md`` for one run; ``compare.md``, ``compare.csv`` (one row per
method, means and stds over seeds) and ``compare_seeds.csv`` (one row per method and seed) for several.

These functions build the text only; :mod:`d2ora.report.writers` writes it (atomically, after the
plots it links to).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ora.report.formatting import DASH, fmt_float, fmt_mb, fmt_metric
from d2ora.report.groups import (
    MethodRuns,
    TargetResult,
    as_groups,
    n_test,
    target_results,
)
from d2ora.report.layout import (
    COMPARE_CSV_NAME,
    COMPARE_PLOT_TITLES,
    COMPARE_PLOTS,
    COMPARE_SEEDS_CSV_NAME,
    LEGEND_MAX,
    PLOTS_DIR,
    REPORT_NAME,
    RUN_PLOTS,
)
from d2ora.report.rows import (
    Row,
    Run,
    Summary,
    consensus_examples,
    entry_metric,
    is_higher_better,
    is_percent,
    item_at,
    last_with,
    metric_label,
    metric_name,
    peer_count,
)
from d2ora.report.stats import TARGET_GAP_POINTS, binomial_se, spread
from d2ora.report.tables import (
    MethodFinal,
    check_runs,
    compare_records,
    method_final,
    results_headers,
    results_records,
    spread_note,
    standard_error_note,
    target_note,
    target_records,
)

# Setup keys shown as lines in the compare report when every run shares them.
SETUP_KEYS = (
    "model", "task", "method", "r", "mixer", "peers", "topology", "partition",
    "rounds", "local_steps", "batch_size", "metric",
)


def _md_cell(value: Any) -> str:
    # A "|" would end the cell and a newline the row: escape the one, flatten the other.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A GitHub-flavoured Markdown table; columns from ``numeric_from`` on are right-aligned.

    Hand-written on purpose: the standard library has no Markdown table writer, and pulling in
    pandas + tabulate (``DataFrame.to_markdown``) for a few pipes and dashes is overkill.
    """
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines) + "\n"


def _setup_lines(summary: Summary) -> list[str]:
    order = "higher" if is_higher_better(summary) else "lower"
    lines = [
        f"- model: {summary.get('model', DASH)}",
        f"- task: {summary.get('task', DASH)}",
        f"- method: {summary.get('method', DASH)}, r = {summary.get('r', DASH)}",
        f"- mixer: {summary.get('mixer', DASH)}",
        f"- peers: {summary.get('peers', DASH)}",
        f"- topology: {summary.get('topology', DASH)}",
        f"- partition: {summary.get('partition', DASH)}",
        f"- rounds: {summary.get('rounds', DASH)} x {summary.get('local_steps', DASH)} local steps",
        f"- batch size: {summary.get('batch_size', DASH)}",
        f"- metric: {metric_name(summary)} ({order} is better)",
    ]
    if summary.get("runtime_s") is not None:
        lines.append(f"- runtime: {float(summary['runtime_s']):.1f} s")
    return lines


def _label_count_section(summary: Summary) -> list[str]:
    counts = summary.get("label_counts")
    if not counts:
        return []
    names = summary.get("label_names") or [f"label {c}" for c in range(len(counts[0]))]
    headers = ["peer", *map(str, names), "total"]
    body = [[f"peer {p}", *map(str, row), str(sum(row))] for p, row in enumerate(counts)]
    return ["## Label counts per peer", "", _md_table(headers, body)]


def _peer_bytes_totals(rows: Sequence[Row], n_peers: int) -> list[int]:
    """Bytes each peer sent over the whole run (``bytes_sent`` is per round)."""
    totals = [0] * n_peers
    for row in rows:
        for p, n in enumerate(row.get("bytes_sent") or []):
            totals[p] += int(n or 0)
    return totals


def _final_peer_section(summary: Summary, rows: Sequence[Row]) -> list[str]:
    if not rows:
        return []
    metric, label = metric_name(summary), metric_label(summary)
    last, test_row, val_row = rows[-1], last_with(rows, "peer_test"), last_with(rows, "peer_val")
    n_peers = peer_count(summary, rows)
    totals = _peer_bytes_totals(rows, n_peers)
    body = []
    for p in range(n_peers):
        loss = item_at(last.get("train_loss"), p)
        test = entry_metric(item_at(test_row.get("peer_test"), p), metric) if test_row else None
        val = entry_metric(item_at(val_row.get("peer_val"), p), metric) if val_row else None
        body.append([
            f"peer {p}", fmt_float(None if loss is None else float(loss), 4),
            fmt_metric(summary, test), fmt_metric(summary, val), fmt_mb(totals[p]),
        ])
    headers = ["peer", "train loss", f"test {label}", f"val {label}", "MB sent (total)"]
    return [f"## Final per-peer results ({_rounds_note(last, test_row, val_row)})", "", _md_table(headers, body)]


def _rounds_note(last: Row, test_row: Row | None, val_row: Row | None) -> str:
    """Which round each column comes from: evaluation may have skipped the last rounds."""
    sources = [(w, r.get("round")) for w, r in (("train loss", last), ("test", test_row), ("val", val_row)) if r]
    if len({rnd for _, rnd in sources}) == 1:
        return f"round {sources[0][1]}"
    return ", ".join(f"{what} from round {rnd}" for what, rnd in sources)


def _link_list(paths: Sequence[str], what: str) -> list[str]:
    if not paths:
        return []
    if len(paths) <= LEGEND_MAX:
        return [f"- {what}: " + ", ".join(f"[{p}]({p})" for p in paths)]
    # Sixty-four adapter links would bury the rest of the list: show the ends and the count.
    return [f"- {what} ({len(paths)}): [{paths[0]}]({paths[0]}) ... [{paths[-1]}]({paths[-1]})"]


def _files_section(out_dir: Path, summary: Summary) -> list[str]:
    lines = [f"- {name}: [{name}]({name})" for name in ("summary.json", "metrics.jsonl")
             if (out_dir / name).exists()]
    lines += _link_list([str(p) for p in summary.get("adapters") or []], "peer adapters")
    for key, what in (("consensus_adapter", "consensus adapter"), ("merged_model", "merged model")):
        if summary.get(key):
            lines.append(f"- {what}: [{summary[key]}]({summary[key]})")
    return ["## Files", "", *lines, ""] if lines else []


def _plots_section(names: Sequence[str], titles: Sequence[str]) -> list[str]:
    # A blank line between images: adjacent ones would share a paragraph and sit side by side.
    lines = [line for n, t in zip(names, titles) for line in (f"![{t}]({PLOTS_DIR}/{n})", "")]
    return ["## Plots", "", *lines]


def run_markdown(out_dir: Path, summary: Summary, rows: Sequence[Row]) -> str:
    name = summary.get("name", "run")
    records = results_records(summary, rows)
    results = _md_table(results_headers(summary), records) if records else "No evaluated rounds.\n"
    parts = [
        f"# Run report: {name}", "", *_setup_lines(summary), "",
        *_label_count_section(summary),
        "## Results per evaluated round", "",
        "Distances are consensus distances (scientific notation); MB are 10^6 bytes.", "",
        results,
        *_final_peer_section(summary, rows),
        *_plots_section(RUN_PLOTS, ("metric vs samples seen", "consensus distance", "train loss")),
        *_files_section(out_dir, summary),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"


def _compare_setup(groups: Sequence[MethodRuns]) -> tuple[list[str], list[str]]:
    """Setup lines every run shares, and the keys whose values differ between runs."""
    summaries = [s for g in groups for s, _ in g.runs]
    common, differing = [], []
    for key in SETUP_KEYS:
        values = {str(s.get(key, DASH)) for s in summaries}
        (common if len(values) == 1 else differing).append(key)
    lines = [f"- {key}: {summaries[0].get(key, DASH)}" for key in common]
    seeds = {g.seeds for g in groups}
    if len(seeds) == 1 and None not in (known := next(iter(seeds))):
        lines.append(f"- seeds: {', '.join(map(str, known))}")
    return lines, differing


def _notes(runs: Sequence[MethodRuns]) -> list[str]:
    notes = [n for n in (spread_note(runs), standard_error_note(runs)) if n]
    return [*(f"- {n}" for n in notes), ""] if notes else []


def _target_section(runs: Sequence[MethodRuns]) -> list[str]:
    table = target_records(runs)
    parts = [f"## Rounds to within {TARGET_GAP_POINTS:g} points of centralized", "", target_note(runs), ""]
    if table is not None:
        parts.append(_md_table(*table))
    return parts


def compare_markdown(out_dir: Path, runs: Sequence[Run | MethodRuns]) -> str:
    groups = as_groups(runs)
    headers, records, best = compare_records(groups)
    for i in best:
        records[i][1] = f"**{records[i][1]}**"
    common, differing = _compare_setup(groups)
    parts = ["# Comparison of runs", "", "Common setup:", "", *common, ""]
    if differing:
        body = [[g.name, *(g.runs[0][0].get(k, DASH) for k in differing)] for g in groups]
        parts += ["Differences:", "", _md_table(["run", *differing], body, numeric_from=len(differing) + 1)]
    first = groups[0].runs[0][0]
    order = "higher" if is_higher_better(first) else "lower"
    parts += [
        "## Final results", "",
        f"Best consensus {metric_name(first)} in bold ({order} is better).", "",
        *_notes(groups),
        _md_table(headers, records),
        *_target_section(groups),
        *_plots_section(COMPARE_PLOTS, COMPARE_PLOT_TITLES),
        "## Files", "", f"- all numbers, full precision: [{COMPARE_CSV_NAME}]({COMPARE_CSV_NAME})",
        f"- per seed: [{COMPARE_SEEDS_CSV_NAME}]({COMPARE_SEEDS_CSV_NAME})",
        *_run_report_links(out_dir, groups),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"


def _run_report_links(out_dir: Path, groups: Sequence[MethodRuns]) -> list[str]:
    """Links to each run's own report where it exists (``<method>/`` or ``<method>/seed-<s>/``, as
    ``d2ora compare`` puts them)."""
    links = []
    for group in groups:
        found = [d for d in group.run_dirs if d and (out_dir / d / REPORT_NAME).is_file()]
        if found:
            links.append(f"- {group.name}: " + ", ".join(f"[{d}/{REPORT_NAME}]({d}/{REPORT_NAME})" for d in found))
    return links


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
)

#: compare_seeds.csv: one row per (method, seed), the numbers the means and stds come from.
SEED_CSV_COLUMNS = (
    "name", "seed", "run_dir", "metric", "consensus_metric", "mean_peer_metric", "worst_peer_metric",
    "distance_product", "distance_merged", "bytes_sent_total", "samples_seen", "rounds", "runtime_s", "n_test",
    "target_metric", "rounds_to_target", "bytes_to_target", "samples_to_target", "own_split_metric",
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
    record: dict[str, Any] = {key: summary.get(key) for key in CSV_COLUMNS}
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
        **_target_fields(target),
    )
    return record


def _whole(value: float | None) -> int | float | None:
    # Byte and sample counts equal over seeds stay whole numbers in the CSV, as before seeds existed.
    return int(value) if value is not None and float(value).is_integer() else value


def compare_csv(runs: Sequence[Run | MethodRuns]) -> str:
    """One row per method: means over its seeds (the value itself for one seed) and the stds."""
    groups = as_groups(runs)
    check_runs(groups)
    targets = target_results(groups) or [None] * len(groups)
    records = [_method_record(g, method_final(g), t) for g, t in zip(groups, targets)]
    return _csv_text(CSV_COLUMNS, records)


def compare_seeds_csv(runs: Sequence[Run | MethodRuns]) -> str:
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
            })
    return _csv_text(SEED_CSV_COLUMNS, records)
