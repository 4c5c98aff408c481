"""gRPC TLS credentials pinned to the roster, and mapping an authenticated caller to its roster id.

- A **server** trusts the identity certificates of the roster's peers and nothing else (no system
  CAs) and requires a client certificate, so a key not on the roster fails in the handshake.
- A **client** connecting to neighbour k trusts *only k's* identity certificate and asks for
  ``peer-k.d2ora``: another roster peer (or anyone) answering at k's address fails the handshake,
  so adapters go only to the peer they are meant for.
- After the handshake the server maps the caller's link certificate to the roster peer whose
  identity certificate issued it (:meth:`TrustStore.peer_of`, the signature checked again by the
  ``cryptography`` library) and insists on TLS 1.3 (gRPC's Python API cannot set a minimum
  version, but it reports the negotiated one in the auth context, so a call over TLS 1.2 is refused).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from d2ora.p2p.certs import CertificateError, LinkCredentials, issued_by, load_identity_certificate
from d2ora.trust.identity import Roster

TLS_VERSION = b"TLSv1.3"


class Unauthenticated(Exception):
    """A call whose TLS identity cannot be mapped to a roster peer."""


@dataclass
class TrustStore:
    """The roster's identity certificates (peer id -> certificate), each checked against the roster's key."""

    certificates: dict[int, x509.Certificate]
    _by_leaf: dict[bytes, int | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_roster(cls, roster: Roster, paths: Mapping[int, str | os.PathLike[str]] | None = None) -> TrustStore:
        """Load every roster peer's certificate: ``paths[peer]`` if given, else the roster's ``certificate``."""
        paths = dict(paths or {})
        certificates = {}
        for peer, member in sorted(roster.members.items()):
            path = paths.get(peer, member.certificate)
            if path is None:
                raise CertificateError(
                    f"roster peer {peer} has no certificate: add certificate: <path to its .crt from d2ora keygen>"
                )
            certificates[peer] = load_identity_certificate(path, member.public_key, f"roster peer {peer}")
        return cls(certificates)

    def pem(self, peers: Iterable[int] | None = None) -> bytes:
        """The PEM bundle of these peers' identity certificates (all of them by default)."""
        chosen = sorted(self.certificates) if peers is None else list(peers)
        return b"".join(self.certificates[p].public_bytes(serialization.Encoding.PEM) for p in chosen)

    def peer_of(self, leaf_pem: bytes) -> int | None:
        """The roster peer whose identity certificate issued this link certificate; None if none did."""
        with self._lock:
            if leaf_pem in self._by_leaf:
                return self._by_leaf[leaf_pem]
        try:
            leaf = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError:
            found = None
        else:
            found = next((p for p, identity in sorted(self.certificates.items()) if issued_by(leaf, identity)), None)
        with self._lock:
            if len(self._by_leaf) > 4 * len(self.certificates) + 16:  # bounded: a link cert per peer start
                self._by_leaf.clear()
            self._by_leaf[leaf_pem] = found
        return found


def server_credentials(own: LinkCredentials, store: TrustStore) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(own.private_key_pem, own.chain_pem)], root_certificates=store.pem(), require_client_auth=True
    )


def channel_credentials(own: LinkCredentials, store: TrustStore, neighbour: int) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=store.pem([neighbour]), private_key=own.private_key_pem, certificate_chain=own.chain_pem
    )


def authenticated_peer(context: grpc.ServicerContext, store: TrustStore) -> int:
    """The roster id of the caller of this RPC, from its TLS certificate; Unauthenticated otherwise."""
    auth = context.auth_context()
    versions = auth.get("ssl_tls_version", [])
    if versions != [TLS_VERSION]:
        raise Unauthenticated(f"TLS version {versions[0].decode() if versions else 'unknown'}, only TLS 1.3 is accepted")
    leaves = auth.get("x509_pem_cert", [])
    if not leaves:
        raise Unauthenticated("no client certificate")
    peer = store.peer_of(leaves[0])
    if peer is None:
        fingerprint = hashlib.sha256(leaves[0]).hexdigest()[:16]
        raise Unauthenticated(f"certificate (PEM sha256 {fingerprint}...) was not issued by a roster identity")
    return peer
