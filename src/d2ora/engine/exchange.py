"""How adapters travel between peers: one interface, wrappable implementations.

Every gossip step each process hands its hosted peers' flat adapters to an :class:`Exchange` and
gets back an :class:`Inbox`: the message of every in-neighbour of every hosted receiver, keyed
``(sender, receiver)``. :class:`InMemoryExchange` serves a process that hosts every peer (the
simulator); ``d2ora.distributed.exchange`` moves the messages between processes with
torch.distributed. A trust layer wraps either one (checking each message before the round sees it).

The wire dtype is applied in both, so a ``wire_dtype: bf16`` simulation rounds every message
exactly as a process run would; mixing itself always runs in at least fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from d2ora.mixers.graph import closed_neighbourhood

WIRE_DTYPES: dict[str, torch.dtype | None] = {"native": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Routes:
    """Who sends to whom, from the mixing matrix: j sends to i when ``W[i, j] != 0`` and ``i != j``."""

    weights: torch.Tensor  # (P, P), row i: peer i's weights

    @property
    def peers(self) -> int:
        return self.weights.shape[0]

    def in_neighbours(self, receiver: int) -> list[int]:
        return [j for j in closed_neighbourhood(self.weights[receiver], receiver) if j != receiver]

    def out_neighbours(self, sender: int) -> list[int]:
        column = self.weights[:, sender]
        return [i for i in torch.nonzero(column != 0, as_tuple=False).flatten().tolist() if i != sender]


@dataclass
class Inbox:
    """What one process received in one gossip step."""

    #: (sender, receiver) -> the sender's flat adapter (numel,), decoded to the layout dtype.
    messages: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    #: hosted sender -> payload bytes it sent (every message counted, in memory or on the wire).
    payload_bytes: dict[int, int] = field(default_factory=dict)
    #: bytes this process put on the wire (payload + headers of messages to other processes).
    wire_bytes: int = 0
    #: (sender, receiver) -> the bytes attached to that message (the trust layer's signed envelope).
    attachments: dict[tuple[int, int], bytes] = field(default_factory=dict)
    #: (sender, receiver) -> why a transport could not decode that message (it is not in ``messages``).
    bad_frames: dict[tuple[int, int], str] = field(default_factory=dict)


#: Per-message extras a wrapper (the trust layer) hands a transport, keyed (sender, receiver).
Attachments = Mapping[tuple[int, int], bytes]
Payloads = Mapping[tuple[int, int], torch.Tensor]


class Exchange(Protocol):
    """Moves one gossip step's messages. ``outgoing`` is ``(len(hosted), numel)``, row k the adapter
    of peer ``hosted[k]``; ``round_index`` and ``step`` identify the step (headers, signatures).

    Optional, for wrappers: ``attachments`` are bytes that travel with a message and come back in
    ``Inbox.attachments`` (a transport built with ``attachment_bytes=n`` carries exactly n per
    message); ``payloads`` replaces what one sender sends one receiver (a Byzantine peer sending
    each neighbour something else; a transport with fixed-size buffers pads or cuts a replacement
    of the wrong length, which the receiver's checks then see)."""

    hosted: Sequence[int]

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox: ...


def wire_round_trip(payload: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """What a receiver holds after ``payload`` crossed the wire (no copy when nothing changes)."""
    if wire_dtype is None or wire_dtype == payload.dtype:
        return payload
    return payload.to(wire_dtype).to(payload.dtype)


def wire_itemsize(layout_dtype: torch.dtype, wire_dtype: torch.dtype | None) -> int:
    return torch.empty(0, dtype=wire_dtype or layout_dtype).element_size()


def local_inbox(outgoing: torch.Tensor, hosted: Sequence[int], pairs: Sequence[tuple[int, int]],
                wire_dtype: torch.dtype | None, attachments: Attachments | None = None,
                payloads: Payloads | None = None) -> Inbox:
    """The messages between peers of one process: ``(sender, receiver)`` pairs served from the rows
    of ``outgoing`` (never leaving memory), each counted as sent at the wire dtype's size."""
    row = {peer: k for k, peer in enumerate(hosted)}
    size = outgoing.shape[1] * wire_itemsize(outgoing.dtype, wire_dtype)
    inbox = Inbox(payload_bytes={j: 0 for j in hosted})
    for j, i in pairs:
        payload = payloads.get((j, i), outgoing[row[j]]) if payloads else outgoing[row[j]]
        inbox.messages[(j, i)] = wire_round_trip(payload, wire_dtype)
        inbox.payload_bytes[j] += size
        if attachments and (j, i) in attachments:
            inbox.attachments[(j, i)] = attachments[(j, i)]
    return inbox


class InMemoryExchange:
    """Every receiver's in-neighbours live in this process: messages are rows of ``outgoing``."""

    def __init__(self, routes: Routes, hosted: Sequence[int], wire_dtype: torch.dtype | None = None) -> None:
        self.hosted = list(hosted)
        self.wire_dtype = wire_dtype
        self.pairs = [(j, i) for i in self.hosted for j in routes.in_neighbours(i)]
        for i in self.hosted:
            missing = [j for j in routes.in_neighbours(i) if j not in self.hosted]
            if missing:
                raise ValueError(f"peer {i} receives from peers {missing}, which this process does not host")

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox:
        return local_inbox(outgoing, self.hosted, self.pairs, self.wire_dtype, attachments, payloads)
