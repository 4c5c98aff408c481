"""One label-skew study: a grid of methods x Dirichlet α x seeds on one data set, run one job at a
time (resumable across sessions), then one README table per α and accuracy plots with seed bands.

Shared by ``run_label_skew.py`` (BBC News, where the methods were developed) and
``run_unseen_dataset.py`` (a data set nothing was tuned on). A study only says what differs:
its data, its methods per α and which methods the later seeds repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WITHIN = 2.0  # points of centralized's final accuracy that count as "caught up"
#: Rows with different seed counts cannot be compared by their means (seeds differ far more than
#: methods do), so every method is also compared with this one on the seeds both ran: a paired difference.
PAIRED_WITH = "decaf"

#: The run shape every study shares: 8 peers on a ring, 6 rounds x 10 local steps x batch 16, 32 tokens.
BASE: dict[str, Any] = {
    "network.peers": 8, "network.topology": "ring", "data.partition": "dirichlet", "run.rounds": 6, "run.local_steps": 10, "optim.batch_size": 16,
    "data.max_length": 32, "optim.lr": 2e-3, "adapter.r": 8, "data.max_test_samples": None, "run.eval_every": 2, "run.save_adapters": False,
    "run.save_merged": False, "run.tensorboard": False, "run.checkpoint_every": 1000,
}


@dataclass(frozen=True)
class Study:
    """What one study runs and where it writes."""

    title: str  # the data set, for headings and plot titles
    out: Path
    config: dict[str, Any]  # BASE plus the data source
    methods: Callable[[float], dict[str, dict[str, Any]]]  # α -> label -> config changes
    alphas: Sequence[float]
    seeds: Sequence[int]
    repeat: Callable[[float], list[str]]  # α -> the labels that seeds after the first repeat
    setup_note: str  # one paragraph for the README: where the setup is described

    def folder(self, alpha: float, label: str, seed: int) -> Path:
        return self.out / "runs" / f"alpha{alpha}" / label.replace(" ", "_") / f"seed-{seed}"

    def load(self, alpha: float, label: str, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(summary, metric rows) of a finished run, or None."""
        path = self.folder(alpha, label, seed)
        if not (path / "summary.json").is_file():
            return None
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return json.loads((path / "summary.json").read_text()), rows

    def evaluated_rounds(self) -> list[int]:
        """The rounds with a test evaluation: 0, every ``eval_every``-th, and the last."""
        rounds, every = self.config["run.rounds"], self.config.get("run.eval_every", 1)
        return sorted({0, rounds, *range(every, rounds + 1, every)})

    def grid(self) -> list[tuple[float, str, int]]:
        first, later = self.seeds[0], self.seeds[1:]
        runs = [(alpha, label, first) for alpha in self.alphas for label in self.methods(alpha)]
        runs += [(alpha, label, seed) for seed in later for alpha in self.alphas for label in self.repeat(alpha)]
        return runs


def best_methods(study: Study, alpha: float, count: int, exclude: Sequence[str]) -> list[str] | None:
    """The ``count`` labels with the highest first-seed consensus accuracy at α (None until all have run)."""
    others = [m for m in study.methods(alpha) if m not in exclude]
    scores = {m: study.load(alpha, m, study.seeds[0]) for m in others}
    if any(v is None for v in scores.values()):
        return None
    return sorted(others, key=lambda m: -scores[m][0]["final"]["consensus_test"]["accuracy"])[:count]


def run_config(study: Study, alpha: float, label: str, seed: int) -> Any:
    """The validated SimulateConfig of one run (dotted keys: ``network.mixer`` and so on)."""
    from d2ora.recipes.simulate_config import SimulateConfig

    config = {**study.config, "data.dirichlet_alpha": alpha, "run.seed": seed, **study.methods(alpha)[label]}
    return SimulateConfig().updated({**config, "run.output_dir": study.folder(alpha, label, seed).relative_to(REPO)})


