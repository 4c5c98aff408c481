"""Scoring hosted peers (each on the test set and on its own validation split) and collecting
the layer inputs DIMAT matches on. The consensus model is ``engine.monitor``'s job."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from d2ora.data.tasks import Batch, Task
from d2ora.engine.peers import PeerModel
from d2ora.mixers.base import LayerInputs
from d2ora.models import base_autocast


def evaluate_peers(
    peer_model: PeerModel, task: Task, batches: Iterable[Batch], device: torch.device | str,
    peers: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """``task.evaluate`` of each peer's own model on the same batches (one peer served at a time).

    Peers whose adapters are bitwise identical (every peer before training; every peer after a
    FedAvg round) are scored once: evaluation runs in eval mode, so the scores are the same, and a
    round-0 evaluation of P peers costs one."""
    batches = list(batches)
    chosen = list(range(peer_model.peers) if peers is None else peers)
    flat = peer_model.flat()
    scored: list[tuple[int, dict[str, float]]] = []  # (representative peer, its scores)
    results = []
    for k in chosen:
        twin = next((scores for rep, scores in scored if torch.equal(flat[rep], flat[k])), None)
        if twin is None:
            with peer_model.serving(slice(k, k + 1)) as model, base_autocast(model, device):
                twin = task.evaluate(model, batches, device)
            scored.append((k, twin))
        results.append(dict(twin))
    return results


def evaluate_each_on_own(
    peer_model: PeerModel, task: Task, own_batches: Sequence[list[Batch]], device: torch.device | str
) -> list[dict[str, float] | None]:
    """Peer k's model on peer k's own batches (its local validation split); None for an empty one.

    Generative accuracy (sft) is left to the shared test set: greedy decoding costs about a second an
    example on a CPU, and the own-split score is a second view of the same model, so here it is the
    task's loss-based metric alone."""
    scoring = task.loss_metrics_only()
    results: list[dict[str, float] | None] = []
    for k, batches in enumerate(own_batches):
        if not batches:
            results.append(None)
            continue
        with peer_model.serving(slice(k, k + 1)) as model, base_autocast(model, device):
            results.append(scoring.evaluate(model, batches, device))
    return results


@torch.no_grad()
def collect_layer_inputs(
    peer_model: PeerModel, batch: Batch, max_tokens: int, seed: int = 0, seeds: Sequence[int] | None = None
) -> LayerInputs:
    """Inputs every adapted layer sees on a peer-major ``batch`` (each peer's own examples through
    its own model), keeping at most ``max_tokens`` non-padding tokens per peer and layer (a sample
    seeded per peer by ``seeds[k]``, default ``seed + k``, so it does not depend on which other
    peers share the pass) so memory stays small; indexed ``(stack row, layer)``."""
    peers = peer_model.peers
    mask = batch["attention_mask"].bool().reshape(peers, -1)
    seeds = [seed + k for k in range(peers)] if seeds is None else list(seeds)
    keep = []
    for k in range(peers):
        positions = torch.nonzero(mask[k].cpu(), as_tuple=False).flatten()
        if positions.numel() > max_tokens:
            generator = torch.Generator().manual_seed(seeds[k])
            positions = positions[torch.randperm(positions.numel(), generator=generator)[:max_tokens]]
        keep.append(positions.to(mask.device))
    captured: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def grab(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(peers, -1, args[0].shape[-1])
            if x.shape[1] == mask.shape[1]:  # one row per token: keep the sampled real tokens
                captured[name] = [x[k, keep[k]].detach() for k in range(peers)]
            else:  # one row per example (e.g. BERT's pooler): every row is real
                captured[name] = [x[k, :max_tokens].detach() for k in range(peers)]

        return grab

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in peer_model.layers.items()]
    model = peer_model.model
    was_training = model.training
    model.eval()
    try:
        with peer_model.serving(slice(0, peers)):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    def layer_inputs(peer: int, layer: str) -> torch.Tensor:
        return captured[layer][peer]

    return layer_inputs

