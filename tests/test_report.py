"""Run and comparison reports from synthetic metrics with known numbers (no model, no training)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: the tests must not need a display

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
from rich.console import Console
from rich.text import Text

from d2ora import report
from d2ora.report import (
    compare_table,
    results_table,
    write_compare_report,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["business", "sport", "tech"]
LABEL_COUNTS = [[10, 0, 5], [3, 7, 2], [0, 0, 9]]
BYTES_PER_ROUND = [1_000_000, 2_000_000, 1_500_000]  # per peer; totals over 3 rounds: 3, 6, 4.5 MB


# ---------------------------------------------------------------------------------------------
# Synthetic runs
# ---------------------------------------------------------------------------------------------


def _evals(values: list[float], metric: str) -> list[dict[str, float]]:
    return [{metric: v, "loss": 1.0 - v / 2} for v in values]


def _row(rnd: int, P: int, *, train: list[float | None], peers: list[float] | None, consensus: float | None,
         val: list[float] | None, dist: tuple[float | None, float, float] | None, per_round: list[int],
         total: int, metric: str = "accuracy", samples_per_round: int = 480) -> dict[str, Any]:
    return {
        "round": rnd, "samples_seen": rnd * samples_per_round, "wall_time_s": 1.0 + rnd,
        "train_loss": train,
        "peer_test": None if peers is None else _evals(peers, metric),
        "consensus_test": None if consensus is None else {metric: consensus, "loss": 0.5},
        "peer_val": None if val is None else _evals(val, metric),
        "consensus_distance": None if dist is None else dict(zip(("magnitude", "product", "merged"), dist)),
        "bytes_sent": per_round, "bytes_sent_total": total,
    }


def _summary(name: str, rows: list[dict[str, Any]], P: int, **extra: Any) -> dict[str, Any]:
    summary = {
        "name": name, "mixer": name, "method": "dora", "r": 8, "model": "minilm", "task": "classification",
        "metric": "accuracy", "higher_is_better": True, "peers": P,
        "topology": f"ring({P}): {P} peers, {P} edges, degree 2, spectral gap 0.1953",
        "partition": "dirichlet(alpha=0.5)", "rounds": len(rows) - 1, "local_steps": 10, "batch_size": 16,
        "label_names": None, "label_counts": None, "final": rows[-1], "runtime_s": 123.4,
        "adapters": [f"adapters/peer-{p}" for p in range(P)],
        "consensus_adapter": "consensus/adapter", "merged_model": None,
    }
    summary.update(extra)
    return summary


def run_p3(name: str = "decaf", final_consensus: float = 0.875) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Three peers, accuracy, every round evaluated; the last round's numbers are known exactly."""
    P, total = 3, sum(BYTES_PER_ROUND)
    rows = [
        _row(0, P, train=[None] * P, peers=[0.3, 0.35, 0.4], consensus=0.33, val=[0.3, 0.3, 0.3],
             dist=(0.0, 0.0, 0.0), per_round=[0] * P, total=0),
        _row(1, P, train=[1.0, 0.9, 0.8], peers=[0.5, 0.6, 0.55], consensus=0.6, val=[0.5, 0.5, 0.5],
             dist=(1e-2, 5e-3, 1e-3), per_round=BYTES_PER_ROUND, total=total),
        _row(2, P, train=[0.7, 0.6, 0.5], peers=[0.7, 0.75, 0.8], consensus=0.8, val=[0.6, 0.6, 0.6],
             dist=(5e-3, 1e-3, 5e-4), per_round=BYTES_PER_ROUND, total=2 * total),
        _row(3, P, train=[0.5, 0.25, 0.125], peers=[0.8, 0.9, 0.85], consensus=final_consensus,
             val=[0.7, 0.75, 0.8], dist=(1.234e-3, 4.567e-4, 9.876e-5), per_round=BYTES_PER_ROUND,
             total=3 * total),
    ]
    return _summary(name, rows, P, label_names=LABELS, label_counts=LABEL_COUNTS), rows


