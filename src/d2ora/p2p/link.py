"""``PeerLink``: one peer's authenticated, encrypted links to its graph neighbours.

A peer process listens on one TCP port (a ``grpc.server`` with mutual TLS 1.3, see
:mod:`d2ora.p2p.tls`) and connects, as a client with its own certificate, to its neighbours only.
The round's side of it is two calls::

    link = PeerLink(3, key, roster, neighbours=[2, 4], listen="0.0.0.0:7443")
    link.start(); link.connect(deadline_s=60)
    link.send(4, round=r, slot=s, payload=message)        # a future; failures are logged and counted
    got = link.receive([2, 4], round=r, slot=s, deadline_s=30)   # {2: b"...", ...}, got.missing
    link.close()

``receive`` never raises for a silent neighbour (``require_all`` does when a caller wants that).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.p2p.certs import link_credentials
from d2ora.p2p.channels import NeighbourChannel
from d2ora.p2p.frame import HEADER_BYTES, Frame, encode
from d2ora.p2p.inbox import Inbox, LinkError, Received
from d2ora.p2p.service import LinkService
from d2ora.p2p.tls import TrustStore, server_credentials
from d2ora.trust.identity import Roster

#: Largest payload by default: a 7B model's rank-16 DoRA adapter in fp32 is about 80 MB.
DEFAULT_MAX_PAYLOAD = 256 * 2**20

log = logging.getLogger(__name__)


class PeerLink:
    def __init__(
        self,
        peer: int,
        key: Ed25519PrivateKey,
        roster: Roster,
        neighbours: Iterable[int],
        *,
        in_neighbours: Iterable[int] | None = None,
        store: TrustStore | None = None,
        listen: str = "127.0.0.1:0",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_pending: int = 64,
        send_timeout_s: float = 60.0,
    ) -> None:
        """``neighbours`` are the peers this one sends to, ``in_neighbours`` (default: the same) those it
        accepts messages from. ``store`` holds the roster's identity certificates (default: loaded from
        the roster's ``certificate`` entries). ``listen`` is ``host:port``; port 0 picks a free one."""
        self.peer = peer
        self.roster = roster
        self.neighbours = sorted(set(neighbours))
        accept = self.neighbours if in_neighbours is None else sorted(set(in_neighbours))
        unknown = sorted({*self.neighbours, *accept, peer} - set(roster.members))
        if unknown:
            raise LinkError(f"peer(s) {unknown} are not on the roster")
        if peer in self.neighbours or peer in accept:
            raise LinkError(f"peer {peer} cannot be its own neighbour")
        if max_payload < 1:
            raise LinkError(f"max_payload must be at least 1 byte, got {max_payload}")
        self.store = store if store is not None else TrustStore.from_roster(roster)
        identity: x509.Certificate | None = self.store.certificates.get(peer)
        if identity is None:
            raise LinkError(f"the trust store has no identity certificate for peer {peer}")
        self.credentials = link_credentials(peer, key, identity)  # refuses a key that is not peer's roster key
        self.listen = listen
        self.max_payload = max_payload
        self.send_timeout_s = send_timeout_s
        self.inbox = Inbox(max_pending)
        self.service = LinkService(peer, self.store, self.inbox, accept, max_payload)
        self.send_failures: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._channels: dict[int, NeighbourChannel] = {}
        self.port: int | None = None

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> int:
        """Start serving; returns the port (the one picked when ``listen`` asked for port 0)."""
        if self._server is not None:
            raise LinkError(f"peer {self.peer}'s link is already started")
        message_limit = HEADER_BYTES + self.max_payload
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=min(32, 2 + len(self.service.accept_from)), thread_name_prefix=f"p2p-{self.peer}"),
            handlers=[self.service.handler()],
            options=[
                # Larger messages are refused by gRPC before they are read (RESOURCE_EXHAUSTED to the sender).
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", 1024),
                # gRPC's default SO_REUSEPORT would let a second peer bind the same port and take
                # half the connections; a busy port must be an error instead.
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            port = server.add_secure_port(self.listen, server_credentials(self.credentials, self.store))
        except RuntimeError:  # grpc raises when it cannot bind (its message only says to turn on debug logs)
            raise LinkError(f"peer {self.peer} cannot listen on {self.listen} (address in use or not local?)") from None
        if port == 0:
            raise LinkError(f"peer {self.peer} cannot listen on {self.listen}")
        server.start()
        self._server, self.port = server, port
        return port

    def connect(self, deadline_s: float, addresses: Mapping[int, str] | None = None, *, strict: bool = False) -> list[int]:
        """Open channels to the neighbours (address from ``addresses``, else the roster's ``address``)
        and wait up to ``deadline_s`` seconds in all for them; the neighbours not reachable by then
        (LinkError naming them instead when ``strict``). Unready channels keep retrying in the background."""
        addresses = dict(addresses or {})
        for neighbour in self.neighbours:
            if neighbour in self._channels:
                continue
            address = addresses.get(neighbour, self.roster.members[neighbour].address)
            if address is None:
                raise LinkError(f"no address for neighbour {neighbour}: add address: \"host:port\" to its roster entry")
            self._channels[neighbour] = NeighbourChannel(
                self.credentials, self.store, neighbour, address, HEADER_BYTES + self.max_payload
            )
        give_up = time.monotonic() + deadline_s
        not_ready = [n for n in self.neighbours if not self._channels[n].ready(give_up - time.monotonic())]
        if not_ready and strict:
            raise LinkError(f"peer {self.peer} could not reach neighbour(s) {not_ready} within {deadline_s:g} s")
        return not_ready

    def close(self, grace_s: float = 0.5) -> None:
        """Close the channels and stop the server (calls in flight get ``grace_s`` seconds)."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 5)
            self._server = None

    def __enter__(self) -> PeerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- messages
    def send(self, to: int, round: int, slot: int, payload: bytes, timeout_s: float | None = None) -> grpc.Future:
        """Send ``payload`` to neighbour ``to`` for (``round``, ``slot``). Returns at once with a future
        (``result()`` raises grpc.RpcError if the neighbour refused it or was unreachable in time);
        a failure is also logged and counted in ``send_failures``."""
        channel = self._channels.get(to)
        if channel is None:
            raise LinkError(f"peer {to} is not a connected neighbour of peer {self.peer} (neighbours: {self.neighbours}; call connect first)")
        if len(payload) > self.max_payload:
            raise LinkError(f"a payload of {len(payload)} bytes exceeds the link's limit of {self.max_payload}")
        call = channel.deliver(encode(Frame(self.peer, round, slot, payload)), self.send_timeout_s if timeout_s is None else timeout_s)
        call.add_done_callback(lambda done: self._sent(to, round, slot, done))
        return call

    def _sent(self, to: int, round: int, slot: int, call: grpc.Future) -> None:
        if call.cancelled():  # the link was closed with the call in flight
            detail = "cancelled (the link closed)"
        else:
            error = call.exception()
            if error is None:
                return
            detail = error.details() if isinstance(error, grpc.Call) else str(error)
        with self._lock:
            self.send_failures[to] += 1
        log.warning("peer %d could not deliver round %d slot %d to peer %d: %s", self.peer, round, slot, to, detail)

    def receive(self, from_ids: Iterable[int], round: int, slot: int, deadline_s: float) -> Received:
        """What arrived from ``from_ids`` for (``round``, ``slot``) within ``deadline_s`` seconds;
        ``.missing`` names the rest (``require_all`` turns that into an error)."""
        return self.inbox.receive(from_ids, round, slot, deadline_s)

    def drop_before(self, round: int) -> int:
        """Forget and from now on refuse messages of rounds before ``round``."""
        return self.inbox.drop_before(round)

    @property
    def rejected(self) -> Counter[tuple[int | None, str]]:
        """(peer by its certificate, or None when unauthenticated; reason) -> refused messages."""
        return self.service.rejected
