"""DeCAF mixing of one large layer: the factored route (``d2ora.mixers.decaf``) vs the dense route.

Usage::

    .venv/bin/python benchmarks/aggregate.py            # 4096 x 4096, r=16, neighbourhoods 3, 5, 9
    .venv/bin/python benchmarks/aggregate.py --quick    # 1024 x 1024 smoke run (seconds)

Setup: one adapted layer ``out = in = --size``, rank ``r``, scaling s = 2 (alpha = 2r). For each
closed-neighbourhood size k, k peers with random Gaussian factors B_j (out x r), A_j (r x in) all mix
into peer 0 with uniform weights 1/k (one row of a mixing matrix). Two ``--scenarios`` of random
factors: ``iid`` (independent peers) and ``consensus`` (a shared adapter + 10 % noise per peer); see
``draw_factors``. Both routes produce the rank-r
truncated SVD of M = Σ_j w_j s B_j A_j, as new factors (B, A) with s·B A = TSVD_r(M):

* factored: ``decaf_factors`` (QR of the out x k·r and in x k·r stacks, SVD of the k·r x k·r core;
  never an out x in matrix).
* dense: form M (out x in), ``torch.linalg.svd(M, full_matrices=False)``, keep the top r triplets,
  split √Σ between B and A.

Timing: wall clock (``perf_counter``), one warm-up call each, then ``--repeats`` factored and
``--dense-repeats`` dense calls, the factored ones spread in batches around the dense ones (the
machine is shared; see ``timed_interleaved``); the headline is the ratio of medians, the ratio of
minima is stored too. Threads: ``--threads`` (default 1). On a shared, oversubscribed machine,
multi-threaded BLAS/LAPACK calls stall at their barriers whenever a worker thread is descheduled:
with 2 threads the same factored call measured anywhere from 5 ms to 600 ms. One thread gives both
routes the same single core and stable numbers; ``--threads 0`` keeps torch's default. Accuracy: the relative error
‖s B_f A_f − s B_d A_d‖_F / ‖s B_d A_d‖_F between the two routes' truncated products, in the same
precision. Because both routes carry rounding, each is also compared with a float64 reference (the
factored route in float64, which the tests check against the dense float64 SVD to 1e-10), and the
spectral gap σ_{r+1}/σ_r is recorded: the closer it is to 1, the more sensitive the rank-r truncation
is to rounding in either route. If the float32 comparison misses ``--target-error``, the float64
routes are timed and compared too (``--fp64 auto``; ``always`` / ``never`` override).

Results: a rich table and JSON at ``--out`` (default ``benchmarks/results/aggregate.json``; ``--quick``
defaults to ``aggregate.quick.json``), written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from d2ora.atomic import write_json
from d2ora.mixers.decaf import decaf_factors, factored_svd

RESULTS = Path(__file__).resolve().parent / "results"


def dense_route(lora_b: torch.Tensor, lora_a: torch.Tensor, weights: torch.Tensor, scaling: float, rank: int):
    """Reference: M formed densely, full thin SVD, top ``rank`` triplets, balanced split."""
    m = torch.einsum("j,jor,jri->oi", weights * scaling, lora_b, lora_a)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def timed_interleaved(fast: Callable[[], Any], slow: Callable[[], Any], fast_repeats: int,
                      slow_repeats: int) -> tuple[list[float], Any, list[float], Any]:
    """Time both routes, spreading the fast route's calls around the slow route's.

    The machine is shared: load from other jobs comes and goes over seconds, so seven back-to-back
    factored calls can all land in one busy spell. Splitting them into a batch before each dense
    call and one after the last spreads them over the whole (minutes-long) case instead.
    """
    # Warm-up of the fast route only (allocator, LAPACK workspace queries matter at milliseconds);
    # a warm-up of the dense route would cost a whole SVD and change nothing at tens of seconds.
    fast_out, slow_out = fast(), None
    fast_times: list[float] = []
    slow_times: list[float] = []
    batches = [fast_repeats // (slow_repeats + 1) + (1 if i < fast_repeats % (slow_repeats + 1) else 0)
               for i in range(slow_repeats + 1)]
    for i, batch in enumerate(batches):
        for _ in range(batch):
            start = time.perf_counter()
            fast_out = fast()
            fast_times.append(time.perf_counter() - start)
        if i < slow_repeats:
            start = time.perf_counter()
            slow_out = slow()
            slow_times.append(time.perf_counter() - start)
    return fast_times, fast_out, slow_times, slow_out


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def draw_factors(scenario: str, peers: int, size: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 factors (drawn once, so float32 and float64 runs of a case mix the same adapters).

    ``iid``: independent Gaussian B_j, A_j per peer. The mix of k independent rank-r terms has an
    almost flat spectrum (σ_{r+1}/σ_r ≈ 1), the worst case for a rank-r truncation's conditioning.
    ``consensus``: one shared adapter plus 10 % independent noise per peer, the regime gossip runs
    in after a few rounds; the mix then has a clear gap after σ_r.
    """
    g = torch.Generator().manual_seed(seed + peers)
    b = torch.randn(peers, size, rank, generator=g, dtype=torch.float64) / rank**0.5
    a = torch.randn(peers, rank, size, generator=g, dtype=torch.float64) / size**0.5
    if scenario == "consensus":
        b = b[:1] + 0.1 * b
        a = a[:1] + 0.1 * a
    elif scenario != "iid":
        raise ValueError(f"unknown scenario {scenario!r}")
    return b, a


