"""One round, for whatever block of peers a process hosts: T local steps, then ``mixing_steps``
exchanges and mixes, then the moment reset when a mixer re-based the factors.

This is the only round code: the simulator (one process hosting all P peers, an in-memory
exchange) and ``d2ora peer`` under torchrun (N processes hosting P/N peers each, a
torch.distributed exchange) both call :func:`run_round`. Each receiver's mix sees only its own
adapter, its in-neighbours' messages and its own row of weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from d2ora.engine.exchange import Exchange, Inbox
from d2ora.engine.host import PeerHost
from d2ora.engine.share import shared_mask
from d2ora.mixers.base import Mixer, Neighbourhoods
from d2ora.mixers.d2ora import D2oraMixer
from d2ora.mixers.graph import degree_groups

#: Receivers mixed per call are chunked so that their (g, k, numel) neighbourhood buffer stays
#: below this many values (a complete graph of 64 peers would otherwise stack 64² adapters).
MAX_NEIGHBOURHOOD_VALUES = 64 * 1024 * 1024


class DivergedError(RuntimeError):
    """A peer's training loss became NaN or infinite; the rounds logged so far stay on disk."""


@dataclass(frozen=True)
class RoundPlan:
    """What every round of a run does (the same in every process)."""

    mixer: Mixer
    weights: torch.Tensor  # (P, P); a host reads only its receivers' rows
    local_steps: int
    mixing_steps: int  # 0: no communication (local training, centralized)
    sequential: bool = False
    share: str = "all"  # what travels (d2ora.engine.share); the other parts are kept as they are


@dataclass
class HostRound:
    """One round as one host saw it: its own peers only."""

    round: int
    train_loss: torch.Tensor  # (h,), mean over the local steps
    samples: list[int]  # per hosted peer, examples trained on this round
    payload_bytes: list[int]  # per hosted peer, bytes of the messages it sent
    wire_bytes: int  # bytes this process put on the wire (payload + headers), for the benchmark
    seconds: dict[str, float] = field(default_factory=dict)  # local / exchange / mix


def check_finite(losses: torch.Tensor, host: PeerHost, round_index: int) -> None:
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        peers = [host.peer_ids[k] for k in bad]
        raise DivergedError(
            f"peer(s) {peers} diverged in round {round_index} (training loss {losses[bad[0]].item()}); "
            "lower lr or set max_grad_norm; metrics of the finished rounds are in metrics.jsonl"
        )


