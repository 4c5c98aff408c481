"""Scoring peers: each peer's own model, the consensus (averaged) model, and DIMAT's activations.

The consensus model is what the peers would agree on if they all talked to everybody once: the
run's own mixer applied with uniform weights over every peer (DeCAF: the SVD-truncated mean of the
products; DIMAT: the aligned mean; D²ORA / FedAvg: the mean of m, B, A). A run without
communication (``local``) is scored by the plain mean of the local adapters, which is the
original "train, then aggregate once" design.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from d2ora.data.tasks import Batch, Task
from d2ora.engine.peers import PeerModel
from d2ora.mixers import D2oraMixer, LocalMixer, Mixer, MixOutput

LayerInputs = Callable[[int, str], torch.Tensor]


def evaluate_peers(
    peer_model: PeerModel, task: Task, batches: Iterable[Batch], device: torch.device | str,
    peers: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """``task.evaluate`` of each peer's own model on the same batches (one peer served at a time)."""
    batches = list(batches)
    chosen = range(peer_model.peers) if peers is None else peers
    results = []
    for k in chosen:
        with peer_model.serving(slice(k, k + 1)) as model:
            results.append(task.evaluate(model, batches, device))
    return results


def evaluate_each_on_own(
    peer_model: PeerModel, task: Task, own_batches: Sequence[list[Batch]], device: torch.device | str
) -> list[dict[str, float] | None]:
    """Peer k's model on peer k's own batches (its local validation split); None for an empty one."""
    results: list[dict[str, float] | None] = []
    for k, batches in enumerate(own_batches):
        if not batches:
            results.append(None)
            continue
        with peer_model.serving(slice(k, k + 1)) as model:
            results.append(task.evaluate(model, batches, device))
    return results


def consensus_rule(mixer: Mixer) -> Mixer:
    """The rule that builds the consensus model for a run mixed by ``mixer``."""
    return D2oraMixer() if isinstance(mixer, LocalMixer) else mixer


def consensus_output(peer_model: PeerModel, mixer: Mixer, layer_inputs: LayerInputs | None = None) -> MixOutput:
    """Row 0: every peer's adapter mixed with uniform weights 1/P (the consensus model, seen from
    peer 0's basis for DIMAT). Other rows keep their own adapter (identity rows), so a per-peer
    rule like DIMAT aligns P neighbours once instead of P² times."""
    peers = peer_model.peers
    dtype = next(iter(peer_model.layers.values())).lora_A.dtype
    weights = torch.eye(peers, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weights[0] = 1.0 / peers
    rule = consensus_rule(mixer)
    return rule.mix(peer_model.mix_input(weights, layer_inputs if rule.needs_layer_inputs else None))


@contextlib.contextmanager
def applied(peer_model: PeerModel, out: MixOutput) -> Iterator[PeerModel]:
    """Temporarily write ``out`` into the stacks; the peers' own adapters come back afterwards."""
    saved = [p.detach().clone() for p in peer_model.stacked_parameters()]
    peer_model.apply(out)
    try:
        yield peer_model
    finally:
        with torch.no_grad():
            for param, value in zip(peer_model.stacked_parameters(), saved):
                param.copy_(value)


@torch.no_grad()
def collect_layer_inputs(
    peer_model: PeerModel, batch: Batch, max_tokens: int, seed: int = 0
) -> LayerInputs:
    """Inputs every adapted layer sees on a peer-major ``batch`` (each peer's own examples through
    its own model), keeping at most ``max_tokens`` non-padding tokens per peer and layer (a seeded
    sample) so memory stays small; the result is what ``DimatMixer`` reads as ``layer_inputs``."""
    peers = peer_model.peers
    mask = batch["attention_mask"].bool().reshape(peers, -1)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(peers):
        positions = torch.nonzero(mask[k].cpu(), as_tuple=False).flatten()
        if positions.numel() > max_tokens:
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