def run_p1(name: str = "centralized") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One peer: its own consensus, so every distance is exactly 0."""
    rows = [
        _row(r, 1, train=[None] if r == 0 else [1.0 / (r + 1)], peers=[0.4 + 0.1 * r], consensus=0.4 + 0.1 * r,
             val=[0.4], dist=(0.0, 0.0, 0.0), per_round=[0] * 1, total=0, samples_per_round=160)
        for r in range(4)
    ]
    return _summary(name, rows, 1, topology="single peer"), rows


def run_perplexity(name: str = "lm", final_ppl: float = 12.3456) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Two peers, perplexity, LoRA (no magnitude distance), evaluated every second round only."""
    P, m = 2, "perplexity"
    rows = []
    for r in range(5):
        evaluated = r % 2 == 0
        ppl = final_ppl if r == 4 else 40.0 - 5 * r
        rows.append(_row(
            r, P, train=[None, None] if r == 0 else [3.0 - 0.1 * r, 3.1 - 0.1 * r],
            peers=[ppl + 1.0, ppl + 3.0] if evaluated else None, consensus=ppl if evaluated else None,
            val=[ppl + 2.0, ppl + 2.5] if evaluated else None,
            dist=(None, 1e-3 / (r + 1), 1e-4 / (r + 1)) if evaluated else None,
            per_round=[0, 0] if r == 0 else [500, 700], total=1200 * r, metric=m,
        ))
    return _summary(name, rows, P, method="lora", model="smollm2", task="causal_lm", metric=m,
                    higher_is_better=False), rows


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def md_row(text: str, first_cell: str) -> list[str]:
    """The cells of the (first) Markdown table row whose first cell is ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    assert image.shape[0] > 100 and image.shape[1] > 100, image.shape


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (``.name.XXXX.tmp``) that were not renamed or removed."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def cell_text(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def is_bold(cell: Any) -> bool:
    return isinstance(cell, Text) and "bold" in str(cell.style).split()


def column(table: Any, index: int) -> list[Any]:
    return list(table.columns[index].cells)


@pytest.fixture(scope="module")
def p3_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("p3")
    summary, rows = run_p3()
    path = write_run_report(out, summary, rows)
    return path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Run report
# ---------------------------------------------------------------------------------------------


def test_run_report_setup_and_results_rows(p3_report):
    path, text = p3_report
    assert path == path.parent / "report.md" and path.is_file()
    assert text.startswith("# Run report: decaf\n")
    for line in ("- model: minilm", "- method: dora, r = 8", "- peers: 3", "- partition: dirichlet(alpha=0.5)",
                 "- topology: ring(3): 3 peers, 3 edges, degree 2, spectral gap 0.1953",
                 "- rounds: 3 x 10 local steps", "- batch size: 16", "- metric: accuracy (higher is better)"):
        assert line in text.splitlines(), line
    # round, samples, mean loss, consensus, peer mean/min/max, distances m/B·A/W', cumulative MB
    assert md_row(text, "3") == ["3", "1,440", "0.2917", "87.5", "85.0", "80.0", "90.0",
                                 "1.23e-03", "4.57e-04", "9.88e-05", "13.50"]
    assert md_row(text, "0") == ["0", "0", "-", "33.0", "35.0", "30.0", "40.0",
                                 "0.00e+00", "0.00e+00", "0.00e+00", "0.00"]


def test_run_report_label_counts_and_final_peers(p3_report):
    _, text = p3_report
    header = md_row(text, "peer")  # the label-count table comes first
    assert header == ["peer", "business", "sport", "tech", "total"]
    assert md_row(text, "peer 0") == ["peer 0", "10", "0", "5", "15"]
    assert md_row(text, "peer 2") == ["peer 2", "0", "0", "9", "9"]
    final_section = text.split("## Final per-peer results", 1)[1]
    # peer, train loss, test accuracy, val accuracy, MB sent over the run
    assert md_row(final_section, "peer 0") == ["peer 0", "0.5000", "80.0", "70.0", "3.00"]
    assert md_row(final_section, "peer 1") == ["peer 1", "0.2500", "90.0", "75.0", "6.00"]
    assert md_row(final_section, "peer 2") == ["peer 2", "0.1250", "85.0", "80.0", "4.50"]


def test_run_report_plots_and_links(p3_report):
    path, text = p3_report
    for name in report.RUN_PLOTS:
        assert_png(path.parent / "plots" / name)
        assert f"](plots/{name})" in text
    assert "[adapters/peer-0](adapters/peer-0)" in text
    assert "[consensus/adapter](consensus/adapter)" in text
    assert "merged model" not in text  # merged_model is None: no dead link
    assert plt.get_fignums() == []  # no figure left registered (open) anywhere


def test_results_table_lists_evaluated_rounds_only():
    summary, rows = run_perplexity()
    table = results_table(summary, rows)
    assert [cell_text(c) for c in column(table, 0)] == ["0", "2", "4"]
    assert cell_text(column(table, 3)[-1]) == "12.35"  # perplexity: 2 decimals, no percent
    assert cell_text(column(table, 7)[-1]) == "-"  # LoRA: no magnitude distance
    assert cell_text(column(table, 8)[-1]) == "2.00e-04"


def test_perplexity_report_with_skipped_evaluations(tmp_path):
    summary, rows = run_perplexity()
    text = write_run_report(tmp_path, summary, rows).read_text(encoding="utf-8")
    assert "- metric: perplexity (lower is better)" in text
    assert md_row(text, "4")[3:7] == ["12.35", "14.35", "13.35", "15.35"]
    with pytest.raises(AssertionError):
        md_row(text, "3")  # not evaluated: not a results row
    final_section = text.split("## Final per-peer results", 1)[1]
    assert md_row(final_section, "peer 1") == ["peer 1", "2.7000", "15.35", "14.85", "0.00"]
    for name in report.RUN_PLOTS:
        assert_png(tmp_path / "plots" / name)


def test_single_peer_zero_distances_plot(tmp_path):
    summary, rows = run_p1()
    with warnings.catch_warnings():
        # Zeros on a log axis make matplotlib warn ("no positive values"): they must be skipped.
        warnings.simplefilter("error")
        text = write_run_report(tmp_path, summary, rows).read_text(encoding="utf-8")
    assert md_row(text, "3")[7:10] == ["0.00e+00"] * 3
    assert_png(tmp_path / "plots" / "consensus.png")


def test_many_peers_compact_legend(tmp_path, monkeypatch):
    P = 64
    rows = [_row(r, P, train=[None] * P if r == 0 else [1.0 - 0.01 * p for p in range(P)],
                 peers=[0.5 + r * 0.1] * P, consensus=0.5 + r * 0.1, val=None, dist=(1e-3, 1e-3, 1e-3),
                 per_round=[10] * P, total=640 * r) for r in range(3)]
    labels: dict[str, list[str]] = {}

    def spy(fig, path):
        legend = fig.axes[0].get_legend()
        labels[path.name] = [t.get_text() for t in legend.get_texts()] if legend else []
        return path  # the legend is all this test reads: skip the (slow) rendering

    monkeypatch.setattr(report.plots, "_save", spy)  # the plots module renders and saves
    text = write_run_report(tmp_path, _summary("big", rows, P), rows).read_text(encoding="utf-8")
    assert labels["metric.png"] == ["peers (64)", "mean of peers", "consensus model"]
    assert labels["train_loss.png"] == ["peers (64)", "mean of peers"]
    assert "peer adapters (64): [adapters/peer-0]" in text and "adapters/peer-5)" not in text


def test_rewrite_replaces_report_atomically(tmp_path, monkeypatch):
    summary, rows = run_p3()
    path = write_run_report(tmp_path, summary, rows)
    old_text, old_inode = path.read_text(encoding="utf-8"), path.stat().st_ino
    plot_inode = (tmp_path / "plots" / "metric.png").stat().st_ino

    new_summary, new_rows = run_p3(name="decaf-v2", final_consensus=0.5)
    assert write_run_report(tmp_path, new_summary, new_rows) == path
    new_text = path.read_text(encoding="utf-8")
    assert new_text.startswith("# Run report: decaf-v2\n") and md_row(new_text, "3")[3] == "50.0"
    # A new file renamed over the old one, not the old one rewritten in place.
    assert path.stat().st_ino != old_inode
    assert (tmp_path / "plots" / "metric.png").stat().st_ino != plot_inode
    assert leftovers(tmp_path) == []

    # A write that fails half-way leaves the previous report whole and no temporary files.
    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        write_run_report(tmp_path, *run_p3(name="never-written"))
    assert path.read_text(encoding="utf-8") == new_text != old_text
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def accuracy_runs() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    return [run_p3("decaf", 0.875), run_p3("dsgd", 0.9), run_p1("centralized")]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    (out / "dsgd").mkdir()
    (out / "dsgd" / "report.md").write_text("# dsgd\n", encoding="utf-8")  # stands in for a run report
    assert write_compare_report(out, accuracy_runs()) == out / "compare.md"
    return out


def test_compare_table_bolds_max_accuracy():
    table = compare_table(accuracy_runs())
    names = [cell_text(c) for c in column(table, 0)]
    consensus = column(table, 1)
    assert names == ["decaf", "dsgd", "centralized"]
    assert [cell_text(c) for c in consensus] == ["87.5", "90.0", "70.0"]
    assert [is_bold(c) for c in consensus] == [False, True, False]
    # It renders (rich accepts every cell) and shows the numbers.
    console = Console(record=True, width=200)
    console.print(table)
    assert "90.0" in console.export_text()


def test_compare_table_bolds_min_perplexity():
    table = compare_table([run_perplexity("lm-a", 12.3456), run_perplexity("lm-b", 9.5), run_perplexity("lm-c", 20.0)])
    assert [is_bold(c) for c in column(table, 1)] == [False, True, False]
    assert cell_text(column(table, 1)[1]) == "9.50"
    assert [cell_text(c) for c in column(table, 3)] == ["15.35", "12.50", "23.00"]  # worst peer: the highest


def test_compare_rejects_mixed_metrics(tmp_path):
    with pytest.raises(ValueError, match="different metrics"):
        compare_table([run_p3(), run_perplexity()])
    with pytest.raises(ValueError, match="no runs"):
        write_compare_report(tmp_path, [])


def test_compare_report_files(compare_dir):
    text = (compare_dir / "compare.md").read_text(encoding="utf-8")
    # Only dsgd has a run report under compare_dir/<name>/: only that one is linked.
    assert "[dsgd/report.md](dsgd/report.md)" in text and "decaf/report.md" not in text
    for line in ("- model: minilm", "- method: dora", "- batch_size: 16", "- metric: accuracy"):
        assert line in text.splitlines(), line
    assert "- peers: 3" not in text  # peers differ (3, 3, 1): listed per run, not as common
    assert md_row(text, "centralized")[:3] == ["centralized", "centralized", "1"]  # run, mixer, peers
    assert md_row(text.split("## Final results", 1)[1], "dsgd")[:2] == ["dsgd", "**90.0**"]
    assert md_row(text.split("## Final results", 1)[1], "decaf")[:2] == ["decaf", "87.5"]
    assert "[compare.csv](compare.csv)" in text
    for name in report.COMPARE_PLOTS:
        assert_png(compare_dir / "plots" / name)
        assert f"](plots/{name})" in text
    assert leftovers(compare_dir) == []


def test_compare_csv_values(compare_dir):
    with open(compare_dir / "compare.csv", newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    assert [r["name"] for r in records] == ["decaf", "dsgd", "centralized"]
    decaf, _, central = records
    assert float(decaf["consensus_metric"]) == 0.875
    assert float(decaf["mean_peer_metric"]) == pytest.approx(0.85)
    assert float(decaf["worst_peer_metric"]) == 0.8
    assert float(decaf["distance_product"]) == 4.567e-4 and float(decaf["distance_merged"]) == 9.876e-5
    assert int(decaf["bytes_sent_total"]) == 3 * sum(BYTES_PER_ROUND)
    assert int(decaf["samples_seen"]) == 1440 and float(decaf["runtime_s"]) == 123.4
    assert int(central["peers"]) == 1 and float(central["distance_product"]) == 0.0
    assert float(central["consensus_metric"]) == pytest.approx(0.7)


def test_compare_csv_missing_values_are_empty(tmp_path):
    write_compare_report(tmp_path, [run_perplexity("lm-a"), run_perplexity("lm-b", 9.5)])
    with open(tmp_path / "compare.csv", newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    assert [r["distance_magnitude"] for r in records] == ["", ""]  # LoRA: no magnitude
    assert [float(r["consensus_metric"]) for r in records] == [12.3456, 9.5]
    assert [r["higher_is_better"] for r in records] == ["False", "False"]
    assert_png(tmp_path / "plots" / "compare_consensus.png")


def test_an_organisations_report_says_who_was_missing_when(tmp_path):
    summary, rows = run_p3()
    link = {**summary, "transport": "grpc-mtls", "peer": 1, "neighbours": [0, 2], "round_timeout_s": 5.0,
            "absent": [{"peer": 2, "round": r, "slot": 0, "reason": "no message within 5 s"} for r in (2, 3, 4, 7)],
            "departed": [{"peer": 2, "last_heard_round": 6, "absent_from_round": 7}],
            "returned": [{"peer": 2, "absent_from_round": 2, "absent_to_round": 4, "back_in_round": 5}],
            "rejoined": {"resumed_from_round": 1, "rejoined_round": 3, "missed_rounds": [2], "mixed_from": [0, 2]}}
    text = write_run_report(tmp_path, link, rows).read_text(encoding="utf-8")
    section = text.split("## This organisation's peer", 1)[1].split("##", 1)[0]
    assert "Peer 1 of the run, over gRPC links (mutual TLS) with its neighbours [0, 2]" in section
    assert "- neighbour 2 was absent (missed the 5 s deadline) in round(s) 2-4, 7" in section
    assert "- neighbour 2 left after round 6 and did not come back" in section
    assert "- neighbour 2 came back in round 5" in section
    assert "rejoined in round 3 with its neighbours' mix (missed round(s) 2: no metrics rows for them)" in section
    quiet = write_run_report(tmp_path / "quiet", {**summary, "transport": "grpc-mtls", "peer": 0, "neighbours": [1],
                                                  "absent": [], "departed": [], "returned": []}, rows)
    assert "- every neighbour's message arrived in every round" in quiet.read_text(encoding="utf-8")
    assert "## This organisation's peer" not in write_run_report(tmp_path / "plain", summary, rows).read_text(encoding="utf-8")
