"""Peak CPU memory of one peer-batched causal-LM training step: full logits vs chunked cross-entropy.

A tiny random Llama with a 32k vocabulary (so the logits dominate), P peers stacked, one forward and
backward of ``CausalLMTask.peer_losses``. Each mode runs in a fresh process; the number reported is
the process's peak resident memory (``ru_maxrss``) minus its resident memory just before the step
(large allocations are forced onto their own mappings, so freed tensors leave the resident set).

    python benchmarks/chunked_ce_memory.py [--peers 4] [--rows 4] [--tokens 128] [--vocab 32000] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import types


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_step(mode: str, peers: int, rows: int, tokens: int, vocab: int, chunk: int, checkpointing: bool) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2ora import DoRAConfig, attach
    from d2ora.activation_checkpointing import enable_checkpointing
    from d2ora.data import losses
    from d2ora.data.tasks import CausalLMTask
    from d2ora.engine.peers import PeerModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=tokens)
    model = LlamaForCausalLM(config).eval()
    attach(model, DoRAConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=[], init_seed=0))
    stacked = PeerModel(model, peers)
    if checkpointing:
        enable_checkpointing(model)
    losses.CHUNK_TOKENS = chunk
    if mode == "full":  # the path before chunking: the model's own logits of every peer at once
        losses.output_head = lambda _model: None  # type: ignore[assignment]
    task = CausalLMTask()
    features = [{"input_ids": torch.randint(1, vocab, (tokens,)).tolist(), "attention_mask": [1] * tokens}
                for _ in range(peers * rows)]
    batch = task.collator(types.SimpleNamespace(pad_token_id=0, eos_token_id=None))(features)
    before = rss_mb()
    peer_losses = task.peer_losses(stacked.model, batch, peers)
    peer_losses.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_over_start_mb": round(peak - before, 1), "loss": float(peer_losses.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024, help="target tokens per chunk of the chunked loss")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: mode, checkpointing
    args = parser.parse_args()
    shape = (args.peers, args.rows, args.tokens, args.vocab, args.chunk)
    if args.one:
        print(json.dumps(one_step(args.one[0], *shape, args.one[1] == "1")))
        return
    logits_mb = args.peers * args.rows * args.tokens * args.vocab * 4 / 2**20
    print(f"{args.peers} peers x {args.rows} rows x {args.tokens} tokens, vocab {args.vocab}, chunks of {args.chunk}: "
          f"one fp32 copy of all logits = {logits_mb:.0f} MB")
    # A fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed,
    # so the resident peak is the live tensors' peak (with its dynamic threshold, freed 30 MB blocks
    # stay in the heap and a loop of equal chunks looks like a leak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    for checkpointing in ("0", "1"):
        for mode in ("full", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--peers", str(args.peers), "--rows", str(args.rows),
                                  "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--one", mode, checkpointing],
                                 capture_output=True, text=True, check=True, env=env).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {mode:8s} checkpointing={checkpointing}: peak {result['peak_over_start_mb']:8.1f} MB over the "
                  f"step's start (loss {result['loss']:.6f})")


if __name__ == "__main__":
    main()
