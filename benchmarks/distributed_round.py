"""Round time of ``d2ora peer`` under torchrun (gloo, loopback): local steps, exchange, mixing.

The same 8 MiniLM peers (ring, DeCAF, DoRA r=8) run as 1, 2, 4 and 8 processes on this machine,
and once more in ``d2ora simulate`` (one process, in-memory exchange). Each configuration is one
real run of ``rounds`` rounds; the first round is warm-up and the table shows the median over the
others of what every round record holds (``round_seconds``: the slowest process's local-step,
exchange and mixing seconds; ``wire_bytes``; ``bytes_sent``). Evaluation only runs after the last
round and is not timed. Exchange time is wall time from posting the messages to having all of
them, so it includes waiting for slower neighbours.

Targets (issue "Peers as real processes"): exchange <= 10% of round time at 4 processes; bytes on
the wire = payload + at most 1%; one process hosting 8 peers no slower than ``simulate``.

On a 2-core machine every process beyond 2 shares the cores, so round times grow with the process
count: the table measures the protocol's overhead, not a cluster's speed-up. With ``--device
cuda`` (NCCL), run it on a GPU machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed_round.py            # ~15 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed_round.py --quick    # ~4 min smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dora_step import machine_info, write_json_atomic  # noqa: E402

from d2ora.recipes.sections import nested  # noqa: E402

HERE = Path(__file__).resolve().parent


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "network.peers": 8, "network.topology": "ring", "network.mixer": "decaf", "adapter.r": 8, "run.rounds": args.rounds, "run.local_steps": args.local_steps,
        "optim.batch_size": args.batch_size, "data.max_length": args.max_length, "data.max_train_samples": 800, "data.max_test_samples": 40,
        "run.eval_every": 1000, "run.eval_peers": False, "run.save_adapters": False, "run.save_merged": False, "run.tensorboard": False,
        "run.device": args.device, "network.timeout_s": 600,
    }


def launch(procs: int | None, config: Path, out: Path, env: dict[str, str]) -> float:
    """One run; ``procs=None`` is ``d2ora simulate``. Returns its wall seconds."""
    if procs is None:
        command = [sys.executable, "-m", "d2ora", "simulate", "--config", str(config), "--output-dir", str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                   "-m", "d2ora", "peer", "--config", str(config), "--output-dir", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def summarise(out: Path, label: str, procs: int, wall: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["round"] >= 2]  # round 1 warms up
    summary = json.loads((out / "summary.json").read_text())
    seconds = {k: statistics.median(r["round_seconds"][k] for r in timed) for k in ("local", "exchange", "mix")}
    round_s = sum(seconds.values())
    payload_per_peer = statistics.median(statistics.mean(r["bytes_sent"]) for r in timed)
    wire = statistics.median(r["wire_bytes"] for r in timed)
    crossing_payload = statistics.median(
        sum(r["bytes_sent"]) * (crossing_fraction(procs)) for r in timed
    )
    return {
        "label": label, "processes": procs, "peers_per_process": 8 // procs, "wall_s": wall, **{f"{k}_s": v for k, v in seconds.items()},
        "round_s": round_s, "exchange_share": seconds["exchange"] / round_s,
        "message_bytes": summary["message_bytes"], "payload_bytes_per_peer_round": payload_per_peer,
        "wire_bytes_per_round": wire, "wire_over_crossing_payload": (wire / crossing_payload) if crossing_payload else None,
    }


def crossing_fraction(procs: int) -> float:
    """Share of a ring's 16 messages between 8 peers that cross processes with contiguous blocks."""
    size = 8 // procs
    owner = [p // size for p in range(8)]
    crossing = sum(owner[p] != owner[(p + d) % 8] for p in range(8) for d in (-1, 1))
    return crossing / 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2,4,8", help="process counts (each must divide 8)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, 2 and 4 processes only")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_distributed"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed_round.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.procs = 3, 2, "2,4"
        if args.out == HERE / "results" / "distributed_round.json":
            args.out = HERE / "results" / "distributed_round.quick.json"
    console = Console(width=160)
    args.work.mkdir(parents=True, exist_ok=True)
    config = args.work / "run.yaml"
    config.write_text(yaml.safe_dump(nested(run_config(args))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for label, procs in [("simulate", None)] + [(f"{p} process(es)", int(p)) for p in args.procs.split(",")]:
        console.print(f"running {label} ...")
        out = args.work / label.split()[0]
        wall = launch(procs, config, out, env)
        rows.append(summarise(out, label, procs or 1, wall))
    table = Table(title="8 MiniLM peers, ring, DeCAF, DoRA r=8: median round (rounds 2..)")
    for header in ("run", "peers/proc", "local s", "exchange s", "mix s", "round s", "exchange %", "payload/peer/round",
                   "wire/round", "wire ÷ crossing payload"):
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(r["label"], str(r["peers_per_process"]), f"{r['local_s']:.2f}", f"{r['exchange_s']:.3f}", f"{r['mix_s']:.3f}",
                      f"{r['round_s']:.2f}", f"{100 * r['exchange_share']:.1f}", f"{r['payload_bytes_per_peer_round'] / 1e6:.2f} MB",
                      f"{r['wire_bytes_per_round'] / 1e6:.2f} MB",
                      "-" if r["wire_over_crossing_payload"] is None else f"{r['wire_over_crossing_payload']:.5f}")
    console.print(table)
    one = next((r for r in rows if r["label"] == "1 process(es)"), None)
    simulated = rows[0]
    if one is not None:
        console.print(f"one process hosting 8 peers / simulate, round time: {one['round_s'] / simulated['round_s']:.3f}")
    result = {"config": run_config(args), "runs": rows, "machine": machine_info(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())}
    write_json_atomic(args.out, result)
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
