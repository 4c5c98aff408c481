"""The Markdown of a report: ``report.md`` for one run, ``compare.md`` for several (the CSVs beside
it come from :mod:`d2ora.report.csv_files`).

These functions build the text only, from typed summaries
(:class:`~d2ora.report.model.RunSummary`) and metric rows; :mod:`d2ora.report.writers` writes it
(atomically, after the plots it links to).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ora.engine.memory import describe_kind
from d2ora.report.formatting import DASH, fmt_float, fmt_mb, fmt_metric
from d2ora.report.groups import MethodRuns, as_groups
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
from d2ora.report.model import RunSummary
from d2ora.report.rows import (
    Row,
    RunInput,
    entry_metric,
    is_higher_better,
    item_at,
    last_with,
    metric_label,
    metric_name,
    peer_count,
)
from d2ora.report.stats import TARGET_GAP_POINTS
from d2ora.report.tables import (
    compare_records,
    results_headers,
    results_records,
    spread_note,
    standard_error_note,
    target_note,
    target_records,
)

# Setup keys shown as lines in the compare report when every run shares them: RunSummary fields,
# named in the report as in summary.json.
SETUP_KEYS = (
    "model", "task", "method", "r", "mixer", "peers", "topology", "partition",
    "rounds", "local_steps", "batch_size", "metric",
)


def _setup_value(summary: RunSummary, key: str) -> Any:
    return _shown(getattr(summary, key))


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


def _shown(value: Any) -> Any:
    # A key the summary does not have (an older summary.json, a hand-built one) shows as a dash.
    return DASH if value is None else value


def _setup_lines(summary: RunSummary) -> list[str]:
    order = "higher" if is_higher_better(summary) else "lower"
    s = summary
    lines = [
        f"- model: {_shown(s.model)}",
        f"- task: {_shown(s.task)}",
        f"- method: {_shown(s.method)}, r = {_shown(s.r)}",
        f"- mixer: {_shown(s.mixer)}",
        f"- peers: {_shown(s.peers)}",
        f"- topology: {_shown(s.topology)}",
        f"- partition: {_shown(s.partition)}",
        f"- rounds: {_shown(s.rounds)} x {_shown(s.local_steps)} local steps",
        f"- batch size: {_shown(s.batch_size)}",
        f"- metric: {metric_name(s)} ({order} is better)",
    ]
    if s.runtime_s is not None:
        lines.append(f"- runtime: {s.runtime_s:.1f} s")
    if s.peak_memory_mb:
        per_process = ", ".join(f"{mb:,.0f}" for mb in s.peak_memory_mb)
        kind = describe_kind(s.peak_memory_kind) if s.peak_memory_kind else "peak"
        lines.append(f"- peak memory per process: {per_process} MB ({kind})")
    return lines


def _label_count_section(summary: RunSummary) -> list[str]:
    counts = summary.label_counts
    if not counts:
        return []
    names = summary.label_names or [f"label {c}" for c in range(len(counts[0]))]
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


def _final_peer_section(summary: RunSummary, rows: Sequence[Row]) -> list[str]:
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


def _samples_section(summary: RunSummary) -> list[str]:
    """sft runs: a few test prompts with the reference and each model's greedy answer."""
    if not summary.samples:
        return []
    lines = ["## Generated answers", "",
             "Greedy answers to the first test prompts (the prompt's last line shown); a dash: not generated.", ""]
    body = []
    for s in summary.samples:
        last_line = next((ln for ln in reversed(s.prompt.strip().splitlines()) if ln.strip()), "")
        # A whole article in a cell would bury the table: the question is the prompt's end.
        shown = last_line if len(last_line) <= 120 else last_line[:117] + "..."
        body.append([shown, s.reference, _shown(s.base), _shown(s.consensus), _shown(s.peer0)])
    lines.append(_md_table(["prompt", "reference", "base", "consensus", "peer 0"], body, numeric_from=5))
    return lines


