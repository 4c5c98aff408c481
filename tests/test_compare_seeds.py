"""``d2ora compare --seeds``: mean ± sample std over seeds, the binomial standard error of a test
accuracy, rounds to within 2 points of centralized, skipping finished runs, and bad --seeds input.

Every number is checked against an independent reference: ``statistics.mean`` / ``statistics.stdev``
over the per-seed values, the rounds to target read off the metric rows by hand, the standard error
from its formula. Most tests use hand-made rows (no model); one end-to-end test runs MiniLM.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from d2ora import atomic
from d2ora.cli import app
from d2ora.config_io import to_yaml
from d2ora.engine.metrics_log import read_rows
from d2ora.recipes import compare as compare_module
from d2ora.recipes.compare import (
    compare,
    method_config,
    parse_seeds,
    previous_run,
    run_dir,
)
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.report import COMPARE_PLOTS, MethodRuns, write_compare_report
from d2ora.report.groups import target_results
from d2ora.report.stats import (
    TARGET_GAP_POINTS,
    binomial_se,
    first_reaching,
    mean_curve,
    spread,
)
from tests.conftest import simulate_config

# The tiny setup of tests/test_simulate.py (copied: each test file stands alone).
TINY = {
    "peers": 4, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
}
N_TEST = 25


def tiny_config(tmp_path: Path, **changes: Any) -> SimulateConfig:
    return simulate_config(**{**TINY, "output_dir": tmp_path, **changes})


# ---------------------------------------------------------------------------------------------
# Hand-made runs
# ---------------------------------------------------------------------------------------------


def row(rnd: int, acc: float | None, *, bytes_per_round: int = 1_000_000, samples_per_round: int = 16,
        peers: list[float] | None = None) -> dict[str, Any]:
    """One metrics row; ``acc`` None is a round without evaluation (eval_every > 1)."""
    return {
        "round": rnd, "samples_seen": rnd * samples_per_round, "bytes_sent_total": rnd * bytes_per_round,
        "train_loss": [None] if rnd == 0 else [1.0 / rnd],
        "consensus_test": None if acc is None else {"accuracy": acc, "loss": 1.0 - acc, "examples": N_TEST},
        "peer_test": None if peers is None else [{"accuracy": a, "loss": 1.0} for a in peers],
        "consensus_distance": {"magnitude": 0.01, "product": 0.02 * (rnd + 1), "merged": 0.03},
    }


def summary_of(name: str, mixer: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "mixer": mixer, "metric": "accuracy", "higher_is_better": True, "peers": 4,
            "rounds": rows[-1]["round"], "final": rows[-1], "runtime_s": 10.0, **extra}


def run(name: str, mixer: str, accs: list[float | None], **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = [row(r, a, **kw) for r, a in enumerate(accs)]
    return summary_of(name, mixer, rows), rows


# Three seeds; evaluation every second round (rounds 1 and 3 have no consensus accuracy).
CENTRAL_ACCS = [[0.20, None, 0.60, None, 0.80], [0.20, None, 0.64, None, 0.72], [0.20, None, 0.68, None, 0.76]]
DECAF_ACCS = [[0.20, None, 0.70, 0.99, 0.80], [0.20, None, 0.40, None, 0.56], [0.24, None, 0.72, None, 0.80]]


def seeded_groups() -> list[MethodRuns]:
    seeds = (0, 1, 2)
    decaf = tuple(run("decaf", "decaf", a, peers=[a[-1] - 0.04, a[-1]]) for a in DECAF_ACCS)
    central = tuple(run("centralized", "centralized", a, bytes_per_round=0, peers=[a[-1]]) for a in CENTRAL_ACCS)
    return [MethodRuns("decaf", decaf, seeds, tuple(f"decaf/seed-{s}" for s in seeds)),
            MethodRuns("centralized", central, seeds, tuple(f"centralized/seed-{s}" for s in seeds))]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def md_row(text: str, first_cell: str, after: str) -> list[str]:
    """The cells of the first Markdown table row starting with ``first_cell`` after the heading ``after``."""
    for line in text.split(after, 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} after {after!r}")


# ---------------------------------------------------------------------------------------------
# Statistics helpers
# ---------------------------------------------------------------------------------------------


def test_spread_is_mean_and_sample_std_of_the_known_values() -> None:
    values = [0.8, 0.72, 0.76, None]
    s = spread(values)
    assert s.mean == pytest.approx(statistics.mean([0.8, 0.72, 0.76]))
    assert s.std == pytest.approx(statistics.stdev([0.8, 0.72, 0.76]))  # ddof = 1
    assert s.std == pytest.approx(math.sqrt(((0.8 - 0.76) ** 2 + (0.72 - 0.76) ** 2 + 0) / 2))
    assert s.count == 3
    one = spread([0.5, None])
    assert (one.mean, one.std, one.count) == (0.5, None, 1)  # one seed: no spread
    assert spread([None]).mean is None


def test_binomial_standard_error_matches_the_formula() -> None:
    assert binomial_se(0.8, 400) == pytest.approx(math.sqrt(0.8 * 0.2 / 400)) == pytest.approx(0.02)
    assert binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        binomial_se(0.5, 0)
    with pytest.raises(ValueError):
        binomial_se(1.5, 10)


def test_first_reaching_is_the_first_evaluated_round_at_or_above_target() -> None:
    rows = [row(r, a) for r, a in enumerate([0.20, None, 0.70, 0.99, 0.80])]
    # Round 3's 0.99 would reach 0.75 first, but round 2 is evaluated and reaches 0.70 already.
    hit = first_reaching(rows, "accuracy", 0.70)
    assert (hit.round, hit.bytes_sent_total, hit.samples_seen) == (2, 2_000_000, 32)
    assert first_reaching(rows, "accuracy", 0.75).round == 3
    assert first_reaching(rows, "accuracy", 0.995) is None
    # 12/25 = 0.48 against 0.50 - 0.02: equal in exact arithmetic, so reached despite float rounding.
    assert first_reaching([row(0, 12 / 25)], "accuracy", 0.50 - 0.02) is not None
    # Lower is better (a perplexity): the first evaluated round at or below the target.
    ppl = [{"round": r, "consensus_test": {"perplexity": p}} for r, p in enumerate([40.0, 20.0, 12.0])]
    assert first_reaching(ppl, "perplexity", 15.0, higher_is_better=False).round == 2


def test_mean_curve_averages_each_round_over_seeds() -> None:
    runs_rows = [[row(r, a) for r, a in enumerate(accs)] for accs in DECAF_ACCS]
    points = mean_curve(runs_rows, "samples_seen", lambda r: (r.get("consensus_test") or {}).get("accuracy"))
    assert [p.round for p in points] == [0, 2, 3, 4]  # round 1 is evaluated by no seed
    by_round = {p.round: p for p in points}
    assert by_round[2].y == pytest.approx(statistics.mean([0.70, 0.40, 0.72]))
    assert by_round[2].y_std == pytest.approx(statistics.stdev([0.70, 0.40, 0.72]))
    assert by_round[2].x == 32
    assert by_round[3].y == 0.99 and by_round[3].y_std is None  # one seed only


# ---------------------------------------------------------------------------------------------
# Rounds to target
# ---------------------------------------------------------------------------------------------


def hand_rounds_to_target(method_accs: list[float | None], central_accs: list[float | None]) -> int | None:
    """Independent reference: scan the rows for the first evaluated round within 2 points of
    centralized's final accuracy (computed in percent, so no shared code with the library)."""
    target_pct = round(100 * central_accs[-1], 6) - 2
    for rnd, acc in enumerate(method_accs):
        if acc is not None and round(100 * acc, 6) >= target_pct:
            return rnd
    return None


