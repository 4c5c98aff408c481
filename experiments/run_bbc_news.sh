#!/usr/bin/env bash
# BBC News, 8 peers, MiniLM + DoRA: every mixer on the same partitions and seeds.
# The issue's budget: 4 rounds x 10 local steps x batch 16 per peer = 5,120 samples for every method
# (centralized: one peer, batch 128, 40 steps). 64 tokens per article to fit the grid in about an
# hour on a 2-core CPU; per-peer adapters and merged models are not kept (only tables and plots).
set -euo pipefail
cd "$(dirname "$0")/.."
D2ORA=${D2ORA:-.venv/bin/d2ora}
OUT=experiments/bbc_news
COMMON=(--set run.rounds=4 --set run.local_steps=10 --set optim.batch_size=16 --set optim.lr=2e-3 --set data.max_length=64
        --set data.max_test_samples=200 --set run.eval_every=2 --set run.save_adapters=false --set run.save_merged=false)

for alpha in 0.5 0.1; do
  "$D2ORA" compare --mixers local,d2ora,decaf,dimat,fedavg,centralized "${COMMON[@]}" \
    --set data.dirichlet_alpha=$alpha --set network.topology=ring -o "$OUT/alpha$alpha-ring"
done
"$D2ORA" compare --mixers d2ora,decaf,dimat "${COMMON[@]}" \
  --set data.dirichlet_alpha=0.5 --set network.topology=complete -o "$OUT/alpha0.5-complete"
for spec in "dora 4" "lora 8" "lora 4"; do
  set -- $spec
  "$D2ORA" simulate --mixer decaf "${COMMON[@]}" --set data.dirichlet_alpha=0.5 --set adapter.use_dora=$([ "$1" = dora ] && echo true || echo false) --set adapter.r=$2 \
    -o "$OUT/alpha0.5-ring-decaf-$1-r$2"
done
# More gossip per round at strong skew: 4 mixing steps per round (4x the bytes of one).
"$D2ORA" simulate --mixer decaf "${COMMON[@]}" --set data.dirichlet_alpha=0.1 --set network.mixing_steps=4 \
  -o "$OUT/alpha0.1-ring-decaf-4gossip"