def _rounds_text(rounds: Sequence[int]) -> str:
    """``[3, 4, 5, 8]`` -> ``"3-5, 8"``."""
    spans: list[list[int]] = []
    for r in sorted(set(rounds)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _organisation_section(summary: RunSummary) -> list[str]:
    """``d2ora peer --roster`` runs: whose report this is, and who was missing when."""
    extra = summary.model_extra or {}
    if extra.get("transport") != "grpc-mtls":
        return []
    peer = extra.get("peer")
    lines = ["## This organisation's peer", "",
             (f"Peer {peer} of the run, over gRPC links (mutual TLS) with its neighbours {extra.get('neighbours')}. "
              "\"Consensus\" in this report is this peer's own adapter after each round's mix (its estimate of the "
              "consensus); no process holds every adapter."), ""]
    absent: dict[int, list[int]] = {}
    for a in extra.get("absent") or []:
        absent.setdefault(int(a["peer"]), []).append(int(a["round"]))
    for neighbour, rounds in sorted(absent.items()):
        lines.append(f"- neighbour {neighbour} was absent (missed the {extra.get('round_timeout_s'):g} s deadline) "
                     f"in round(s) {_rounds_text(rounds)}")
    for gone in extra.get("departed") or []:
        lines.append(f"- neighbour {gone['peer']} left after round {gone['last_heard_round']} and did not come back")
    for back in extra.get("returned") or []:
        lines.append(f"- neighbour {back['peer']} came back in round {back['back_in_round']}")
    rejoined = extra.get("rejoined")
    if rejoined:
        missed = rejoined.get("missed_rounds") or []
        lines.append(f"- this peer stopped, restarted from its round-{rejoined['resumed_from_round']} checkpoint and "
                     f"rejoined in round {rejoined['rejoined_round']} with its neighbours' mix"
                     + (f" (missed round(s) {_rounds_text(missed)}: no metrics rows for them)" if missed else ""))
    if len(lines) == 4:  # the heading and the paragraph only
        lines.append("- every neighbour's message arrived in every round")
    return [*lines, ""]


def _link_list(paths: Sequence[str], what: str) -> list[str]:
    if not paths:
        return []
    if len(paths) <= LEGEND_MAX:
        return [f"- {what}: " + ", ".join(f"[{p}]({p})" for p in paths)]
    # Sixty-four adapter links would bury the rest of the list: show the ends and the count.
    return [f"- {what} ({len(paths)}): [{paths[0]}]({paths[0]}) ... [{paths[-1]}]({paths[-1]})"]


def _files_section(out_dir: Path, summary: RunSummary) -> list[str]:
    lines = [f"- {name}: [{name}]({name})" for name in ("summary.json", "metrics.jsonl")
             if (out_dir / name).exists()]
    lines += _link_list([str(p) for p in summary.adapters or []], "peer adapters")
    for path, what in ((summary.consensus_adapter, "consensus adapter"), (summary.merged_model, "merged model")):
        if path:
            lines.append(f"- {what}: [{path}]({path})")
    return ["## Files", "", *lines, ""] if lines else []


def _plots_section(names: Sequence[str], titles: Sequence[str]) -> list[str]:
    # A blank line between images: adjacent ones would share a paragraph and sit side by side.
    lines = [line for n, t in zip(names, titles) for line in (f"![{t}]({PLOTS_DIR}/{n})", "")]
    return ["## Plots", "", *lines]


def run_markdown(out_dir: Path, summary: RunSummary, rows: Sequence[Row]) -> str:
    name = summary.name
    records = results_records(summary, rows)
    results = _md_table(results_headers(summary), records) if records else "No evaluated rounds.\n"
    parts = [
        f"# Run report: {name}", "", *_setup_lines(summary), "",
        *_organisation_section(summary),
        *_label_count_section(summary),
        "## Results per evaluated round", "",
        "Distances are consensus distances (scientific notation); MB are 10^6 bytes.", "",
        results,
        *_final_peer_section(summary, rows),
        *_samples_section(summary),
        *_plots_section(RUN_PLOTS, ("metric vs samples seen", "consensus distance", "train loss")),
        *_files_section(out_dir, summary),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"


def _compare_setup(groups: Sequence[MethodRuns]) -> tuple[list[str], list[str]]:
    """Setup lines every run shares, and the keys whose values differ between runs."""
    summaries = [s for g in groups for s, _ in g.runs]
    common, differing = [], []
    for key in SETUP_KEYS:
        values = {str(_setup_value(s, key)) for s in summaries}
        (common if len(values) == 1 else differing).append(key)
    lines = [f"- {key}: {_setup_value(summaries[0], key)}" for key in common]
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


def compare_markdown(out_dir: Path, runs: Sequence[RunInput | MethodRuns]) -> str:
    groups = as_groups(runs)
    headers, records, best = compare_records(groups)
    for i in best:
        records[i][1] = f"**{records[i][1]}**"
    common, differing = _compare_setup(groups)
    parts = ["# Comparison of runs", "", "Common setup:", "", *common, ""]
    if differing:
        body = [[g.name, *(_setup_value(g.runs[0][0], k) for k in differing)] for g in groups]
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
