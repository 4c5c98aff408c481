"""One round, for whatever block of peers a process hosts: T local steps, then ``mixing_steps``
exchanges and mixes, then what the plan's hooks do after the mix (drift corrections, the moment
reset when a mixer re-based the factors; :mod:`d2ora.engine.hooks`).

This is the only round code: the simulator (one process hosting all P peers, an in-memory
exchange) and ``d2ora peer`` under torchrun (N processes hosting P/N peers each, a
torch.distributed exchange) both call :func:`run_round`. Each receiver's mix sees only its own
adapter, its in-neighbours' messages and its own row of weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from d2ora.engine.exchange import Exchange, Inbox
from d2ora.engine.hooks import RoundHook, extra_slot
from d2ora.engine.host import PeerHost
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.share import SharePolicy
from d2ora.mixers.base import LayerInputs, Mixer, Neighbourhoods
from d2ora.mixers.d2ora import D2oraMixer
from d2ora.mixers.graph import degree_groups

#: Receivers mixed per call are chunked so that their (g, k, numel) neighbourhood buffer stays
#: below this many values (a complete graph of 64 peers would otherwise stack 64² adapters).
MAX_NEIGHBOURHOOD_VALUES = 64 * 1024 * 1024


class DivergedError(RuntimeError):
    """A peer's training loss became NaN or infinite; the rounds logged so far stay on disk."""


@dataclass(frozen=True)
class RoundPlan:
    """What every round of a run does (the same in every process), fixed for the run."""

    local_steps: int
    mixing_steps: int  # 0: no communication (local training, centralized)
    mixing: Mixing  # the model's mix after each gossip step
    linear: Mixing  # how hooks' extra payloads are mixed: linearly, same weights and share mask
    hooks: tuple[RoundHook, ...] = ()  # in the order they are called (d2ora.engine.hooks)
    sequential: bool = False


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


def neighbours_only(weights: torch.Tensor, own: torch.Tensor, receivers: Sequence[int]) -> torch.Tensor:
    """``(g, k)`` rows of mixing weights with each receiver's own entry moved onto its neighbours in
    proportion (each row keeps its sum); ValueError naming a receiver that holds no neighbour's message."""
    rows = torch.arange(len(own))
    kept = weights.clone()
    kept[rows, own] = 0
    sums = kept.sum(1)
    lonely = [receivers[r] for r in torch.nonzero(sums <= 0).flatten().tolist()]
    if lonely:
        raise ValueError(f"peer(s) {lonely} hold no neighbour's message to mix without their own adapter")
    return kept * (weights.sum(1) / sums).unsqueeze(1)


class Mixing:
    """How a host mixes what it holds after a gossip step, set up once per run: the rule, the
    mixing weights, the share policy, the frozen W0 (DoRA-exact) and, for an activation-matching
    rule (DIMAT), where each gossip step's layer inputs come from."""

    def __init__(self, host: PeerHost, mixer: Mixer, weights: torch.Tensor, share: SharePolicy) -> None:
        self.host = host
        self.mixer = mixer
        self.weights = weights  # (P, P); a host reads only its receivers' rows
        self.share = share
        self.base_weights = host.peer_model.base_weights()  # frozen: the same tensors all run
        # Drawn per gossip step from (round, step) and each peer's own data, with its current adapter.
        self.layer_inputs: Callable[[tuple[int, int]], LayerInputs] | None = (
            host.layer_inputs if mixer.needs_layer_inputs else None)

    def mix(self, outgoing: torch.Tensor, inbox: Inbox, key: tuple[int, int], *, without_own: bool = False) -> torch.Tensor:
        """Each hosted receiver's new flat adapter ``(h, numel)`` from its own adapter (``outgoing``)
        and the in-neighbours' messages it holds, receivers of equal degree in one batched mixer
        call; ``key`` (round, step) draws DIMAT's layer-input batch. ``without_own``: the receiver's
        own adapter gets no weight (a peer that rejoins takes its neighbours' mix; it is still the
        reference a re-basing or aligning rule works against)."""
        host, layout, mixer = self.host, self.host.layout, self.mixer
        inputs = self.layer_inputs(key) if self.layer_inputs is not None else None
        new = outgoing.clone()
        # Receivers batched by how many adapters they hold: a rejected message is not in the inbox.
        for members, hoods in degree_groups(self.weights, host.peer_ids, holds=lambda j, i: (j, i) in inbox.messages):
            for receivers, nbrs in _chunks(members, hoods, layout.numel):
                flat = torch.stack([
                    torch.stack([outgoing[host.local(j)] if j == i else inbox.messages[(j, i)].to(outgoing.device) for j in hood])
                    for i, hood in zip(receivers, nbrs)
                ])  # (g, k, numel)
                layers, dense = layout.unflatten(flat)
                weights = torch.stack([held_weights(self.weights, i, hood) for i, hood in zip(receivers, nbrs)])
                own = torch.tensor([hood.index(i) for i, hood in zip(receivers, nbrs)])
                if without_own:
                    weights = neighbours_only(weights, own, receivers)
                layer_inputs = None
                if inputs is not None:
                    def layer_inputs(row: int, layer: str, _receivers: list[int] = receivers) -> torch.Tensor:
                        return inputs(_receivers[row], layer)
                out = mixer.mix(Neighbourhoods(layers=layers, dense=dense, weights=weights, own=own,
                                               layer_inputs=layer_inputs, base_weights=self.base_weights))
                new[[host.local(i) for i in receivers]] = layout.flatten_stacks(out.layers, out.dense).to(new.dtype)
        return self.share.keep_own(new, outgoing)  # the parts a peer keeps are its own, bit for bit


