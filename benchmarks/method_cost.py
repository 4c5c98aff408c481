"""What each label-skew remedy costs per round, against plain DeCAF: seconds and bytes.

Part 1 runs ``d2ora simulate`` once per method, one run right after the other (8 MiniLM peers, ring,
DoRA r=8, 64 tokens, batch 8): DeCAF (the reference), D²ORA, DoRA-exact, the three FedAvg server
rules, the drift corrections (QGM, K-GT, FedProx), the label-prior logit adjustment, DeCAF with 4
gossip steps per round and a personalized split (share: direction). Each
row gives the median over rounds 2.. of the round's local-step, exchange and mixing seconds, the
bytes every peer sends per round, and both as ratios to DeCAF's.

Part 2 times one mixing call of DoRA-exact against DeCAF and D²ORA on MiniLM-shaped random adapters
(36 layers, r=8, the real shapes, random frozen W0): 8 receivers of a ring (k=3) and one FedAvg
server mix (k=8). DoRA-exact adds, per neighbour and layer, the factored row norms ||W0 + s·B_jA_j||_c
(O(out·in·r)) before the same factored TSVD.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/method_cost.py           # ~8-12 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/method_cost.py --quick   # ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dora_step import machine_info, write_json_atomic  # noqa: E402
from trust_overhead import best_of, neighbourhood  # noqa: E402

from d2ora.mixers import D2oraMixer, DecafMixer, DoraExactMixer, Neighbourhoods  # noqa: E402
from d2ora.recipes.simulate import simulate  # noqa: E402
from d2ora.recipes.simulate_config import SimulateConfig  # noqa: E402

HERE = Path(__file__).resolve().parent

#: (label, config changes); the first is the reference every ratio is taken against.
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("decaf", {"network.mixer": "decaf"}),
    ("d2ora", {"network.mixer": "d2ora"}),
    ("dora_exact", {"network.mixer": "dora_exact"}),
    ("fedavg", {"network.mixer": "fedavg"}),
    ("fedavg_products", {"network.mixer": "fedavg_products"}),
    ("fedavg_exact", {"network.mixer": "fedavg_exact"}),
    ("decaf+qgm", {"network.mixer": "decaf", "network.drift": "qgm"}),
    ("decaf+kgt", {"network.mixer": "decaf", "network.drift": "kgt"}),
    ("d2ora+kgt", {"network.mixer": "d2ora", "network.drift": "kgt"}),
    ("decaf+prox0.01", {"network.mixer": "decaf", "network.prox_mu": 0.01}),
    ("decaf+logit_adjust", {"network.mixer": "decaf", "network.logit_adjust": 1.0}),
    ("decaf, 4 gossip steps", {"network.mixer": "decaf", "network.mixing_steps": 4}),
    ("d2ora, share direction", {"network.mixer": "d2ora", "network.share": "direction"}),
]


def run_config(args: argparse.Namespace, changes: dict[str, Any], out: Path) -> SimulateConfig:
    return SimulateConfig().updated({
        "network.peers": 8, "network.topology": "ring", "adapter.r": 8, "run.rounds": args.rounds, "run.local_steps": args.local_steps,
        "optim.batch_size": 8, "data.max_length": 64, "data.max_train_samples": 800, "data.max_test_samples": 40, "run.eval_every": 1000,
        "run.eval_peers": False, "run.save_merged": False, "run.save_adapters": False, "run.tensorboard": False,
        "run.output_dir": out, **changes,
    })


def end_to_end(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for label, changes in METHODS:
        out = args.work / label.replace(" ", "_").replace(",", "")
        console.print(f"running {label} ...")
        simulate(run_config(args, changes, out), console=Console(quiet=True))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        timed = [r for r in rows if r["round"] >= 2]
        seconds = {part: statistics.median(r["round_seconds"][part] for r in timed) for part in ("local", "exchange", "mix")}
        results.append({"method": label, "config": changes, **{f"{k}_s": v for k, v in seconds.items()},
                        "round_s": sum(seconds.values()), "bytes_per_round": rows[-1]["bytes_sent_total"] / args.rounds})
    reference = results[0]
    for row in results:
        row["round_ratio"] = row["round_s"] / reference["round_s"]
        row["mix_ratio"] = row["mix_s"] / reference["mix_s"]
        row["bytes_ratio"] = row["bytes_per_round"] / reference["bytes_per_round"]
    return results


def with_base_weights(hood: Neighbourhoods, seed: int = 1) -> Neighbourhoods:
    """trust_overhead's MiniLM-shaped neighbourhood plus a random frozen W0 per layer (DoRA-exact needs it)."""
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for name, stack in hood.layers.items():
        out, inp = stack.lora_b.shape[-2], stack.lora_a.shape[-1]
        base[name] = torch.randn(out, inp, generator=gen) / inp ** 0.5
    return replace(hood, base_weights=base)


def mixing_times(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    rows = []
    for g, k, label in ((8, 3, "ring, k=3"), (1, 8, "server, k=8")):
        hood = with_base_weights(neighbourhood(g, k))
        times = {mixer.name: best_of(lambda: mixer.mix(hood), args.repeats) for mixer in (DecafMixer(), D2oraMixer(), DoraExactMixer())}
        for name, seconds in times.items():
            rows.append({"neighbourhood": label, "mixer": name, "seconds": seconds, "ratio_to_decaf": seconds / times["decaf"]})
            console.print(f"{label:12s} {name:10s} {seconds * 1e3:8.1f} ms  ({seconds / times['decaf']:.2f}x decaf)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, 1 timing repeat")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_methods"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "method_cost.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.repeats = 3, 2, 1
        if args.out == HERE / "results" / "method_cost.json":
            args.out = HERE / "results" / "method_cost.quick.json"
    console = Console(width=160)
    args.work.mkdir(parents=True, exist_ok=True)
    e2e = end_to_end(args, console)
    table = Table(title="8 MiniLM peers, ring, DoRA r=8: per-round cost against plain DeCAF (medians over rounds 2..)")
    for header in ("method", "local s", "exchange s", "mix s", "round s", "round / decaf", "mix / decaf", "MB / round", "bytes / decaf"):
        table.add_column(header, justify="right")
    for row in e2e:
        table.add_row(row["method"], f"{row['local_s']:.2f}", f"{row['exchange_s']:.3f}", f"{row['mix_s']:.3f}",
                      f"{row['round_s']:.2f}", f"{row['round_ratio']:.2f}x", f"{row['mix_ratio']:.2f}x",
                      f"{row['bytes_per_round'] / 1e6:.1f}", f"{row['bytes_ratio']:.2f}x")
    console.print(table)
    mixing = mixing_times(args, console)
    result = {"end_to_end": e2e, "mixing": mixing,
              "machine": machine_info(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())}
    write_json_atomic(args.out, result)
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
