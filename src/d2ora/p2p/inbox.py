"""Arrived messages, filed by (sender, round, slot), and waiting for them until a deadline.

A missing neighbour is not an error here: :meth:`Inbox.receive` returns what arrived by the deadline
and names the rest in ``missing``, because the round mixes what a receiver holds and renormalises
its row (as it does for a rejected message). :func:`require_all` is for callers that want
strictness. Memory is bounded: each sender may have at most ``max_pending`` messages waiting, and
:meth:`Inbox.drop_before` forgets (and from then on refuses) rounds the caller is done with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from d2ora.p2p.frame import Frame


class LinkError(RuntimeError):
    """A link that cannot do what was asked; the message names the peer and the reason."""


class Refused(Exception):
    """Why the inbox will not file a message (duplicate, stale round, too many waiting)."""


class Received(dict[int, bytes]):
    """Sender id -> payload for what arrived by the deadline; ``missing`` lists those that did not."""

    def __init__(self, arrived: dict[int, bytes], missing: list[int], round: int, slot: int, deadline_s: float) -> None:
        super().__init__(arrived)
        self.missing = tuple(missing)
        self.round, self.slot, self.deadline_s = round, slot, deadline_s


def require_all(received: Received) -> Received:
    """``received`` unchanged when nothing is missing; LinkError in one line otherwise."""
    if received.missing:
        raise LinkError(
            f"round {received.round} slot {received.slot}: no message from peer(s) {list(received.missing)} "
            f"within {received.deadline_s:g} s"
        )
    return received


class Inbox:
    """Thread-safe: gRPC's handler threads ``put``, the round's thread ``receive``s."""

    def __init__(self, max_pending: int = 64) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        self._messages: dict[tuple[int, int, int], bytes] = {}
        self._pending: dict[int, int] = {}  # sender -> messages waiting
        self._floor = 0  # rounds below it are done: their messages are dropped and refused
        self._changed = threading.Condition()

    def put(self, frame: Frame) -> None:
        """File ``frame``; Refused (and nothing filed) for a duplicate, a finished round or a full sender."""
        key = (frame.sender, frame.round, frame.slot)
        with self._changed:
            if frame.round < self._floor:
                raise Refused(f"round {frame.round} is finished here (rounds before {self._floor} are dropped)")
            if key in self._messages:
                raise Refused(f"a second message for round {frame.round} slot {frame.slot}")
            if self._pending.get(frame.sender, 0) >= self.max_pending:
                raise Refused(f"{self.max_pending} messages from this sender are already waiting")
            self._messages[key] = frame.payload
            self._pending[frame.sender] = self._pending.get(frame.sender, 0) + 1
            self._changed.notify_all()

    def receive(self, from_ids: Iterable[int], round: int, slot: int, deadline_s: float) -> Received:
        """Wait at most ``deadline_s`` seconds for one message from each of ``from_ids`` for
        (``round``, ``slot``); take what arrived out of the inbox and return it, naming the missing."""
        senders = list(dict.fromkeys(from_ids))
        if deadline_s < 0:
            raise ValueError(f"deadline_s must be >= 0, got {deadline_s}")
        give_up = time.monotonic() + deadline_s
        with self._changed:
            while True:
                missing = [s for s in senders if (s, round, slot) not in self._messages]
                remaining = give_up - time.monotonic()
                if not missing or remaining <= 0:
                    break
                self._changed.wait(remaining)
            arrived = {}
            for sender in senders:
                payload = self._messages.pop((sender, round, slot), None)
                if payload is not None:
                    arrived[sender] = payload
                    self._pending[sender] -= 1
        return Received(arrived, missing, round, slot, deadline_s)

    def newest_round(self, from_ids: Iterable[int], after: int, slot: int, deadline_s: float,
                     settle_s: float = 0.5) -> int | None:
        """Wait at most ``deadline_s`` seconds until a message from one of ``from_ids`` for a round
        after ``after`` and this ``slot`` is here, then until no newer one has come for ``settle_s``
        (messages queued while this peer was away arrive one by one, oldest first); the newest such
        round (None if none came). What a peer that comes back uses to learn where the run is: its
        neighbours never stopped sending to it."""
        senders = set(from_ids)
        give_up = time.monotonic() + deadline_s
        newest, quiet_until = None, 0.0
        with self._changed:
            while True:
                now = time.monotonic()
                found = max((r for (s, r, sl) in self._messages if s in senders and sl == slot and r > after), default=None)
                if found is not None and (newest is None or found > newest):
                    newest, quiet_until = found, now + settle_s
                wait = (give_up if newest is None else min(quiet_until, give_up)) - now
                if wait <= 0:
                    return newest
                self._changed.wait(wait)

    def drop_before(self, round: int) -> int:
        """Forget every message of a round before ``round`` and refuse them from now on; how many were dropped."""
        with self._changed:
            self._floor = max(self._floor, round)
            stale = [key for key in self._messages if key[1] < self._floor]
            for key in stale:
                del self._messages[key]
                self._pending[key[0]] -= 1
        return len(stale)