def test_rounds_to_target_per_seed_against_centralized_at_the_same_seed() -> None:
    results = target_results(seeded_groups())
    decaf, central = results
    expected = [hand_rounds_to_target(m, c) for m, c in zip(DECAF_ACCS, CENTRAL_ACCS)]
    # Seed 0 reaches 0.78 at round 3, which only it evaluated; seed 1 ends at 0.56 < 0.72 - 0.02.
    assert expected == [3, None, 4]
    assert [r.round if r else None for r in decaf.reached] == expected
    assert decaf.n_reached == 2
    assert decaf.rounds().mean == 3.5 and decaf.rounds().std == pytest.approx(statistics.stdev([3, 4]))
    assert decaf.bytes_sent().mean == 3_500_000
    assert decaf.targets == pytest.approx([0.78, 0.70, 0.74])
    # Centralized against itself reaches its own final within 2 points at the last evaluated round.
    assert [r.round for r in central.reached] == [hand_rounds_to_target(c, c) for c in CENTRAL_ACCS] == [4, 4, 4]


def test_rounds_to_target_needs_centralized_and_an_accuracy() -> None:
    groups = seeded_groups()
    assert target_results(groups[:1]) is None  # no centralized run
    ppl = [({**s, "metric": "perplexity", "higher_is_better": False}, rows) for s, rows in groups[1].runs]
    assert target_results([MethodRuns("centralized", tuple(ppl), (0, 1, 2), ("a", "b", "c"))]) is None


