"""Neighbourhoods from a mixing matrix: who sends to whom, and receivers batched by degree.

The runtimes read only the rows of the peers they host; :func:`mix_stacks` applies a rule to every
peer of a ``(P, ...)`` stack at once (one process hosting all peers: what the tests and the
benchmarks use to call a mixer on a whole graph).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from d2ora.mixers.base import LayerInputs, LayerStack, Mixer, MixOutput, Neighbourhoods


def closed_neighbourhood(row: torch.Tensor, peer: int) -> list[int]:
    """Peers j with ``row[j] != 0``, ascending; the peer itself must be among them (a peer always
    keeps a share of its own adapter, and DIMAT aligns to it)."""
    nbrs = torch.nonzero(row != 0, as_tuple=False).flatten().tolist()
    if peer not in nbrs:
        raise ValueError(f"row {peer} of the mixing matrix gives peer {peer} no weight on its own adapter")
    return nbrs


def degree_groups(weights: torch.Tensor, receivers: Sequence[int],
                  holds: Callable[[int, int], bool] | None = None) -> list[tuple[list[int], list[list[int]]]]:
    """``receivers`` grouped by closed-neighbourhood size (first-seen order): each group is
    ``(receivers, their neighbourhoods)``, one batched mixer call. ``holds(j, i)``: whether
    receiver i holds neighbour j's adapter (a message the trust layer rejected is not held); the
    receiver itself always is."""
    groups: dict[int, tuple[list[int], list[list[int]]]] = {}
    for i in receivers:
        nbrs = closed_neighbourhood(weights[i], i)
        if holds is not None:
            nbrs = [j for j in nbrs if j == i or holds(j, i)]
        members, hoods = groups.setdefault(len(nbrs), ([], []))
        members.append(i)
        hoods.append(nbrs)
    return list(groups.values())


def gather_stack(stack: LayerStack, index: torch.Tensor) -> LayerStack:
    """Rows ``index`` (any shape) of a (P, ...) stack: (*index.shape, ...)."""
    return LayerStack(
        lora_a=stack.lora_a[index],
        lora_b=stack.lora_b[index],
        magnitude=None if stack.magnitude is None else stack.magnitude[index],
        scaling=stack.scaling,
    )


def mix_stacks(
    mixer: Mixer,
    layers: dict[str, LayerStack],
    weights: torch.Tensor,
    dense: dict[str, torch.Tensor] | None = None,
    layer_inputs: LayerInputs | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> MixOutput:
    """Every peer of ``(P, ...)`` stacks mixed by ``mixer`` with the (P, P) matrix ``weights``
    (row i: peer i's weights), one call per neighbourhood size; returns (P, ...) stacks.
    ``layer_inputs(peer, layer)`` is indexed by global peer; ``base_weights``: W0 per layer."""
    dense = dense or {}
    peers = weights.shape[0]
    if weights.shape != (peers, peers):
        raise ValueError(f"mixing matrix has shape {tuple(weights.shape)}, expected square")
    counts = {s.lora_a.shape[0] for s in layers.values()} | {t.shape[0] for t in dense.values()}
    if counts - {peers}:
        raise ValueError(f"mixing matrix is ({peers}, {peers}) but the stacks hold {sorted(counts)} peers")
    out_layers: dict[str, dict[str, torch.Tensor | None]] = {
        name: {"lora_a": torch.empty_like(s.lora_a), "lora_b": torch.empty_like(s.lora_b),
               "magnitude": None if s.magnitude is None else torch.empty_like(s.magnitude)}
        for name, s in layers.items()
    }
    out_dense = {name: torch.empty_like(t) for name, t in dense.items()}
    for receivers, hoods in degree_groups(weights, range(peers)):
        index = torch.tensor(hoods)  # (g, k)
        rows = torch.tensor(receivers)
        own = torch.tensor([h.index(i) for i, h in zip(receivers, hoods)])
        local_inputs = None
        if layer_inputs is not None:
            def local_inputs(row: int, layer: str, _receivers: list[int] = receivers) -> torch.Tensor:
                return layer_inputs(_receivers[row], layer)
        hood = Neighbourhoods(
            layers={name: gather_stack(s, index) for name, s in layers.items()},
            dense={name: t[index] for name, t in dense.items()},
            weights=weights[rows.unsqueeze(-1), index], own=own, layer_inputs=local_inputs,
            base_weights=base_weights,
        )
        mixed = mixer.mix(hood)
        for name, stack in mixed.layers.items():
            target = out_layers[name]
            target["lora_a"][rows] = stack.lora_a.to(target["lora_a"].dtype)
            target["lora_b"][rows] = stack.lora_b.to(target["lora_b"].dtype)
            if target["magnitude"] is not None:
                target["magnitude"][rows] = stack.magnitude.to(target["magnitude"].dtype)
        for name, value in mixed.dense.items():
            out_dense[name][rows] = value.to(out_dense[name].dtype)
    return MixOutput(
        layers={name: LayerStack(t["lora_a"], t["lora_b"], t["magnitude"], layers[name].scaling) for name, t in out_layers.items()},
        dense=out_dense,
    )
