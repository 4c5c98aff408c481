"""``LinkExchange``: the :class:`~d2ora.engine.exchange.Exchange` of one peer over its :class:`PeerLink`.

One process hosts one peer (one organisation). Every gossip step it sends its flat adapter, at the
wire dtype, to each out-neighbour as one frame ``(round, slot = gossip step or extra slot)``, then
waits at most ``round_timeout_s`` for the in-neighbours' frames. A neighbour that misses the
deadline (slow, crashed, gone) is simply absent from the :class:`~d2ora.engine.exchange.Inbox`:
``Mixing.mix`` renormalises the receiver's row over what it holds, exactly as for a message the
trust layer rejects. Every absence is kept (who, round, slot, why) in :attr:`LinkExchange.absences`
so the run's metrics and summary can say it. The run goes on.

A peer that comes back (``d2ora peer --resume``) learns the run's current round from the first
messages its neighbours send it (:meth:`LinkExchange.newest_round`), takes that round's messages
without sending (:attr:`LinkExchange.listen_only`), then sends the mix it took without waiting for
anything (:attr:`LinkExchange.send_only`): see :mod:`d2ora.recipes.p2p_peer`.

Payload = the adapter's raw bytes at the wire dtype, then ``attachment_bytes`` bytes (the trust
layer's signed envelope, zero-padded as :class:`~d2ora.distributed.exchange.DistributedExchange`
does). The frame header (:mod:`d2ora.p2p.frame`) already names sender, round and slot, and the
link checks the sender against its TLS certificate, so no second header is needed here; the
length is checked before the bytes are read as a tensor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import grpc
import torch

from d2ora.engine.exchange import Attachments, Inbox, Payloads, Routes, wire_itemsize
from d2ora.p2p.frame import HEADER_BYTES
from d2ora.p2p.link import PeerLink


@dataclass(frozen=True)
class Absence:
    """A neighbour's message this peer mixed without: whose, which round and slot, and why."""

    peer: int
    round: int
    slot: int
    reason: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def tensor_bytes(payload: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a flat tensor (bf16 too, which numpy cannot hold)."""
    return payload.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class LinkExchange:
    """The exchange of the one peer ``link.peer`` this process hosts."""

    def __init__(self, routes: Routes, link: PeerLink, layout_dtype: torch.dtype, wire_dtype: torch.dtype | None = None,
                 *, round_timeout_s: float, attachment_bytes: int = 0) -> None:
        if round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s must be positive, got {round_timeout_s}")
        self.link = link
        self.peer = link.peer
        self.hosted = [link.peer]
        self.layout_dtype = layout_dtype
        self.wire_dtype = wire_dtype or layout_dtype
        self.round_timeout_s = round_timeout_s
        #: Bytes every message carries after its payload (the trust layer's envelope).
        self.attachment_bytes = attachment_bytes
        self.out_neighbours = routes.out_neighbours(self.peer)
        self.in_neighbours = routes.in_neighbours(self.peer)
        #: Every message this peer mixed without, in the order noticed.
        self.absences: list[Absence] = []
        #: neighbour -> the last round a message of it arrived (0: none yet).
        self.last_heard: dict[int, int] = {j: 0 for j in self.in_neighbours}
        self._in_flight: list[tuple[int, grpc.Future]] = []  # (to, call) not known to be finished, until flush
        self._round = 0
        #: A round in which this peer's exchange only receives / only sends (the round it rejoins in:
        #: it listens first, mixes, then sends what it took).
        self.listen_only: int | None = None
        self.send_only: int | None = None

    def newest_round(self, after: int, deadline_s: float) -> int | None:
        """The newest round after ``after`` an in-neighbour has sent this peer a first gossip step's
        message for, waiting at most ``deadline_s`` seconds for one (None if none came)."""
        return self.link.inbox.newest_round(self.in_neighbours, after, 0, deadline_s)

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` in all for the sends still in flight (the last round's, before the
        link closes and would cancel them); how many failed or were not waited for (the link logs
        each). Sends to a neighbour absent in this peer's last round are not waited for: it is gone."""
        give_up = time.monotonic() + timeout_s
        gone = {a.peer for a in self.absences_in(self._round)}
        failed = 0
        for to, call in self._in_flight:
            if to in gone and not call.done():
                failed += 1
                continue
            try:
                call.result(timeout=max(give_up - time.monotonic(), 0.0))
            except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                failed += 1
        self._in_flight.clear()
        return failed

    def absences_in(self, round_index: int) -> list[Absence]:
        return [a for a in self.absences if a.round == round_index]

    def returned(self) -> Iterator[dict[str, int]]:
        """Neighbours absent for a stretch of rounds and heard again after it:
        ``{peer, absent_from_round, absent_to_round, back_in_round}``, one per stretch."""
        by_peer: dict[int, list[int]] = {}
        for a in self.absences:
            by_peer.setdefault(a.peer, []).append(a.round)
        for peer, rounds in sorted(by_peer.items()):
            stretch: list[int] = []
            for rnd in sorted(set(rounds)) + [None]:  # a sentinel closes the last stretch
                if stretch and (rnd is None or rnd != stretch[-1] + 1):
                    if self.last_heard.get(peer, 0) > stretch[-1]:
                        yield {"peer": peer, "absent_from_round": stretch[0], "absent_to_round": stretch[-1],
                               "back_in_round": stretch[-1] + 1}
                    stretch = []
                if rnd is not None:
                    stretch.append(rnd)

    def departed(self, rounds: int) -> Iterator[dict[str, int]]:
        """Neighbours silent from some round to the end: ``{peer, last_heard_round, absent_from_round}``."""
        for peer, last in sorted(self.last_heard.items()):
            if last < rounds and any(a.peer == peer and a.round > last for a in self.absences):
                yield {"peer": peer, "last_heard_round": last, "absent_from_round": last + 1}

    def _attachment(self, attachments: Attachments | None, pair: tuple[int, int]) -> bytes:
        data = (attachments or {}).get(pair, b"")
        if len(data) > self.attachment_bytes:
            raise ValueError(f"attachment of {len(data)} bytes, the link carries {self.attachment_bytes} per message")
        return data + bytes(self.attachment_bytes - len(data))  # a missing attachment arrives as zeros

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox:
        me, numel = self.peer, outgoing.shape[1]
        # Earlier rounds are done: a late frame of theirs is dropped (and refused from now on).
        if self._in_flight and round_index > self._round:  # the earlier round's sends are done or logged by now
            self._in_flight = [(to, call) for to, call in self._in_flight if not call.done()]
        self._round = round_index
        self.link.drop_before(round_index)
        size = numel * wire_itemsize(self.layout_dtype, self.wire_dtype)
        inbox = Inbox(payload_bytes={me: 0})
        own: bytes | None = None
        for i in ([] if self.listen_only == round_index else self.out_neighbours):
            replaced = payloads.get((me, i)) if payloads else None
            if replaced is None:
                if own is None:
                    own = tensor_bytes(outgoing[0].to(self.wire_dtype))
                body = own
            else:  # a fixed size, as on the torch.distributed wire: a wrong length shows in the signed envelope
                flat = replaced.reshape(-1)
                flat = flat[:numel] if flat.numel() >= numel else torch.cat([flat, flat.new_zeros(numel - flat.numel())])
                body = tensor_bytes(flat.to(self.wire_dtype))
            frame = body + self._attachment(attachments, (me, i))
            # A future: a neighbour that is gone costs nothing here (the failure is logged when it ends).
            self._in_flight.append((i, self.link.send(i, round_index, step, frame)))
            inbox.payload_bytes[me] += size
            inbox.wire_bytes += HEADER_BYTES + len(frame)
        if self.send_only == round_index:
            return inbox
        received = self.link.receive(self.in_neighbours, round_index, step, self.round_timeout_s)
        for j in received.missing:
            self.absences.append(Absence(j, round_index, step, f"no message within {self.round_timeout_s:g} s"))
        expected = size + self.attachment_bytes
        for j, data in sorted(received.items()):
            self.last_heard[j] = max(self.last_heard[j], round_index)
            if len(data) != expected:
                detail = f"a message of {len(data)} bytes, expected {expected}"
                if self.attachment_bytes:  # under the trust layer: one bad message for its checks to reject
                    inbox.bad_frames[(j, me)] = detail
                else:
                    self.absences.append(Absence(j, round_index, step, detail))
                continue
            payload = torch.frombuffer(bytearray(data[:size]), dtype=torch.uint8).view(self.wire_dtype)
            inbox.messages[(j, me)] = payload.to(device=outgoing.device, dtype=self.layout_dtype)
            if self.attachment_bytes:
                inbox.attachments[(j, me)] = data[size:]
        return inbox
