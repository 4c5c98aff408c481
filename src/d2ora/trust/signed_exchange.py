"""The trust layer around any transport: sign what goes out, check what comes in.

:class:`SignedExchange` is an :class:`~d2ora.engine.exchange.Exchange` wrapping another one (the
simulator's in-memory exchange or the torchrun one). For every message a hosted peer sends it
builds an envelope (:mod:`d2ora.trust.envelope`) over the bytes that will cross the wire and signs
it with the sender's key; the transport carries the envelope beside the payload. Every message a
hosted peer receives goes through :class:`~d2ora.trust.checks.MessageChecker` before the round sees
it: only accepted messages reach the mixer, and the round code renormalises the receiver's weights
over what it holds. What each receiver accepted and rejected, and what each sender sent, is kept
for the round's ledger block (:meth:`SignedExchange.take_round`).

Byzantine peers (:mod:`d2ora.trust.attacks`) act here too, on their own outgoing messages only:
the transport and the honest peers' code are the same as in a run without attackers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.engine.exchange import Attachments, Exchange, Inbox, Payloads, Routes
from d2ora.trust.attacks import Adversary
from d2ora.trust.checks import MessageChecker, Verdict
from d2ora.trust.envelope import EnvelopeHeader, payload_digest, seal


@dataclass
class TrustRound:
    """One round of one process, as its ledgers record it."""

    #: hosted receiver -> the envelopes (bytes) it accepted, in the order it accepted them.
    accepted: dict[int, list[bytes]] = field(default_factory=dict)
    #: hosted receiver -> the verdicts of the messages it rejected.
    rejected: dict[int, list[Verdict]] = field(default_factory=dict)
    #: hosted sender -> (gossip step, SHA-256 of the payload it sent its first out-neighbour).
    sent: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"sign": 0.0, "verify": 0.0})


class SignedExchange:
    """Signs and checks every message of the peers this process hosts."""

    def __init__(self, inner: Exchange, *, routes: Routes, keys: Mapping[int, Ed25519PrivateKey],
                 checker: MessageChecker, run_id: bytes, wire_dtype: torch.dtype,
                 ledger_head: Callable[[int], bytes], adversary: Adversary | None = None) -> None:
        self.inner = inner
        self.hosted = list(inner.hosted)
        missing = [p for p in self.hosted if p not in keys]
        if missing:
            raise ValueError(f"no private key for hosted peer(s) {missing}")
        self.routes = routes
        self.keys = keys
        self.checker = checker
        self.run_id = run_id
        self.wire_dtype = wire_dtype
        self.ledger_head = ledger_head
        self.adversary = adversary
        self.current = TrustRound()

    def take_round(self) -> TrustRound:
        """What this round recorded (and start a fresh record)."""
        done, self.current = self.current, TrustRound()
        return done

    def _sign_all(self, outgoing: torch.Tensor, row: dict[int, int], round_index: int, step: int,
                  payloads: Payloads | None) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], torch.Tensor]]:
        replaced: dict[tuple[int, int], torch.Tensor] = dict(payloads or {})
        if self.adversary is not None:
            replaced.update(self.adversary.payloads({j: outgoing[row[j]] for j in self.hosted}, round_index, step))
        digests: dict[int, bytes] = {}  # one hash per sender for the payload every receiver gets
        attachments: dict[tuple[int, int], bytes] = {}
        for sender in self.hosted:
            heads = self.ledger_head(sender)
            own = outgoing[row[sender]]
            for receiver in self.routes.out_neighbours(sender):
                pair = (sender, receiver)
                payload = replaced.get(pair)
                if payload is None:
                    if sender not in digests:
                        digests[sender] = payload_digest(own.to(self.wire_dtype))
                    payload, digest = own, digests[sender]
                else:
                    digest = payload_digest(payload.to(self.wire_dtype))
                header = EnvelopeHeader(self.run_id, round_index, step, sender, receiver, payload.numel(), self.wire_dtype,
                                        digest, heads)
                envelope = seal(header, self.keys[sender])
                if sender not in self.current.sent or self.current.sent[sender][-1][0] != step:
                    self.current.sent.setdefault(sender, []).append((step, digest))
                attachment = envelope.to_bytes()
                if self.adversary is not None:
                    attachment, payload = self.adversary.tamper(pair, envelope, payload)
                    if payload is not own:
                        replaced[pair] = payload
                attachments[pair] = attachment
        return attachments, replaced

    def exchange(self, outgoing: torch.Tensor, round_index: int, step: int, *,
                 attachments: Attachments | None = None, payloads: Payloads | None = None) -> Inbox:
        if attachments:
            raise ValueError("the trust layer owns the attachments: it cannot wrap a wrapper that sets them")
        row = {peer: k for k, peer in enumerate(self.hosted)}
        tick = time.perf_counter()
        signed, replaced = self._sign_all(outgoing, row, round_index, step, payloads)
        self.current.seconds["sign"] += time.perf_counter() - tick
        inbox = self.inner.exchange(outgoing, round_index, step, attachments=signed, payloads=replaced or None)
        tick = time.perf_counter()
        checked = Inbox(payload_bytes=inbox.payload_bytes, wire_bytes=inbox.wire_bytes)
        self.checker.start_slot(round_index, step)
        links = sorted(set(inbox.messages) | set(inbox.bad_frames))
        accepted_by: dict[int, dict[int, torch.Tensor]] = {}
        for link_sender, receiver in links:
            payload = inbox.messages.get((link_sender, receiver))
            verdict = self.checker.check(link_sender, receiver, inbox.attachments.get((link_sender, receiver)), payload,
                                         outgoing[row[receiver]], inbox.bad_frames.get((link_sender, receiver)))
            if verdict.accepted:
                assert verdict.envelope is not None and payload is not None
                sender = verdict.envelope.header.sender
                checked.messages[(sender, receiver)] = payload
                accepted_by.setdefault(receiver, {})[sender] = payload
                self.current.accepted.setdefault(receiver, []).append(verdict.envelope.to_bytes())
            else:
                self.current.rejected.setdefault(receiver, []).append(verdict)
        if self.adversary is not None:
            for receiver in self.hosted:
                self.adversary.observe(receiver, accepted_by.get(receiver, {}))
        self.current.seconds["verify"] += time.perf_counter() - tick
        return checked
