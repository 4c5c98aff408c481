"""Byzantine peers on BBC News: every attack against plain mixing and each robust rule.

Setup (one job at a time on a 2-core CPU; each run about 3 minutes):
  MiniLM + DoRA r=8, 10 peers on the exponential graph (offsets ±1, ±2, ±4: degree 6, so every
  closed neighbourhood has k = 7 members, enough for Krum and trimmed mean with f up to 3),
  Metropolis-Hastings weights (1/7 each), Dirichlet alpha = 1.0, 4 rounds x 6 local steps x batch 8,
  64 tokens, lr 2e-3, one gossip step per round, base mixer d2ora (the only one every robust rule
  applies to: trimmed mean and median are coordinate-wise, defined on factors), trust: simulated,
  seed 0. Byzantine peers at fixed positions: f=1 [3], f=2 [3, 7], f=3 [1, 4, 7]; robust_f = max(f, 1).
  Scores: the honest peers' mean test accuracy and the honest consensus model's (the plain
  average of the honest peers' adapters), on 200 test articles (one standard error ~2.5 points at
  85%).

Grid, in priority order (a re-run skips every run whose summary.json exists, so the grid can be
finished across sessions):
  1. f = 0: plain and each of the 6 rules, no attack (the cost of robustness without attackers);
  2. f = 2: the 6 model/data attacks x {plain, 6 rules} (42 runs; ipm, alie and dissensus first,
     then the 6 protocol attacks at f = 2 with plain mixing, whose every message must be rejected
     and whose equivocation must be named by `d2ora ledger verify`, then the other three);
  3. f = 1 and f = 3: the 6 attacks x {plain, the rule with the best worst case at f = 2}, then the
     same with the second-best rule.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/run_byzantine.py            # runs what is missing, then tables
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/run_byzantine.py --report   # tables and heatmap only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "byzantine"
MODEL_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "dissensus", "label_flip")
PROTOCOL = ("forged_signature", "missing_signature", "replay", "nan", "wrong_shape", "equivocation")
RULES = ("none", "trimmed_mean", "median", "krum", "multi_krum", "centered_clipping", "self_centered_clipping")
POSITIONS = {0: [], 1: [3], 2: [3, 7], 3: [1, 4, 7]}
BASE: dict[str, Any] = {
    "network.peers": 10, "network.topology": "exponential", "network.mixer": "d2ora", "data.partition": "dirichlet", "data.dirichlet_alpha": 1.0,
    "run.rounds": 4, "run.local_steps": 6, "optim.batch_size": 8, "data.max_length": 64, "optim.lr": 2e-3, "adapter.r": 8, "data.max_test_samples": 200,
    "run.eval_every": 4, "run.save_adapters": False, "run.save_merged": False, "run.tensorboard": False, "run.checkpoint_every": 1000,
    "trust.mode": "simulated", "run.seed": 0,
}


def name(f: int, attack: str, rule: str) -> str:
    return f"f{f}-{attack}-{rule}"


def config_for(f: int, attack: str, rule: str) -> dict[str, Any]:
    byzantine = POSITIONS[f]
    return {**BASE, "trust.attack": attack if f else "none", "trust.byzantine": byzantine, "trust.robust": rule, "trust.robust_f": max(f, 1)}


def run_one(f: int, attack: str, rule: str) -> dict[str, Any]:
    from rich.console import Console

    from d2ora.recipes.simulate import simulate
    from d2ora.recipes.simulate_config import SimulateConfig
    from d2ora.trust.audit import verify_run

    folder = OUT / "grid" / name(f, attack, rule)
    done = folder / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    # A repository-relative output_dir, so the committed config.yaml repeats the run from a checkout.
    summary = simulate(SimulateConfig().updated({**config_for(f, attack, rule), "run.output_dir": folder.relative_to(REPO)}),
                       console=Console(quiet=True))
    report = verify_run(folder)  # before the ledgers are dropped below
    summary["ledger_verify"] = {"ok": report.ok, "equivocations": [e.message for e in report.equivocations],
                                "problems": [p.message for p in report.problems][:5]}
    # Keep what the tables need; checkpoints and ledgers are large and reproducible from config.yaml.
    for heavy in ("checkpoints", "ledger", "plots", "tensorboard", "consensus"):
        shutil.rmtree(folder / heavy, ignore_errors=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{name(f, attack, rule)}: {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def honest_scores(summary: dict[str, Any]) -> tuple[float, float]:
    """(honest mean peer accuracy, honest consensus accuracy) in % after the last round."""
    final = summary["final"]
    byzantine = set(summary.get("byzantine") or [])
    peers = [r["accuracy"] for k, r in enumerate(final["peer_test"]) if k not in byzantine and r is not None]
    return 100 * sum(peers) / len(peers), 100 * final["consensus_test"]["accuracy"]


def load(f: int, attack: str, rule: str) -> dict[str, Any] | None:
    path = OUT / "grid" / name(f, attack, rule) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_rules(count: int = 2) -> list[str]:
    """The robust rules with the highest worst-case honest mean accuracy over the attacks at f = 2."""
    worst = {}
    for rule in RULES[1:]:
        scores = [load(2, a, rule) for a in MODEL_ATTACKS]
        if all(s is not None for s in scores):
            worst[rule] = min(honest_scores(s)[0] for s in scores)
    return sorted(worst, key=lambda r: -worst[r])[:count]


def grid() -> list[tuple[int, str, str]]:
    """f = 0; f = 2 under the attacks made to beat robust rules; the protocol attacks; f = 2 under the rest."""
    first, rest = ("ipm", "alie", "dissensus"), ("sign_flip", "gaussian", "label_flip")
    runs = [(0, "none", rule) for rule in RULES]
    runs += [(2, a, rule) for a in first for rule in RULES]
    runs += [(2, a, "none") for a in PROTOCOL]
    runs += [(2, a, rule) for a in rest for rule in RULES]
    return runs


def later_grid() -> list[tuple[int, str, str]]:
    """Plain mixing and the best rule at f = 1 and 3 first, then the second-best rule."""
    best = best_rules()
    runs = [(f, a, rule) for f in (1, 3) for a in MODEL_ATTACKS for rule in ["none", *best[:1]]]
    return runs + [(f, a, rule) for f in (1, 3) for a in MODEL_ATTACKS for rule in best[1:]]


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Byzantine peers: honest accuracy (%) after 4 rounds", ""]
    heat = {}
    for f in (1, 2, 3):
        rules = [r for r in RULES if any(load(f, a, r) for a in MODEL_ATTACKS)]
        if not rules:
            continue
        lines += [f"## f = {f} Byzantine peers at {POSITIONS[f]} (honest mean peer / honest consensus)", "",
                  "| attack | " + " | ".join(rules) + " |", "| --- | " + " | ".join("---:" for _ in rules) + " |"]
        worst: dict[str, float] = {}
        for attack in MODEL_ATTACKS:
            cells = []
            for rule in rules:
                s = load(f, attack, rule)
                if s is None:
                    cells.append("-")
                    continue
                mean, cons = honest_scores(s)
                worst[rule] = min(worst.get(rule, 101.0), mean)
                heat[(f, attack, rule)] = mean
                cells.append(f"{mean:.1f} / {cons:.1f}")
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("| **worst case (mean peer)** | " + " | ".join(f"**{worst[r]:.1f}**" if r in worst else "-" for r in rules) + " |")
        lines.append("")
    base = [(rule, load(0, "none", rule)) for rule in RULES]
    lines += ["## f = 0 (no attacker): what each rule costs", "", "| rule | mean peer | consensus |", "| --- | ---: | ---: |"]
    for rule, s in base:
        if s is not None:
            mean, cons = honest_scores(s)
            lines.append(f"| {rule} | {mean:.1f} | {cons:.1f} |")
    lines += ["", "## Protocol attacks at f = 2 (plain mixing)", "",
              "| attack | rejected messages (by check) | honest mean peer | ledger verify |", "| --- | --- | ---: | --- |"]
    for attack in PROTOCOL:
        s = load(2, attack, "none")
        if s is None:
            continue
        rejected = s["trust"]["rejected_by_sender"]
        verdict = s.get("ledger_verify", {})
        named = "ok" if verdict.get("ok") else ("equivocation: " + "; ".join(verdict.get("equivocations", [])[:1])
                                                 if verdict.get("equivocations") else "FAILED")
        lines.append(f"| {attack} | {json.dumps(rejected)} | {honest_scores(s)[0]:.1f} | {named} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    table = {f"f{f}-{a}-{r}": v for (f, a, r), v in heat.items()}
    (OUT / "results.json").write_text(json.dumps({"honest_mean_peer": table, "setup": BASE, "positions": POSITIONS}, indent=1))
    for f in sorted({f for f, _, _ in heat}):
        rules = [r for r in RULES if any((f, a, r) in heat for a in MODEL_ATTACKS)]
        values = [[heat.get((f, a, r), float("nan")) for r in rules] for a in MODEL_ATTACKS]
        fig, ax = plt.subplots(figsize=(0.9 * len(rules) + 3, 4.5))
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(rules)), rules, rotation=35, ha="right")
        ax.set_yticks(range(len(MODEL_ATTACKS)), MODEL_ATTACKS)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
        ax.set_title(f"honest mean peer accuracy (%), f = {f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(OUT / f"heatmap_f{f}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    print((OUT / "README.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="only write the tables and heatmaps")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many missing runs")
    args = parser.parse_args()
    os.chdir(REPO)  # output dirs are repository-relative
    if not args.report:
        todo = [run for run in grid() if load(*run) is None]
        for count, run in enumerate(todo):
            if args.limit is not None and count >= args.limit:
                break
            run_one(*run)
        if args.limit is None or len(todo) < args.limit:
            for run in later_grid():
                run_one(*run)
    report()


if __name__ == "__main__":
    sys.exit(main())