def run_one(study: Study, alpha: float, label: str, seed: int) -> None:
    from rich.console import Console

    from d2ora.recipes.simulate import simulate

    out = study.folder(alpha, label, seed)
    started = time.perf_counter()
    simulate(run_config(study, alpha, label, seed), console=Console(quiet=True))
    for heavy in ("checkpoints", "plots", "tensorboard", "consensus", "adapters"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    print(f"alpha {alpha} {label} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ report
def accuracy(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else 100 * entry["accuracy"]


def mean_std(values: list[float]) -> str:
    from d2ora.report.stats import spread

    known = spread(values)
    if known.mean is None:
        return "-"
    return f"{known.mean:.1f}" if known.std is None else f"{known.mean:.1f} ± {known.std:.1f}"


def curve(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[tuple[int, float]]:
    """(round, mean consensus accuracy over the runs) at every round all the runs evaluated."""
    per_run = [{row["round"]: accuracy(row["consensus_test"]) for row in rows if row.get("consensus_test")} for _, rows in runs]
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    return [(r, statistics.mean(p[r] for p in per_run)) for r in common]


def reached(rows: list[dict[str, Any]], target: float) -> tuple[int, float] | None:
    """(round, bytes sent) of the first evaluated round whose consensus model is within WITHIN points of target."""
    from d2ora.report.stats import first_reaching

    hit = first_reaching(rows, "accuracy", (target - WITHIN) / 100)
    return None if hit is None else (hit.round, hit.bytes_sent_total)


def final_by_seed(study: Study, alpha: float, label: str) -> dict[int, float]:
    """seed -> final consensus accuracy of ``label`` at α, for the seeds it ran."""
    finals = {seed: study.load(alpha, label, seed) for seed in study.seeds}
    return {seed: accuracy(got[0]["final"]["consensus_test"]) for seed, got in finals.items() if got is not None}


def minus(runs: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]], reference: dict[int, float]) -> list[float]:
    """Final consensus accuracy minus the reference's, for each seed both ran."""
    return [accuracy(r[0]["final"]["consensus_test"]) - reference[seed] for seed, r in runs.items() if seed in reference]


def majority_share(study: Study, alpha: float) -> float | None:
    """% of the first seed's training samples in the most frequent class (the always-predict-it baseline)."""
    for label in study.methods(alpha):
        got = study.load(alpha, label, study.seeds[0])
        if got and got[0].get("label_counts"):
            totals = [sum(column) for column in zip(*got[0]["label_counts"])]
            return 100 * max(totals) / sum(totals)
    return None


def report(study: Study) -> None:
    rounds = study.config["run.rounds"]
    legend = ("Accuracies in %, mean ± sample standard deviation over the seeds run (n). 'caught up': the first "
              "evaluated round (and MB sent by then) whose consensus model is within "
              f"{WITHIN:g} points of centralized's final accuracy for the same seed (k/n seeds reached it). "
              f"'vs {PAIRED_WITH}': the consensus accuracy minus {PAIRED_WITH}'s on the same seeds (same split, "
              "partition and initialisation): the fair comparison between rows with different n.")
    lines = [f"# Label skew on {study.title}: 8 peers on a ring, MiniLM + DoRA r = 8", "", study.setup_note, "", legend, ""]
    results: dict[str, Any] = {}
    for alpha in study.alphas:
        table = []
        central = final_by_seed(study, alpha, "centralized")
        paired_reference = final_by_seed(study, alpha, PAIRED_WITH)
        if not central and not any(study.load(alpha, m, study.seeds[0]) for m in study.methods(alpha)):
            continue
        n_test = None
        for label in study.methods(alpha):
            runs = {seed: study.load(alpha, label, seed) for seed in study.seeds}
            runs = {seed: r for seed, r in runs.items() if r is not None}
            if not runs:
                continue
            finals = [r[0]["final"] for r in runs.values()]
            n_test = n_test or runs[min(runs)][0]["final"]["consensus_test"].get("examples")
            consensus = [accuracy(f["consensus_test"]) for f in finals]
            mean_peer = [accuracy(f.get("mean_peer_test")) for f in finals if f.get("mean_peer_test")]
            local = [accuracy(f.get("mean_peer_val")) for f in finals if f.get("mean_peer_val")]
            caught = [reached(rows, central[seed]) for seed, (_, rows) in runs.items() if seed in central]
            hits = [c for c in caught if c is not None]
            caught_text = "-" if not caught else (
                f"{statistics.mean(c[0] for c in hits):.1f} rounds, {statistics.mean(c[1] for c in hits) / 1e6:.0f} MB ({len(hits)}/{len(caught)})"
                if hits else f"not in {rounds} rounds (0/{len(caught)})")
            megabytes = statistics.mean(f["bytes_sent_total"] for f in finals) / 1e6
            gaps = minus(runs, central)
            paired = minus(runs, paired_reference)
            by_round = curve(list(runs.values()))
            table.append((label, len(runs), mean_std(consensus), mean_std(gaps) if gaps else "-",
                          "-" if not paired or label == PAIRED_WITH else f"{mean_std(paired)} ({len(paired)})",
                          " / ".join(f"{acc:.1f}" for _, acc in by_round[1:]),
                          mean_std(mean_peer), mean_std(local), f"{megabytes:.0f}", caught_text))
            results[f"alpha{alpha}/{label}"] = {"seeds": sorted(runs), "consensus": consensus, "gap_to_centralized": gaps,
                                                f"minus_{PAIRED_WITH}_same_seeds": paired,
                                                "consensus_by_round": by_round, "mean_peer": mean_peer,
                                                "mean_local": local, "mb_sent": megabytes, "caught_up": caught}
        lines += [f"## Dirichlet α = {alpha}", ""]
        if central:
            lines.append(f"Centralized final accuracy: {mean_std(list(central.values()))}.")
        majority = majority_share(study, alpha)
        if majority is not None:
            lines.append(f"The most frequent class is {majority:.1f}% of the training samples: a model that always "
                         "predicts it scores about that on a stratified test set.")
        se = "" if not n_test else (f"One standard error of a test accuracy p is √(p(1−p)/n_test): "
                                    f"{100 * math.sqrt(0.9 * 0.1 / n_test):.1f} points at 90%, "
                                    f"{100 * math.sqrt(0.25 / n_test):.1f} at 50% (n_test = {n_test}).")
        evaluated = " / ".join(str(r) for r in study.evaluated_rounds()[1:])
        header = (f"| method | n | consensus (global test) | gap to centralized | vs {PAIRED_WITH} (seeds) "
                  f"| consensus after rounds {evaluated} (mean) "
                  "| mean peer (global test) | mean peer (own held-out split) | MB sent | caught up with centralized |")
        lines += [se, "", header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {' | '.join(str(c) for c in row)} |" for row in table]
        lines.append("")
        plot_alpha(study, alpha)
        lines += [f"![accuracy against samples](accuracy_vs_samples_alpha{alpha}.png) ![accuracy against bytes](accuracy_vs_bytes_alpha{alpha}.png)", ""]
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "README.md").write_text("\n".join(lines) + "\n")
    setup = {key: value for key, value in study.config.items()}
    (study.out / "results.json").write_text(json.dumps({"setup": setup, "alphas": list(study.alphas), "results": results}, indent=1))
    print((study.out / "README.md").read_text())


def plot_alpha(study: Study, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, name, xlabel in (("samples_seen", "samples", "training samples seen (all peers)"),
                                ("bytes_sent_total", "bytes", "MB sent (all peers)")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label in study.methods(alpha):
            runs = [study.load(alpha, label, seed) for seed in study.seeds]
            runs = [r for r in runs if r is not None]
            if not runs:
                continue
            curves = []
            for _, rows in runs:
                points = [(row[x_key], accuracy(row.get("consensus_test"))) for row in rows if row.get("consensus_test")]
                curves.append(points)
            length = min(len(c) for c in curves)
            xs = [statistics.mean(c[i][0] for c in curves) for i in range(length)]
            if x_key == "bytes_sent_total":
                xs = [x / 1e6 for x in xs]
            ys = [statistics.mean(c[i][1] for c in curves) for i in range(length)]
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                sd = [statistics.stdev(c[i][1] for c in curves) for i in range(length)]
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("consensus test accuracy (%)")
        ax.set_title(f"{study.title}, 8 peers, ring, Dirichlet α = {alpha} (band: ± 1 s.d. over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(study.out / f"accuracy_vs_{name}_alpha{alpha}.png", dpi=110)
        plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def main(study: Study, description: str, prepare: Callable[[], None] | None = None) -> None:
    """``--plan`` lists the missing runs, ``--limit N`` runs the next N, ``--report`` only writes tables."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--report", action="store_true", help="only write the tables and plots")
    parser.add_argument("--plan", action="store_true", help="list the runs still missing")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many missing runs")
    args = parser.parse_args()
    os.chdir(REPO)  # output dirs are repository-relative
    if prepare is not None and not args.report:
        prepare()
    todo = [run for run in study.grid() if study.load(*run) is None]
    if args.plan:
        for alpha, label, seed in todo:
            print(f"alpha {alpha}  {label}  seed {seed}")
        grid = study.grid()
        for run in grid:  # every run's config must still load, done or not
            run_config(study, *run)
        print(f"{len(todo)} run(s) missing; all {len(grid)} run configs validate")
        return
    if not args.report:
        done = 0
        # The grid is re-read after every run: the later seeds' methods are known only once the
        # first seed is complete.
        while todo and (args.limit is None or done < args.limit):
            print(f"[{done + 1}, {len(todo)} left] ", end="", flush=True)
            run_one(study, *todo[0])
            done += 1
            todo = [run for run in study.grid() if study.load(*run) is None]
    report(study)