def _chunks(members: list[int], hoods: list[list[int]], numel: int) -> list[tuple[list[int], list[list[int]]]]:
    per_receiver = max(1, len(hoods[0]) * numel)
    size = max(1, MAX_NEIGHBOURHOOD_VALUES // per_receiver)
    return [(members[i : i + size], hoods[i : i + size]) for i in range(0, len(members), size)]


def held_weights(weights: torch.Tensor, receiver: int, hood: list[int]) -> torch.Tensor:
    """The receiver's weights over what it holds, rescaled to its full row's sum: a rejected
    neighbour's share is spread over the others in proportion, as if it had not been a neighbour."""
    row = weights[receiver]
    kept = row[hood]
    if int((row != 0).sum()) == len(hood):
        return kept  # nothing missing: the row as it is, not rescaled by a sum that may differ in the last bit
    return kept * (row.sum() / kept.sum())


def mix_received(host: PeerHost, plan: RoundPlan, outgoing: torch.Tensor, inbox: Inbox,
                 key: tuple[int, int]) -> torch.Tensor:
    """Each hosted receiver's new flat adapter ``(h, numel)`` from its own adapter (``outgoing``)
    and the in-neighbours' messages it holds, receivers of equal degree in one batched mixer call."""
    layout = host.layout
    mixer = plan.mixer
    inputs = host.layer_inputs(key) if mixer.needs_layer_inputs else None
    new = outgoing.clone()
    base = host.peer_model.base_weights()
    # Receivers batched by how many adapters they hold: a rejected message is not in the inbox.
    for members, hoods in degree_groups(plan.weights, host.peer_ids, holds=lambda j, i: (j, i) in inbox.messages):
        for receivers, nbrs in _chunks(members, hoods, layout.numel):
            flat = torch.stack([
                torch.stack([outgoing[host.local(j)] if j == i else inbox.messages[(j, i)].to(outgoing.device) for j in hood])
                for i, hood in zip(receivers, nbrs)
            ])  # (g, k, numel)
            layers, dense = layout.unflatten(flat)
            weights = torch.stack([held_weights(plan.weights, i, hood) for i, hood in zip(receivers, nbrs)])
            own = torch.tensor([hood.index(i) for i, hood in zip(receivers, nbrs)])
            layer_inputs = None
            if inputs is not None:
                def layer_inputs(row: int, layer: str, _receivers: list[int] = receivers) -> torch.Tensor:
                    return inputs(_receivers[row], layer)
            out = mixer.mix(Neighbourhoods(layers=layers, dense=dense, weights=weights, own=own, layer_inputs=layer_inputs,
                                           base_weights=base))
            new[[host.local(i) for i in receivers]] = layout.flatten_stacks(out.layers, out.dense).to(new.dtype)
    if plan.share != "all":  # the parts a peer keeps are its own, bit for bit, whatever the rule did
        kept = ~shared_mask(layout, plan.share).to(new.device)
        new[:, kept] = outgoing[:, kept]
    return new


def run_round(host: PeerHost, exchange: Exchange, plan: RoundPlan, round_index: int,
              on_step: Callable[[torch.Tensor], None] | None = None) -> HostRound:
    """Round ``round_index`` (1-based) of the hosted peers; ``on_step(losses)`` after each local step."""
    hosted = len(host.peer_ids)
    correction = host.trainer.correction
    if correction is not None:
        correction.begin_round()
    started = time.perf_counter()
    loss_sum = torch.zeros(hosted)
    samples = [0] * hosted
    for _ in range(plan.local_steps):
        losses, seen = host.local_step(plan.sequential)
        check_finite(losses, host, round_index)
        loss_sum += losses
        for k in range(hosted):
            samples[k] += seen // hosted
        if on_step is not None:
            on_step(losses)
    local_s = time.perf_counter() - started
    payload = [0] * hosted
    wire = 0
    exchange_s = mix_s = 0.0
    # K-GT: each peer's local update Δ travels as a second message per gossip step (slots after the
    # model's), mixed linearly with the same weights.
    own_update = mixed_update = correction.local_update() if correction is not None and correction.sends_update else None
    linear = replace(plan, mixer=D2oraMixer())  # how the updates Δ are mixed
    for step in range(plan.mixing_steps):
        tick = time.perf_counter()
        outgoing = host.peer_model.flat()
        inbox = exchange.exchange(outgoing, round_index, step)
        inboxes = [inbox]
        if mixed_update is not None:
            update_inbox = exchange.exchange(mixed_update, round_index, plan.mixing_steps + step)
            inboxes.append(update_inbox)
        tock = time.perf_counter()
        host.peer_model.load_flat(mix_received(host, plan, outgoing, inbox, (round_index, step)))
        if mixed_update is not None:
            mixed_update = mix_received(host, linear, mixed_update, update_inbox, (round_index, plan.mixing_steps + step))
        exchange_s += tock - tick
        mix_s += time.perf_counter() - tock
        for box in inboxes:
            for k, peer in enumerate(host.peer_ids):
                payload[k] += box.payload_bytes.get(peer, 0)
            wire += box.wire_bytes
    if correction is not None and plan.mixing_steps:
        correction.finish_round(own_update, mixed_update)
    if plan.mixing_steps and plan.mixer.factors_replaced:
        host.trainer.reset_factor_moments()
    return HostRound(
        round=round_index, train_loss=loss_sum / plan.local_steps, samples=samples, payload_bytes=payload,
        wire_bytes=wire, seconds={"local": local_s, "exchange": exchange_s, "mix": mix_s},
    )
