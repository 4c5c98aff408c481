"""The client side of a link: one gRPC channel to one neighbour, pinned to its roster certificate.

Peers start in any order: a channel keeps retrying the connection on its own (backoff capped at
``MAX_BACKOFF_MS`` so a late neighbour is found within about a second), :meth:`NeighbourChannel.ready`
waits for it up to a deadline, and every call is made ``wait_for_ready`` so a message sent before
the neighbour is up waits for it (until the call's timeout) instead of failing at once.
"""

from __future__ import annotations

import grpc

from d2ora.p2p.certs import LinkCredentials, tls_name
from d2ora.p2p.service import FULL_METHOD
from d2ora.p2p.tls import TrustStore, channel_credentials

MAX_BACKOFF_MS = 1000


class NeighbourChannel:
    def __init__(self, own: LinkCredentials, store: TrustStore, neighbour: int, address: str, max_message_bytes: int) -> None:
        self.neighbour = neighbour
        self.address = address
        options = [
            # The certificate names the roster peer, not a host: verify that name wherever the peer runs.
            ("grpc.ssl_target_name_override", tls_name(neighbour)),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", 1024),  # responses are empty
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", MAX_BACKOFF_MS),
        ]
        self._channel = grpc.secure_channel(address, channel_credentials(own, store, neighbour), options=options)
        # No serializers: the frame's bytes go out as they are.
        self._deliver = self._channel.unary_unary(FULL_METHOD)

    def ready(self, timeout_s: float) -> bool:
        """Whether the channel is connected (TLS handshake done) within ``timeout_s`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(timeout_s, 0.0))
        except grpc.FutureTimeoutError:
            return False
        return True

    def deliver(self, body: bytes, timeout_s: float) -> grpc.Future:
        """Send one frame; the future's ``result()`` is ``b""`` on success and raises grpc.RpcError otherwise."""
        return self._deliver.future(body, timeout=timeout_s, wait_for_ready=True)

    def close(self) -> None:
        self._channel.close()
