"""The server side of a link: one gRPC method that files authenticated, well-formed frames.

``/d2ora.p2p.Link/Deliver``: request = one frame (:mod:`d2ora.p2p.frame`) as raw bytes, response =
empty bytes. It is a generic handler over bytes (gRPC's serializers left out), so no protobuf code
is generated. Every call is checked in order, and the first failure ends it with a gRPC status
and one line of detail, a warning in the log naming the caller, and a count in ``rejected``:

1. the caller's TLS 1.3 certificate maps to a roster peer (``UNAUTHENTICATED``);
2. that peer is one this peer accepts messages from, an in-neighbour (``PERMISSION_DENIED``);
3. the body is a well-formed frame within the size limit (``INVALID_ARGUMENT``);
4. the frame's sender id is the peer its certificate says (``PERMISSION_DENIED``);
5. the inbox takes it: no duplicate, round not finished, sender not over its quota (``RESOURCE_EXHAUSTED``).

A rejected call changes nothing else, so the link keeps serving the other peers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from typing import NoReturn

import grpc

from d2ora.p2p.frame import FrameError, decode
from d2ora.p2p.inbox import Inbox, Refused
from d2ora.p2p.tls import TrustStore, Unauthenticated, authenticated_peer

SERVICE = "d2ora.p2p.Link"
METHOD = "Deliver"
FULL_METHOD = f"/{SERVICE}/{METHOD}"

log = logging.getLogger(__name__)


class LinkService:
    """Files frames for peer ``me`` into ``inbox``; ``rejected[(peer or None, reason)]`` counts refusals."""

    def __init__(self, me: int, store: TrustStore, inbox: Inbox, accept_from: Iterable[int], max_payload: int) -> None:
        self.me = me
        self.store = store
        self.inbox = inbox
        self.accept_from = frozenset(accept_from)
        self.max_payload = max_payload
        self.rejected: Counter[tuple[int | None, str]] = Counter()
        self.delivered: Counter[int] = Counter()
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        # No request_deserializer / response_serializer: gRPC hands the raw bytes through unchanged.
        method = grpc.unary_unary_rpc_method_handler(self.deliver)
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})

    def deliver(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            peer = authenticated_peer(context, self.store)
        except Unauthenticated as exc:
            self._refuse(context, None, "unauthenticated", str(exc), grpc.StatusCode.UNAUTHENTICATED)
        if peer not in self.accept_from:
            self._refuse(context, peer, "not_a_neighbour", f"peer {self.me} takes no messages from peer {peer}", grpc.StatusCode.PERMISSION_DENIED)
        try:
            frame = decode(body, self.max_payload)
        except FrameError as exc:
            self._refuse(context, peer, "bad_frame", str(exc), grpc.StatusCode.INVALID_ARGUMENT)
        if frame.sender != peer:
            self._refuse(
                context, peer, "wrong_sender",
                f"the frame says sender {frame.sender}, the certificate is peer {peer}'s", grpc.StatusCode.PERMISSION_DENIED,
            )
        try:
            self.inbox.put(frame)
        except Refused as exc:
            self._refuse(context, peer, "inbox_refused", str(exc), grpc.StatusCode.RESOURCE_EXHAUSTED)
        with self._lock:
            self.delivered[peer] += 1
        return b""

    def _refuse(self, context: grpc.ServicerContext, peer: int | None, reason: str, detail: str, code: grpc.StatusCode) -> NoReturn:
        who = "an unauthenticated caller" if peer is None else f"peer {peer}"
        with self._lock:
            self.rejected[(peer, reason)] += 1
        log.warning("peer %d refused a message from %s at %s: %s", self.me, who, context.peer(), detail)
        context.abort(code, f"refused by peer {self.me}: {detail}")
        raise AssertionError("grpc context.abort returned")  # it raises; this line keeps NoReturn honest