# ---------------------------------------------------------------------------------------------
# Report files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeded")
    write_compare_report(out, seeded_groups())
    return out


def test_compare_csv_holds_mean_and_sample_std_over_seeds(seeded_report: Path) -> None:
    decaf, central = read_csv(seeded_report / "compare.csv")
    finals = [a[-1] for a in DECAF_ACCS]
    assert float(decaf["consensus_metric"]) == pytest.approx(statistics.mean(finals))
    assert float(decaf["consensus_metric_std"]) == pytest.approx(statistics.stdev(finals))
    peer_means = [statistics.mean([f - 0.04, f]) for f in finals]
    assert float(decaf["mean_peer_metric"]) == pytest.approx(statistics.mean(peer_means))
    assert float(decaf["mean_peer_metric_std"]) == pytest.approx(statistics.stdev(peer_means))
    assert (decaf["n_seeds"], decaf["seeds"], decaf["n_test"]) == ("3", "0;1;2", str(N_TEST))
    assert float(decaf["consensus_binomial_se"]) == pytest.approx(math.sqrt(statistics.mean(finals) * (1 - statistics.mean(finals)) / N_TEST))
    assert int(decaf["bytes_sent_total"]) == 4_000_000 and float(decaf["bytes_sent_total_std"]) == 0.0
    # Rounds to target: mean over the seeds that reached it, and how many did.
    assert (decaf["target_reached_seeds"], float(decaf["rounds_to_target"])) == ("2", 3.5)
    assert float(decaf["bytes_to_target"]) == 3_500_000
    assert float(decaf["target_metric"]) == pytest.approx(statistics.mean([0.78, 0.70, 0.74]))
    assert float(central["rounds_to_target"]) == 4.0 and central["target_reached_seeds"] == "3"


def test_compare_seeds_csv_has_one_row_per_method_and_seed(seeded_report: Path) -> None:
    records = read_csv(seeded_report / "compare_seeds.csv")
    assert [(r["name"], r["seed"], r["run_dir"]) for r in records[:3]] == [
        ("decaf", "0", "decaf/seed-0"), ("decaf", "1", "decaf/seed-1"), ("decaf", "2", "decaf/seed-2")]
    assert [float(r["consensus_metric"]) for r in records[:3]] == [a[-1] for a in DECAF_ACCS]
    assert [r["rounds_to_target"] for r in records[:3]] == ["3", "", "4"]
    assert [r["bytes_to_target"] for r in records[:3]] == ["3000000", "", "4000000"]


