"""What the trust layer costs: signing, checking and ledger writes per round, ledger bytes, and the
robust rules' mixing time against plain mixing.

Part 1 runs the same ``d2ora simulate`` twice, one run right after the other (8 MiniLM peers, ring,
DeCAF, DoRA r=8, 64 tokens): ``trust: off`` and ``trust: simulated``. Each run reports the seconds
its signed exchange spent signing (hashing each payload, one Ed25519 signature per message),
checking (signature, digest, finiteness per received message) and writing ledger blocks; the table
gives their share of the signed run's round time, the round time of both runs (medians over rounds
2..), and the ledger bytes per peer and round. Target (issue "Trust"): at most 2% for MiniLM on CPU.

Part 2 times one mixing call for every robust rule against the base rule on MiniLM-shaped random
adapters (36 layers, r=8, the real shapes): 8 receivers of a ring (k=3) and 10 of a degree-6
graph (k=7), for d2ora (factor space) and decaf (product space, distances from Gram matrices).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trust_overhead.py           # ~6 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trust_overhead.py --quick   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dora_step import machine_info, write_json_atomic  # noqa: E402

from d2ora.mixers import DecafMixer, D2oraMixer, LayerStack, Neighbourhoods  # noqa: E402
from d2ora.mixers.robust import ROBUST_RULES, make_robust  # noqa: E402
from d2ora.recipes.simulate import simulate  # noqa: E402
from d2ora.recipes.simulate_config import SimulateConfig  # noqa: E402

HERE = Path(__file__).resolve().parent


def run_config(args: argparse.Namespace, trust: str, out: Path) -> SimulateConfig:
    return SimulateConfig().updated({
        "network.peers": 8, "network.topology": "ring", "network.mixer": "decaf", "adapter.r": 8, "run.rounds": args.rounds,
        "run.local_steps": args.local_steps, "optim.batch_size": 8, "data.max_length": 64, "data.max_train_samples": 800,
        "data.max_test_samples": 40, "run.eval_every": 1000, "run.eval_peers": False, "run.save_merged": False,
        "run.tensorboard": False, "trust.mode": trust, "run.output_dir": out,
    })


def end_to_end(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for trust in ("off", "simulated"):
        out = args.work / f"trust-{trust}"
        console.print(f"running simulate with trust: {trust} ...")
        summary = simulate(run_config(args, trust, out), console=Console(quiet=True))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        timed = [r for r in rows if r["round"] >= 2]
        results[trust] = {
            "round_s": statistics.median(sum(r["round_seconds"].values()) for r in timed),
            "rounds_total_s": sum(sum(r["round_seconds"].values()) for r in rows if r["round"] >= 1),
            "summary_trust": summary.get("trust"),
        }
    signed = results["simulated"]
    seconds = signed["summary_trust"]["seconds"]
    ledger_dir = args.work / "trust-simulated" / "ledger"
    ledger_bytes = sum(p.stat().st_size for p in ledger_dir.glob("peer-*.sqlite"))
    trust_s = sum(seconds.values())
    return {
        "round_s_off": results["off"]["round_s"], "round_s_signed": signed["round_s"],
        "sign_s": seconds["sign"], "verify_s": seconds["verify"], "ledger_s": seconds["ledger"],
        # Signing and checking happen inside the exchange (part of the round time); ledger writes after it.
        "trust_share": trust_s / (signed["rounds_total_s"] + seconds["ledger"]),
        "ledger_bytes_per_peer_round": ledger_bytes / 8 / args.rounds,
        "rounds": args.rounds,
    }


MINILM_SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]  # q, k, v, attn-out, intermediate, output


def neighbourhood(g: int, k: int, r: int = 8, seed: int = 0) -> Neighbourhoods:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in range(6):
        for j, (out, inp) in enumerate(MINILM_SHAPES):
            layers[f"l{layer}.{j}"] = LayerStack(
                lora_a=torch.randn(g, k, r, inp, generator=gen) * 0.05, lora_b=torch.randn(g, k, out, r, generator=gen) * 0.01,
                magnitude=1 + 0.01 * torch.randn(g, k, out, generator=gen), scaling=2.0,
            )
    dense = {"classifier.weight": torch.randn(g, k, 5, 384, generator=gen)}
    return Neighbourhoods(layers=layers, dense=dense, weights=torch.full((g, k), 1.0 / k), own=torch.zeros(g, dtype=torch.long))


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return min(times)


def mixing_times(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    rows = []
    for g, k, label in ((8, 3, "ring, k=3"), (10, 7, "degree 6, k=7")):
        hood = neighbourhood(g, k)
        for base in (D2oraMixer(), DecafMixer()):
            plain = best_of(lambda: base.mix(hood), args.repeats)
            for rule in ROBUST_RULES:
                f = 0 if (rule in ("krum", "multi_krum") and k == 3) else 1
                try:
                    mixer = make_robust(base, rule, byzantine=f)
                except ValueError:
                    continue  # coordinate rules with decaf: not defined
                seconds = best_of(lambda: mixer.mix(hood), args.repeats)
                rows.append({"neighbourhood": label, "mixer": base.name, "rule": rule, "f": f, "plain_s": plain,
                             "robust_s": seconds, "ratio": seconds / plain})
                console.print(f"{label:14s} {base.name:6s} {rule:24s} {seconds * 1e3:8.1f} ms  ({seconds / plain:.2f}x plain)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, 1 timing repeat")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_trust"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trust_overhead.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.repeats = 3, 2, 1
        if args.out == HERE / "results" / "trust_overhead.json":
            args.out = HERE / "results" / "trust_overhead.quick.json"
    console = Console(width=160)
    args.work.mkdir(parents=True, exist_ok=True)
    e2e = end_to_end(args, console)
    table = Table(title="8 MiniLM peers, ring, DeCAF, DoRA r=8: trust layer cost")
    for header in ("round s (off)", "round s (signed)", "sign s", "verify s", "ledger s", "trust share of round time",
                   "ledger bytes / peer / round"):
        table.add_column(header, justify="right")
    table.add_row(f"{e2e['round_s_off']:.2f}", f"{e2e['round_s_signed']:.2f}", f"{e2e['sign_s']:.3f}", f"{e2e['verify_s']:.3f}",
                  f"{e2e['ledger_s']:.3f}", f"{100 * e2e['trust_share']:.2f}%", f"{e2e['ledger_bytes_per_peer_round']:.0f}")
    console.print(table)
    mixing = mixing_times(args, console)
    result = {"end_to_end": e2e, "mixing": mixing,
              "machine": machine_info(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())}
    write_json_atomic(args.out, result)
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
