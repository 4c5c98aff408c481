"""``LinkGroup``: the :class:`~d2ora.engine.group.PeerGroup` of one organisation's peer over its links.

Agreement is with the neighbours only: each :meth:`LinkGroup.agree` call sends the payload as JSON
to every out-neighbour in the link's start-up round (round 0, one slot per call, in call order) and
compares what each in-neighbour sent for the same slot, naming the neighbour and the keys that
differ. There is no process 0: a peer resumes from its own checkpoint alone (it rejoins the run in
progress, :mod:`d2ora.recipes.p2p_peer`), and the run nonce is derived alike by every peer from
digests it already agreed on, so nothing is broadcast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from d2ora.engine.group import differing_keys
from d2ora.p2p.link import PeerLink

#: The links' start-up round: training rounds are numbered from 1.
AGREEMENT_ROUND = 0


class LinkSetupError(RuntimeError):
    """A peer that cannot start its part of the run; one line naming the peer and the problem."""


class LinkGroup:
    def __init__(self, link: PeerLink, in_neighbours: Sequence[int], deadline_s: float, nonce: bytes) -> None:
        self.link = link
        self.in_neighbours = list(in_neighbours)
        self.deadline_s = deadline_s
        self.nonce = nonce
        self._slot = 0  # the next agreement's slot in round 0

    def agree(self, what: str, payload: Mapping[str, Any]) -> None:
        """Send ``payload`` to every out-neighbour and check every in-neighbour's; LinkSetupError
        naming the first neighbour that is silent or differs (after ours is out, so it refuses too)."""
        link, deadline = self.link, self.deadline_s
        slot, self._slot = self._slot, self._slot + 1
        mine = json.loads(json.dumps(dict(payload), sort_keys=True))  # compared as the neighbours read it
        body = json.dumps(mine, sort_keys=True).encode()
        sent = [link.send(n, AGREEMENT_ROUND, slot, body, timeout_s=deadline) for n in link.neighbours]
        received = link.receive(self.in_neighbours, AGREEMENT_ROUND, slot, deadline)
        for call in sent:  # let ours arrive before a refusal closes the link
            try:
                call.result(timeout=deadline)
            except grpc.RpcError:
                pass
        if received.missing:
            raise LinkSetupError(f"peer {link.peer}: neighbour(s) {list(received.missing)} sent no start-up message "
                                 f"({what}) within {deadline:g} s (network.timeout_s)")
        for neighbour, data in sorted(received.items()):
            try:
                theirs = json.loads(data)
            except ValueError:
                raise LinkSetupError(f"peer {link.peer}: neighbour {neighbour}'s start-up message ({what}) is not JSON") from None
            keys = differing_keys(mine, theirs if isinstance(theirs, dict) else {})
            if keys:
                raise LinkSetupError(f"peer {neighbour} runs a different {what} (differs in: {', '.join(keys)}) from peer "
                                     f"{link.peer}; every peer of a run must use the same config, roster and run id")

    def resume_round(self, mine: int | None) -> int | None:
        """Its own newest checkpoint: an organisation comes back alone, into the run in progress."""
        return mine

    def fresh_nonce(self) -> bytes:
        return self.nonce