def run_case(scenario: str, size: int, rank: int, peers: int, dtype: torch.dtype, repeats: int,
             dense_repeats: int, seed: int, console: Console) -> dict[str, Any]:
    b64, a64 = draw_factors(scenario, peers, size, rank, seed)
    w64 = torch.full((peers,), 1.0 / peers, dtype=torch.float64)
    scaling = 2.0
    b, a, w = b64.to(dtype), a64.to(dtype), w64.to(dtype)

    console.log(f"{scenario} k={peers} {str(dtype).removeprefix('torch.')}: factored x{repeats}, "
                f"dense x{dense_repeats} (a full SVD of {size}x{size} each), interleaved")
    fact_times, (bf, af), dense_times, (bd, ad) = timed_interleaved(
        lambda: decaf_factors(b, a, w, scaling), lambda: dense_route(b, a, w, scaling, rank), repeats, dense_repeats
    )
    t_fact, t_dense = statistics.median(fact_times), statistics.median(dense_times)

    # float64 reference and spectrum from the factored route in float64 (cheap; see module doc).
    left = (w64[:, None, None] * scaling * b64).movedim(0, 1).reshape(size, peers * rank)
    _, sigma, _ = factored_svd(left, a64.reshape(peers * rank, size))
    b_ref, a_ref = decaf_factors(b64, a64, w64, scaling)
    m_ref = scaling * b_ref @ a_ref
    m_fact = scaling * bf @ af
    m_dense = scaling * bd @ ad
    return {
        "scenario": scenario,
        "dtype": str(dtype).removeprefix("torch."),
        "neighbourhood": peers,
        "core_size": peers * rank,
        "factored_s": t_fact,
        "factored_times_s": fact_times,
        "dense_s": t_dense,
        "dense_times_s": dense_times,
        "speedup": t_dense / t_fact,
        "speedup_of_minima": min(dense_times) / min(fact_times),
        "rel_error_factored_vs_dense": rel_error(m_fact, m_dense),
        "rel_error_factored_vs_fp64": rel_error(m_fact, m_ref),
        "rel_error_dense_vs_fp64": rel_error(m_dense, m_ref),
        "gap_sigma_r1_over_sigma_r": float(sigma[rank] / sigma[rank - 1]) if sigma.numel() > rank else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--peers", type=int, nargs="+", default=[3, 5, 9], help="closed-neighbourhood sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed factored calls per case")
    parser.add_argument("--dense-repeats", type=int, default=3, help="timed dense calls per case")
    parser.add_argument("--fp64", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--fp64-dense-repeats", type=int, default=1)
    parser.add_argument("--target-speedup", type=float, default=50.0)
    parser.add_argument("--target-error", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", choices=["iid", "consensus"], default=["iid", "consensus"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps torch's default (see the module doc)")
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, one dense repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.dense_repeats = min(args.size, 1024), 1
    out = args.out or RESULTS / ("aggregate.quick.json" if args.quick else "aggregate.json")

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 140)
    rows = []
    for scenario in args.scenarios:
        fp32 = [run_case(scenario, args.size, args.rank, k, torch.float32, args.repeats, args.dense_repeats,
                         args.seed, console) for k in args.peers]
        rows += fp32
        fp32_ok = all(r["rel_error_factored_vs_dense"] <= args.target_error for r in fp32)
        if args.fp64 == "always" or (args.fp64 == "auto" and not fp32_ok):
            rows += [run_case(scenario, args.size, args.rank, k, torch.float64, args.repeats,
                              args.fp64_dense_repeats, args.seed, console) for k in args.peers]
    fp32_rows = [r for r in rows if r["dtype"] == "float32"]

    table = Table(title=f"DeCAF mixing of one {args.size}x{args.size} layer, r={args.rank}: factored vs dense SVD")
    for col in ("scenario", "dtype", "k", "k·r", "factored ms", "dense s", "speedup", "rel err f↔d",
                "f↔fp64", "d↔fp64", "σ_{r+1}/σ_r"):
        table.add_column(col, justify="right")
    for r in rows:
        ok_speed = r["speedup"] >= args.target_speedup
        ok_err = r["rel_error_factored_vs_dense"] <= args.target_error
        table.add_row(
            r["scenario"], r["dtype"], str(r["neighbourhood"]), str(r["core_size"]),
            f"{r['factored_s'] * 1e3:.1f}", f"{r['dense_s']:.2f}",
            f"[{'green' if ok_speed else 'red'}]{r['speedup']:.0f}x[/]",
            f"[{'green' if ok_err else 'red'}]{r['rel_error_factored_vs_dense']:.1e}[/]",
            f"{r['rel_error_factored_vs_fp64']:.1e}", f"{r['rel_error_dense_vs_fp64']:.1e}",
            f"{r['gap_sigma_r1_over_sigma_r']:.4f}",
        )
    console.print(table)

    write_json(out, {
        "benchmark": "aggregate",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {"speedup": args.target_speedup, "rel_error": args.target_error},
        "fp32_meets_error_target": {sc: all(r["rel_error_factored_vs_dense"] <= args.target_error
                                            for r in fp32_rows if r["scenario"] == sc) for sc in args.scenarios},
        "meets_speedup_target": all(r["speedup"] >= args.target_speedup for r in rows),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "rows": rows,
    })
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