def test_compare_md_shows_mean_plus_minus_std_and_the_standard_error(seeded_report: Path) -> None:
    text = (seeded_report / "compare.md").read_text(encoding="utf-8")
    finals = [a[-1] for a in DECAF_ACCS]
    mean, std = 100 * statistics.mean(finals), 100 * statistics.stdev(finals)
    cells = md_row(text, "decaf", "## Final results")
    assert cells[1] == f"{mean:.1f} ± {std:.1f}"
    central = [c[-1] for c in CENTRAL_ACCS]  # the best mean consensus: bold
    assert md_row(text, "centralized", "## Final results")[1] == (
        f"**{100 * statistics.mean(central):.1f} ± {100 * statistics.stdev(central):.1f}**")
    assert cells[-1] == "3"  # seeds column
    assert "sample standard deviation (ddof = 1) over 3 seeds" in text
    p = statistics.mean([statistics.mean(finals), statistics.mean([c[-1] for c in CENTRAL_ACCS])])
    assert f"Test set: {N_TEST} examples" in text
    assert f"{100 * math.sqrt(p * (1 - p) / N_TEST):.1f} points at p = {100 * p:.1f}%" in text
    assert f"at most {100 * math.sqrt(0.25 / N_TEST):.1f} points (p = 50%)" in text
    target = md_row(text, "decaf", f"## Rounds to within {TARGET_GAP_POINTS:g} points of centralized")
    assert target[2:] == ["2 of 3 seeds", "3.5 ± 0.7", "3.50 ± 0.71", "3 / not reached / 4"]
    for name in COMPARE_PLOTS:
        assert (seeded_report / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"](plots/{name})" in text
    assert "- seeds: 0, 1, 2" in text


def test_one_seed_shows_no_plus_minus(tmp_path: Path) -> None:
    groups = [MethodRuns(g.name, g.runs[:1], g.seeds[:1], g.run_dirs[:1]) for g in seeded_groups()]
    write_compare_report(tmp_path, groups)
    text = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert "±" not in text.split("## Final results", 1)[1].split("## Plots", 1)[0]
    assert md_row(text, "decaf", "## Final results")[1] == "**80.0**"  # ties centralized's 0.80: both bold
    (decaf, _) = read_csv(tmp_path / "compare.csv")
    assert decaf["consensus_metric_std"] == "" and decaf["n_seeds"] == "1"
    assert md_row(text, "decaf", "## Rounds to within")[2:] == ["yes", "3", "3.00"]


# ---------------------------------------------------------------------------------------------
# Skipping finished runs, without training
# ---------------------------------------------------------------------------------------------


def fake_finished_run(config: SimulateConfig, accs: list[float | None]) -> None:
    """What a finished simulate leaves that compare reads: config.yaml, metrics.jsonl, summary.json."""
    out = Path(config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row(r, a) for r, a in enumerate(accs)]
    mixer = "centralized" if config.centralized else config.network.mixer
    atomic.write_text(out / "config.yaml", to_yaml(config))
    atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic.write_json(out / "summary.json", summary_of(config.run_name, mixer, rows))


def no_training(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a finished run was run again")


def test_compare_skips_finished_runs_and_reports_them(tmp_path: Path, monkeypatch) -> None:
    config = tiny_config(tmp_path, rounds=4)
    for seed, (d, c) in enumerate(zip(DECAF_ACCS[:2], CENTRAL_ACCS[:2])):
        fake_finished_run(method_config(config, "decaf", seed, run_dir(tmp_path, "decaf", seed, True)), d)
        fake_finished_run(method_config(config, "centralized", seed, run_dir(tmp_path, "centralized", seed, True)), c)
    monkeypatch.setattr(compare_module, "simulate", no_training)
    console = Console(record=True, width=200)
    summaries = compare(config, ["decaf", "centralized"], console=console, seeds=[0, 1])
    log = console.export_text()
    assert "decaf, seed 1 (3/4): finished earlier" in log and "centralized, seed 0 (2/4)" in log
    assert [s["mixer"] for s in summaries] == ["decaf", "decaf", "centralized", "centralized"]
    decaf = read_csv(tmp_path / "compare.csv")[0]
    finals = [a[-1] for a in DECAF_ACCS[:2]]
    assert float(decaf["consensus_metric"]) == pytest.approx(statistics.mean(finals))
    assert float(decaf["consensus_metric_std"]) == pytest.approx(statistics.stdev(finals))
    assert "[decaf/seed-1/report.md]" not in (tmp_path / "compare.md").read_text()  # fakes have no run report


def test_a_changed_or_unfinished_run_is_not_skipped(tmp_path: Path) -> None:
    config = method_config(tiny_config(tmp_path, rounds=4), "decaf", 0, tmp_path / "decaf")
    assert previous_run(config, tmp_path / "decaf").status == "new"  # nothing there
    fake_finished_run(config, DECAF_ACCS[0])
    assert previous_run(config, tmp_path / "decaf").status == "done"
    # A key that cannot change results (eval_batch_size) may differ; one that can (lr) may not.
    assert previous_run(config.updated({"run.eval_batch_size": 3}), tmp_path / "decaf").status == "done"
    changed = previous_run(config.updated({"optim.lr": 1e-4}), tmp_path / "decaf")
    assert changed.status == "new" and "differs in optim.lr" in changed.why
    # An interrupted rerun: metrics rewritten up to round 2, the old summary still beside them.
    rows = read_rows(tmp_path / "decaf")[:3]
    atomic.write_text(tmp_path / "decaf" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert previous_run(config, tmp_path / "decaf").status == "new"


def test_single_seed_keeps_the_flat_layout(tmp_path: Path) -> None:
    assert run_dir(tmp_path, "decaf", 3, several_seeds=False) == tmp_path / "decaf"
    assert run_dir(tmp_path, "decaf", 3, several_seeds=True) == tmp_path / "decaf" / "seed-3"
    assert method_config(tiny_config(tmp_path), "centralized", 7, tmp_path / "c").run.seed == 7


# ---------------------------------------------------------------------------------------------
# Bad --seeds
# ---------------------------------------------------------------------------------------------


def test_parse_seeds() -> None:
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad, message in (("0,x", "non-negative integers"), ("1.5", "non-negative integers"), ("-1", "non-negative"),
                         ("0,1,0", "repeats"), ("", "no seeds"), (" , ", "no seeds"), ("²", "non-negative")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


@pytest.mark.parametrize(("seeds", "message"), [("0,x", "non-negative integers"), ("2,2", "repeats"), ("", "no seeds")])
def test_cli_bad_seeds_is_one_red_line(seeds: str, message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", "-m", "local", "--seeds", seeds, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()  # rejected before anything runs


# ---------------------------------------------------------------------------------------------
# End to end: MiniLM, 2 methods x 2 seeds x 1 round
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_two_seeds_end_to_end(tmp_path: Path, monkeypatch) -> None:
    config = tiny_config(tmp_path, rounds=1, eval_peers=True, save_merged=False, tensorboard=False)
    compare(config, ["local", "centralized"], console=Console(width=160), seeds=[0, 1])
    summaries = {(m, s): json.loads((tmp_path / m / f"seed-{s}" / "summary.json").read_text())
                 for m in ("local", "centralized") for s in (0, 1)}
    assert summaries["local", 0]["label_counts"] != summaries["local", 1]["label_counts"]  # seeds differ
    records = {r["name"]: r for r in read_csv(tmp_path / "compare.csv")}
    for method in ("local", "centralized"):
        finals = [summaries[method, s]["final"]["consensus_test"]["accuracy"] for s in (0, 1)]
        assert float(records[method]["consensus_metric"]) == pytest.approx(statistics.mean(finals))
        assert float(records[method]["consensus_metric_std"]) == pytest.approx(statistics.stdev(finals))
        peers = [statistics.mean(e["accuracy"] for e in summaries[method, s]["final"]["peer_test"]) for s in (0, 1)]
        assert float(records[method]["mean_peer_metric"]) == pytest.approx(statistics.mean(peers))
        assert records[method]["n_test"] == str(TINY["max_test_samples"])
    # Rounds to target per seed, by hand from each seed's metrics rows.
    seeds_csv = read_csv(tmp_path / "compare_seeds.csv")
    for record in seeds_csv:
        method, seed = record["name"], int(record["seed"])
        mine = [(r.get("consensus_test") or {}).get("accuracy") for r in read_rows(tmp_path / method / f"seed-{seed}")]
        central = [(r.get("consensus_test") or {}).get("accuracy") for r in read_rows(tmp_path / "centralized" / f"seed-{seed}")]
        expected = hand_rounds_to_target(mine, central)
        assert record["rounds_to_target"] == ("" if expected is None else str(expected)), record
    text = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert f"Test set: {TINY['max_test_samples']} examples" in text
    assert "[local/seed-1/report.md](local/seed-1/report.md)" in text
    assert all((tmp_path / "plots" / name).is_file() for name in COMPARE_PLOTS)
    # A second compare over the same folder and seeds trains nothing and writes the same table.
    before = (tmp_path / "compare.csv").read_text()
    monkeypatch.setattr(compare_module, "simulate", no_training)
    compare(config, ["local", "centralized"], console=Console(width=160), seeds=[0, 1])
    assert (tmp_path / "compare.csv").read_text() == before


def test_own_split_accuracy_sits_beside_the_global_one(tmp_path: Path) -> None:
    """Each peer's score on its own held-out split (personalization) is a column of its own: the
    mean over peers per seed, then mean ± std over seeds; rows before mean_peer_val existed use the
    plain mean of peer_val."""
    runs = []
    own = [[0.9, 0.7], [0.8, 0.8], [1.0, 0.6]]
    for seed, values in enumerate(own):
        summary, rows = run("d2ora share direction", "d2ora", [0.2, 0.5])
        rows[-1]["peer_val"] = [{"accuracy": v, "loss": 1.0} for v in values]
        if seed:  # new rows carry the mean too
            rows[-1]["mean_peer_val"] = {"accuracy": statistics.mean(values), "min": min(values), "max": max(values)}
        runs.append((summary, rows))
    write_compare_report(tmp_path, [MethodRuns("d2ora share direction", tuple(runs), (0, 1, 2), ("a", "b", "c"))])
    (record,) = read_csv(tmp_path / "compare.csv")
    means = [statistics.mean(v) for v in own]
    assert float(record["own_split_metric"]) == pytest.approx(statistics.mean(means))
    assert float(record["own_split_metric_std"]) == pytest.approx(statistics.stdev(means))
    assert float(record["consensus_metric"]) == pytest.approx(0.5)  # the global score is still there
    assert "mean peer, own split" in (tmp_path / "compare.md").read_text()


def test_sft_runs_show_generative_accuracy_beside_perplexity(tmp_path: Path) -> None:
    """An sft comparison's headline is answer perplexity; the greedy-answer accuracy of the consensus
    and of the mean peer are columns of their own (mean ± std over seeds), in compare.md and both CSVs.
    Other tasks' tables keep their columns."""
    consensus_acc, peer_accs, ppl = [0.85, 0.725, 0.675], [[0.8, 0.7], [0.75, 0.75], [0.6, 0.7]], [1.15, 1.22, 1.32]
    runs = []
    for c, peers, p in zip(consensus_acc, peer_accs, ppl):
        final = {"round": 1, "samples_seen": 16, "bytes_sent_total": 10, "train_loss": [0.5],
                 "consensus_test": {"answer_perplexity": p, "loss": math.log(p), "tokens": 150, "generative_accuracy": c},
                 "peer_test": [{"answer_perplexity": p + 0.1, "generative_accuracy": a} for a in peers]}
        summary = {"name": "d2ora", "mixer": "d2ora", "task": "sft", "metric": "answer_perplexity",
                   "higher_is_better": False, "peers": 2, "rounds": 1, "final": final, "runtime_s": 5.0}
        runs.append((summary, [final]))
    write_compare_report(tmp_path, [MethodRuns("d2ora", tuple(runs), (0, 1, 2), ("a", "b", "c"))])
    (record,) = read_csv(tmp_path / "compare.csv")
    peer_means = [statistics.mean(a) for a in peer_accs]
    assert float(record["consensus_generative_accuracy"]) == pytest.approx(statistics.mean(consensus_acc))
    assert float(record["consensus_generative_accuracy_std"]) == pytest.approx(statistics.stdev(consensus_acc))
    assert float(record["mean_peer_generative_accuracy"]) == pytest.approx(statistics.mean(peer_means))
    assert float(record["consensus_metric"]) == pytest.approx(statistics.mean(ppl))
    seeds = read_csv(tmp_path / "compare_seeds.csv")
    assert [float(r["consensus_generative_accuracy"]) for r in seeds] == consensus_acc
    text = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert "consensus generative accuracy (%)" in text and "mean peer generative accuracy (%)" in text
    cells = md_row(text, "d2ora", "## Final results")
    assert cells[2] == f"{100 * statistics.mean(consensus_acc):.1f} ± {100 * statistics.stdev(consensus_acc):.1f}"
    assert cells[3] == f"{100 * statistics.mean(peer_means):.1f} ± {100 * statistics.stdev(peer_means):.1f}"
    # An accuracy task's table has no such columns.
    other = tmp_path / "classify"
    write_compare_report(other, seeded_groups())
    assert "generative accuracy" not in (other / "compare.md").read_text(encoding="utf-8")