class ResetFactorMoments(RoundHook):
    """After a mixer re-based A and B (DeCAF, DoRA-exact), AdamW's moments for them describe other
    coordinates: forget them (:meth:`LocalTrainer.reset_factor_moments`)."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer

    def after_mix(self, sent: Sequence[torch.Tensor], mixed: Sequence[torch.Tensor]) -> None:
        self.trainer.reset_factor_moments()


def make_plan(host: PeerHost, mixer: Mixer, weights: torch.Tensor, *, local_steps: int, mixing_steps: int,
              share: SharePolicy, hooks: Sequence[RoundHook] = (), sequential: bool = False) -> RoundPlan:
    """The run's round: ``hooks`` (the drift correction) in their order, then the moment reset
    when ``mixer`` re-bases the factors."""
    chain = [*hooks, *([ResetFactorMoments(host.trainer)] if mixer.factors_replaced else [])]
    return RoundPlan(local_steps=local_steps, mixing_steps=mixing_steps, mixing=Mixing(host, mixer, weights, share),
                     linear=Mixing(host, D2oraMixer(), weights, share), hooks=tuple(chain), sequential=sequential)


@dataclass
class Traffic:
    """What a host's gossip steps sent, and how long exchanging and mixing took."""

    payload_bytes: list[int]  # per hosted peer
    wire_bytes: int = 0
    exchange_s: float = 0.0
    mix_s: float = 0.0

    def count(self, inbox: Inbox, peer_ids: range) -> None:
        for k, peer in enumerate(peer_ids):
            self.payload_bytes[k] += inbox.payload_bytes.get(peer, 0)
        self.wire_bytes += inbox.wire_bytes


def local_steps(host: PeerHost, plan: RoundPlan, round_index: int,
                on_step: Callable[[torch.Tensor], None] | None) -> tuple[torch.Tensor, list[int]]:
    """``plan.local_steps`` AdamW steps of every hosted peer: mean losses ``(h,)`` and examples per peer."""
    hosted = len(host.peer_ids)
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
    return loss_sum / plan.local_steps, samples


def gossip(host: PeerHost, exchange: Exchange, plan: RoundPlan, round_index: int,
           extras: list[torch.Tensor]) -> tuple[list[torch.Tensor], Traffic]:
    """``plan.mixing_steps`` gossip steps: each exchanges the hosted adapters (slot ``step``) and
    then every extra payload (slot :func:`~d2ora.engine.hooks.extra_slot`), then mixes the adapters
    by the run's rule and the payloads linearly. Returns the payloads as mixed, and the traffic."""
    traffic = Traffic(payload_bytes=[0] * len(host.peer_ids))
    steps = plan.mixing_steps
    for step in range(steps):
        tick = time.perf_counter()
        outgoing = host.peer_model.flat()
        inbox = exchange.exchange(outgoing, round_index, step)
        slots = [extra_slot(steps, e, step) for e in range(len(extras))]
        extra_inboxes = [exchange.exchange(payload, round_index, slot) for payload, slot in zip(extras, slots)]
        tock = time.perf_counter()
        host.peer_model.load_flat(plan.mixing.mix(outgoing, inbox, (round_index, step)))
        extras = [plan.linear.mix(payload, box, (round_index, slot)) for payload, box, slot in zip(extras, extra_inboxes, slots)]
        traffic.exchange_s += tock - tick
        traffic.mix_s += time.perf_counter() - tock
        for box in (inbox, *extra_inboxes):
            traffic.count(box, host.peer_ids)
    return extras, traffic


def run_round(host: PeerHost, exchange: Exchange, plan: RoundPlan, round_index: int,
              on_step: Callable[[torch.Tensor], None] | None = None) -> HostRound:
    """Round ``round_index`` (1-based) of the hosted peers; ``on_step(losses)`` after each local step."""
    for hook in plan.hooks:
        hook.begin_round()
    started = time.perf_counter()
    train_loss, samples = local_steps(host, plan, round_index, on_step)
    local_s = time.perf_counter() - started
    traffic = Traffic(payload_bytes=[0] * len(host.peer_ids))
    if plan.mixing_steps:
        sent = [hook.extra_payloads() for hook in plan.hooks]
        mixed, traffic = gossip(host, exchange, plan, round_index, [p for payloads in sent for p in payloads])
        for hook, own in zip(plan.hooks, sent):
            hook.after_mix(own, mixed[: len(own)])
            mixed = mixed[len(own) :]
    return HostRound(
        round=round_index, train_loss=train_loss, samples=samples, payload_bytes=traffic.payload_bytes,
        wire_bytes=traffic.wire_bytes, seconds={"local": local_s, "exchange": traffic.exchange_s, "mix": traffic.mix_s},
    )
