"""What a receiver checks before a message may touch its model, in this order.

1. ``frame``      the transport could decode the message at all
2. ``envelope``   an envelope is attached and parses (a missing signature block fails here)
3. ``roster``     the claimed sender is on the roster
4. ``signature``  the sender's roster key signed the envelope header
5. ``route``      the envelope is addressed to this receiver and the sender is one of its in-neighbours
6. ``run``        the envelope names this run (no message from another run, even with the same config)
7. ``replay`` / ``future`` / ``duplicate``  the (round, gossip step) slot is the current one, and
   the first message for it from that sender
8. ``shape``      the declared element count and dtype are the agreed layout's, and so is the payload
9. ``digest``     the payload's SHA-256 is the one the sender signed
10. ``nonfinite`` every value is finite
11. ``norm``      optional: ‖payload − own adapter‖ ≤ ``max_update_norm`` · ‖own adapter‖

Cheap checks come first and every check only runs on a message that passed the earlier ones, so a
flood of forged messages costs one signature verification each, never a hash of a whole payload.
A rejected message is left out of the mix; the round goes on (:mod:`d2ora.engine.round`
renormalises the receiver's remaining weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d2ora.engine.exchange import Routes
from d2ora.trust.envelope import Envelope, EnvelopeError, parse, payload_digest
from d2ora.trust.identity import Roster

CHECKS = ("frame", "envelope", "roster", "signature", "route", "run", "replay", "future", "duplicate", "shape",
          "digest", "nonfinite", "norm")


@dataclass(frozen=True)
class Verdict:
    """The outcome for one message that arrived on the link ``link_sender -> receiver``."""

    link_sender: int
    receiver: int
    round: int
    step: int
    envelope: Envelope | None  # parsed (not necessarily valid); None when nothing parsed
    raw: bytes | None  # the attachment as received
    check: str | None = None  # the first check that failed; None: accepted
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.check is None

    @property
    def sender(self) -> int:
        """Whom the message counts against: the authenticated sender when the signature held, else
        the neighbour whose link delivered it (a forged envelope cannot frame a third peer)."""
        if self.envelope is not None and self.check not in ("envelope", "roster", "signature", "frame"):
            return self.envelope.header.sender
        return self.link_sender


class MessageChecker:
    """The checks of one process's receivers. Keeps, per receiver, the senders already accepted
    for the current slot (for ``duplicate``); older slots are forgotten as the slot advances."""

    def __init__(self, roster: Roster, routes: Routes, run_id: bytes, numel: int, wire_dtype: torch.dtype,
                 max_update_norm: float | None = None) -> None:
        self.roster = roster
        self.routes = routes
        self.run_id = run_id
        self.numel = numel
        self.wire_dtype = wire_dtype
        self.max_update_norm = max_update_norm
        self._in_neighbours: dict[int, set[int]] = {}
        self._slot: tuple[int, int] | None = None
        self._taken: set[tuple[int, int]] = set()  # (receiver, sender) accepted for the current slot

    def in_neighbours(self, receiver: int) -> set[int]:
        if receiver not in self._in_neighbours:
            self._in_neighbours[receiver] = set(self.routes.in_neighbours(receiver))
        return self._in_neighbours[receiver]

    def start_slot(self, round_index: int, step: int) -> None:
        if self._slot != (round_index, step):
            self._slot = (round_index, step)
            self._taken.clear()

    def check(self, link_sender: int, receiver: int, attachment: bytes | None, payload: torch.Tensor | None,
              own: torch.Tensor, bad_frame: str | None = None) -> Verdict:
        """The verdict on one message; ``payload`` as decoded (layout dtype), ``own`` the receiver's
        adapter before mixing."""
        assert self._slot is not None, "start_slot first"
        rnd, step = self._slot

        def reject(check: str, detail: str, envelope: Envelope | None = None) -> Verdict:
            return Verdict(link_sender, receiver, rnd, step, envelope, attachment, check, detail)

        if bad_frame is not None or payload is None:
            return reject("frame", bad_frame or "no payload arrived")
        if not attachment:
            return reject("envelope", "no envelope (missing signature)")
        try:
            envelope = parse(attachment)
        except EnvelopeError as exc:
            return reject("envelope", str(exc))
        head = envelope.header
        if head.sender not in self.roster.members:
            return reject("roster", f"claims to be from peer {head.sender}, who is not on the roster", envelope)
        if not envelope.signed_by(self.roster.members[head.sender].public_key):
            return reject("signature", f"signature does not verify with peer {head.sender}'s roster key", envelope)
        if head.receiver != receiver:
            return reject("route", f"addressed to peer {head.receiver}, not {receiver}", envelope)
        if head.sender not in self.in_neighbours(receiver):
            return reject("route", f"peer {head.sender} is not an in-neighbour of peer {receiver}", envelope)
        if head.run_id != self.run_id:
            return reject("run", "from another run (run id differs)", envelope)
        if head.slot < (rnd, step):
            return reject("replay", f"for round {head.round} step {head.step}, an old slot (now round {rnd} step {step})", envelope)
        if head.slot > (rnd, step):
            return reject("future", f"for round {head.round} step {head.step}, ahead of round {rnd} step {step}", envelope)
        if (receiver, head.sender) in self._taken:
            return reject("duplicate", f"a second message from peer {head.sender} for round {rnd} step {step}", envelope)
        if head.numel != self.numel or head.dtype != self.wire_dtype:
            return reject("shape", f"declares {head.numel} x {head.dtype}, the layout is {self.numel} x {self.wire_dtype}", envelope)
        if payload.numel() != self.numel:
            return reject("shape", f"payload has {payload.numel()} values, the layout {self.numel}", envelope)
        if payload_digest(payload.to(self.wire_dtype)) != head.payload_sha256:
            return reject("digest", "payload does not match the SHA-256 its sender signed", envelope)
        if not torch.isfinite(payload).all():
            bad = int((~torch.isfinite(payload)).sum())
            return reject("nonfinite", f"{bad} NaN or infinite value(s)", envelope)
        if self.max_update_norm is not None:
            own_norm = float(own.double().norm())
            distance = float((payload.double() - own.double()).norm())
            if distance > self.max_update_norm * max(own_norm, 1e-12):
                return reject("norm", f"differs from the receiver's adapter by {distance / max(own_norm, 1e-12):.3g}x its norm "
                                      f"(max_update_norm {self.max_update_norm:g})", envelope)
        self._taken.add((receiver, head.sender))
        return Verdict(link_sender, receiver, rnd, step, envelope, attachment)
