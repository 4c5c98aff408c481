"""The seam between one process's rounds and the other processes of its run: :class:`PeerGroup`.

A run of several processes needs, besides its :class:`~d2ora.engine.exchange.Exchange` (the
messages of a round) and its :class:`~d2ora.engine.loop.Collector` (what reaches the monitor's
process), three agreements before round 1. Each runtime makes them its own way:

=====================  ===========================================  ==============================================
                       torch.distributed (``d2ora peer``, torchrun)  gRPC links (``d2ora peer --roster --key``)
=====================  ===========================================  ==============================================
``agree``              every process against process 0, by digest  each peer against its in-neighbours, in the
                       (all_gather), the differing keys named        first messages on its links (round 0)
``resume_round``       the newest round *every* process holds       its own newest checkpoint: a peer comes back
                       (all_reduce MIN): they resume together        alone and rejoins (:mod:`d2ora.recipes.p2p_peer`)
``fresh_nonce``        drawn by process 0, broadcast as bytes       derived alike by every peer from the config and
                                                                     roster digests and ``--run-id``: no broadcast
failure detection      store heartbeats; a lost process named in    the round deadline: a silent neighbour is mixed
                       one line, and the job stops                   without and recorded absent; the run goes on
collector              :class:`~d2ora.distributed.exchange.          its own peer only
                       DistributedCollector` to process 0            (:class:`~d2ora.engine.loop.LocalCollector`)
=====================  ===========================================  ==============================================

Implementations: :class:`d2ora.distributed.group.Group` and :class:`d2ora.p2p.group.LinkGroup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

#: Bytes of a run nonce (what every signed envelope's run id is bound to).
NONCE_BYTES = 16


class PeerGroup(Protocol):
    """What the processes of one run agree on before round 1 (see the module doc)."""

    def agree(self, what: str, payload: Mapping[str, Any]) -> None:
        """Refuse to go on, in one line naming the other party and the keys that differ, unless the
        others hold the same JSON-able ``payload`` for ``what`` (every process makes the same calls,
        in the same order)."""
        ...

    def resume_round(self, mine: int | None) -> int | None:
        """The checkpoint round this process resumes from, given its own newest valid one (None: none)."""
        ...

    def fresh_nonce(self) -> bytes:
        """The run nonce of a run that starts afresh, the same in every process."""
        ...


def differing_keys(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The keys of two agreement payloads whose values differ, sorted (what an error names)."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
