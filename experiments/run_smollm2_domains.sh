#!/usr/bin/env bash
# Causal LM: SmolLM2-135M peers holding different text domains (BBC News sections, one or two per
# peer via k_labels), perplexity on a shared test set of all sections. Small enough for a 2-core
# CPU (4 peers, 64 tokens, 3 rounds x 5 steps x batch 4); adapters and merged models not kept.
set -euo pipefail
cd "$(dirname "$0")/.."
D2ORA=${D2ORA:-.venv/bin/d2ora}
"$D2ORA" compare --mixers local,decaf,centralized \
  --set task=causal_lm --set peers=4 --set topology=ring --set partition=k_labels --set labels_per_peer=2 \
  --set rounds=3 --set local_steps=5 --set batch_size=4 --set max_length=64 --set lr=1e-3 \
  --set max_train_samples=600 --set max_test_samples=40 --set eval_batch_size=8 --set eval_every=3 \
  --set save_adapters=false --set save_merged=false \
  -o experiments/smollm2_domains
