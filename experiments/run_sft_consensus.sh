#!/usr/bin/env bash
# Issue 18 §4: does decentralized consensus beat training alone on an LLM?
# SmolLM2-135M-Instruct, DoRA r = 8 on all linear layers, the BBC News "which section?" instruction
# task (configs/sft_default.yaml), peers on a ring with Dirichlet α = 0.5 over sections; every
# method sees the same samples (centralized: one peer, P x the batch, the same steps). Metrics on a
# shared test set: answer perplexity and generative accuracy (greedy answers).
#
# The issue's target setting is 8 peers and seeds 0,1,2 (PEERS=8 SEEDS=0,1,2, the default here):
# 6 methods x 3 seeds at about 10 minutes a run on a 2-core CPU, so it takes several sessions; a rerun
# skips finished runs (compare --skip-done). PEERS=4 SEEDS=0 is the smaller study this session ran.
#
#   PEERS=4 SEEDS=0 experiments/run_sft_consensus.sh              # into experiments/sft_consensus_4peers
#   experiments/run_sft_consensus.sh                              # the target: experiments/sft_consensus_8peers
set -euo pipefail
cd "$(dirname "$0")/.."
D2ORA=${D2ORA:-.venv/bin/d2ora}
PEERS=${PEERS:-8}
SEEDS=${SEEDS:-0,1,2}
MIXERS=${MIXERS:-local,decaf,d2ora,dora_exact,centralized}
SUSPECTS=${SUSPECTS:-outer_nesterov,decaf_qgm}
OUT=experiments/sft_consensus_${PEERS}peers
COMMON=(--config configs/sft_default.yaml --seeds "$SEEDS"
  --set network.peers="$PEERS" --set run.rounds=4 --set run.local_steps=5 --set run.eval_every=4
  --set run.eval_peers=true --set data.max_test_samples=40 --set run.generate_examples=40
  --set data.max_train_samples=null --set run.save_adapters=false --set run.save_merged=false --set run.tensorboard=false)
# The mixers, local-only and centralized on the same partition and seeds (MIXERS=none: the suspects alone).
[[ "$MIXERS" != none ]] && "$D2ORA" compare --mixers "$MIXERS" "${COMMON[@]}" -o "$OUT"
# Suspects, one change each (the same partition and samples):
# averaged AdamW updates shrink the step: DiLoCo / NoLoCo's outer Nesterov step on the gossip average;
[[ ",$SUSPECTS," == *,outer_nesterov,* ]] && "$D2ORA" compare --mixers d2ora "${COMMON[@]}" --set network.mixer=d2ora --set network.outer_optimizer=nesterov -o "$OUT/outer_nesterov"
# the AdamW moment reset after DeCAF's re-basing with few local steps: quasi-global momentum carries it.
[[ ",$SUSPECTS," == *,decaf_qgm,* ]] && "$D2ORA" compare --mixers decaf "${COMMON[@]}" --set network.drift=qgm -o "$OUT/decaf_qgm"
# the ring mixes too slowly for 8 peers (second eigenvalue 0.80 per gossip step, so 4 rounds leave the
# peers 0.42 of their spread apart): three gossip steps per round (3x the bytes) ...
[[ ",$SUSPECTS," == *,more_gossip,* ]] && "$D2ORA" compare --mixers d2ora "${COMMON[@]}" --set network.mixing_steps=3 -o "$OUT/more_gossip"
# ... or shorter rounds: 10 rounds x 2 local steps, the same 20 steps and samples (2.5x the bytes, less drift per round).
[[ ",$SUSPECTS," == *,short_rounds,* ]] && "$D2ORA" compare --mixers d2ora "${COMMON[@]}" --set run.rounds=10 --set run.local_steps=2 --set run.eval_every=10 -o "$OUT/short_rounds"
# the learning rate: averaging 8 peers' AdamW steps taken on batch-2 gradients cancels their noisy
# parts, so the consensus moves about 1/sqrt(8) as far as one Adam step would; 3x the rate makes up
# for it. Centralized at the same rate shows whether the rate alone, not the averaging, was short.
[[ ",$SUSPECTS," == *,higher_lr,* ]] && "$D2ORA" compare --mixers d2ora "${COMMON[@]}" --set optim.lr=3e-3 -o "$OUT/higher_lr"
[[ ",$SUSPECTS," == *,centralized_higher_lr,* ]] && "$D2ORA" compare --mixers centralized "${COMMON[@]}" --set optim.lr=3e-3 -o "$OUT/centralized_higher_lr"
# the budget: 20 steps may be too few for eight peers whose batch-2 AdamW steps partly cancel when
# averaged. Twice the rounds for both (8 x 5 steps; still equal samples seen), consensus scored only.
LONGER=(--set run.rounds=8 --set run.eval_every=8 --set run.eval_peers=false)
[[ ",$SUSPECTS," == *,longer,* ]] && "$D2ORA" compare --mixers d2ora,centralized "${COMMON[@]}" "${LONGER[@]}" -o "$OUT/longer"
# ... and the mean local-only peer at that budget (every peer scored: its own folder, since scoring
# the peers is part of a run's config).
[[ ",$SUSPECTS," == *,longer_local,* ]] && "$D2ORA" compare --mixers local "${COMMON[@]}" "${LONGER[@]}" --set run.eval_peers=true -o "$OUT/longer_local"
# ... and the same two, with DeCAF and dora_exact, on a test set big enough to resolve the 3-point
# target: 150 articles per seed instead of 40 (one seed's standard error about 3 points instead of
# 6); consensus scored only.
BIGTEST=(--set data.max_test_samples=150 --set run.generate_examples=150)
[[ ",$SUSPECTS," == *,longer_bigtest,* ]] && "$D2ORA" compare --mixers decaf,d2ora,dora_exact,centralized "${COMMON[@]}" "${LONGER[@]}" "${BIGTEST[@]}" -o "$OUT/longer_bigtest"
exit 0
