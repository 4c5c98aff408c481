#!/usr/bin/env bash
# Causal LM: SmolLM2-135M peers holding different text domains (BBC News sections, one or two per
# peer via k_labels), perplexity on a shared test set of all sections. Small enough for a 2-core
# CPU (4 peers, 64 tokens, 3 rounds x 5 steps x batch 4); adapters and merged models not kept.
set -euo pipefail
cd "$(dirname "$0")/.."
D2ORA=${D2ORA:-.venv/bin/d2ora}
"$D2ORA" compare --mixers local,decaf,centralized \
  --set model.task=causal_lm --set network.peers=4 --set network.topology=ring --set data.partition=k_labels --set data.labels_per_peer=2 \
  --set run.rounds=3 --set run.local_steps=5 --set optim.batch_size=4 --set data.max_length=64 --set optim.lr=1e-3 \
  --set data.max_train_samples=600 --set data.max_test_samples=40 --set run.eval_batch_size=8 --set run.eval_every=3 \
  --set run.save_adapters=false --set run.save_merged=false \
  -o experiments/smollm2_domains
